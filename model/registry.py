"""The versioned model store: the only state shared between processes and replicas.

Layout under the registry root::

    ACTIVE                      the active version id (replaced atomically by rename)
    CANARY                      a canary rollout, if any: JSON {version, percent, live, started}
    versions/<vNNNN>/           one directory per published version, renamed in whole
        model.safetensors       weights (never pickled)
        manifest.json           id, architecture, parent, metrics, data hash, hyperparameters
        model.onnx, *.png       artifacts written by the publisher
    staging/                    versions being written; never read (cleared on open when no one publishes)
    jobs/<job_id>.json          fine-tune job records
    samples/<job_id>.safetensors uploaded samples, kept with their job
    feedback/<id>.safetensors   user corrections collected by POST /feedback
    feedback/INDEX.json         their count and bytes (kept under feedback/.lock, so counting is O(1))
    review/items/<id>.safetensors  a captured prediction's 28x28 input (+ the upload when kept), with its
                                prediction, confidence, version, time and source in the header
    review/state/<id>.json      what reviewers did with it: lease, label, skips, the job that used it
    review/.lock                one review-queue writer at a time (all processes and replicas)
    traffic/<ns>-<pid>-<n>.safetensors  chunks of the ring of recent inputs (n digits each), oldest dropped
    traffic/.lock               one ring trimmer at a time
    .publish.lock, .trainer.lock file locks: one publisher at a time, one trainer per registry

Only this module knows the layout: every other module asks a ``Registry`` for its paths.
Every write goes to a temporary name and is renamed into place (``atomic_file``), so a
writer killed at any instant leaves the previous state intact. Publishers serialize on a
file lock (fcntl: the kernel releases it when the holder dies).

torch is imported only by the methods that read or write weights, so a server without torch
(ONNX Runtime on CPU) reads the registry all the same.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock, Timeout
from pydantic import BaseModel, Field

from model.atomic import atomic_file, atomic_write_bytes

if TYPE_CHECKING:
    import torch
    from torch import nn

VERSION_ID = r"^v([0-9]{4,9})$"  # v0001 ... v999999999: bounded, so no id makes a path too long
VERSION_PATTERN = re.compile(VERSION_ID)
RECORD_ID = r"^[0-9]{14}[0-9a-f]{8}$"  # job and feedback ids: creation time (YYYYmmddHHMMSS) + 8 hex digits
RECORD_ID_PATTERN = re.compile(RECORD_ID)
WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
ONNX = "model.onnx"


class RegistryError(RuntimeError):
    pass


class Canary(BaseModel):
    """A canary rollout: ``percent`` of requests are served by ``version``, the rest by the
    active version (``live`` when the canary started)."""

    version: str
    percent: float = Field(..., gt=0, le=100)
    live: str
    started: float = Field(default_factory=time.time)


class Manifest(BaseModel):
    version: str
    arch: str
    parent: str | None = None
    created: float = Field(default_factory=time.time)
    metrics: dict[str, Any] = Field(default_factory=dict)
    data_hash: str | None = None
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    job_id: str | None = None
    files: dict[str, str] = Field(default_factory=dict, description="file name -> sha256")


def new_record_id() -> str:
    """A job or feedback id: unique, and sorting by it sorts by creation time."""
    return time.strftime("%Y%m%d%H%M%S", time.gmtime()) + uuid.uuid4().hex[:8]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _marker(path: Path) -> tuple[int, int] | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return st.st_ino, st.st_mtime_ns


class Registry:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        self.staging_dir = self.root / "staging"
        self.jobs_dir = self.root / "jobs"
        self.samples_dir = self.root / "samples"
        self.feedback_dir = self.root / "feedback"
        self.active_file = self.root / "ACTIVE"
        self.canary_file = self.root / "CANARY"
        self.feedback_index = self.feedback_dir / "INDEX.json"
        self.feedback_lock_path = self.feedback_dir / ".lock"
        self.trainer_lock_path = self.root / ".trainer.lock"
        self.jobs_lock_path = self.root / ".jobs.lock"
        self.review_items_dir = self.root / "review" / "items"
        self.review_state_dir = self.root / "review" / "state"
        self.review_lock_path = self.root / "review" / ".lock"
        self.traffic_dir = self.root / "traffic"
        self.traffic_lock_path = self.traffic_dir / ".lock"
        for directory in (self.versions_dir, self.staging_dir, self.jobs_dir, self.samples_dir, self.feedback_dir,
                          self.review_items_dir, self.review_state_dir, self.traffic_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self._lock: FileLock | None = None
        self._lock_pid = -1
        self._clear_staging_if_idle()

    @property
    def lock(self) -> FileLock:
        """The publish lock, made anew in each process (a lock object must not cross a fork)."""
        if self._lock is None or self._lock_pid != os.getpid():
            self._lock, self._lock_pid = FileLock(str(self.root / ".publish.lock")), os.getpid()
        return self._lock

    # ------------------------------------------------------------ reading

    def version_dir(self, version: str) -> Path:
        if not VERSION_PATTERN.match(version):
            raise RegistryError(f"{version!r} is not a version id (like v0001)")
        return self.versions_dir / version

    def list_versions(self) -> list[Manifest]:
        manifests = []
        for path in sorted(self.versions_dir.iterdir()):
            if VERSION_PATTERN.match(path.name) and (path / MANIFEST).is_file():
                manifests.append(self.get(path.name))
        return manifests

    def get(self, version: str) -> Manifest:
        path = self.version_dir(version) / MANIFEST
        if not path.is_file():
            raise RegistryError(f"no version {version} in {self.root}")
        return Manifest.model_validate_json(path.read_text())

    def exists(self, version: str) -> bool:
        return VERSION_PATTERN.match(version) is not None and (self.versions_dir / version / MANIFEST).is_file()

    def active_version(self) -> str | None:
        try:
            version = self.active_file.read_text().strip()
        except FileNotFoundError:
            return None
        return version or None

    def active_marker(self) -> tuple[int, int] | None:
        """A cheap fingerprint of the ACTIVE pointer: it changes on every activation. Opened,
        not just stat'ed: on a shared NFS volume an open revalidates the file (close-to-open
        consistency) where a bare stat may answer from the attribute cache for seconds."""
        return _marker(self.active_file)

    def canary(self) -> Canary | None:
        """The canary rollout under way, or None (also for a pointer left naming the active
        version: a promotion killed before it removed the pointer, or that version activated)."""
        try:
            canary = Canary.model_validate_json(self.canary_file.read_text())
        except FileNotFoundError:
            return None
        return None if canary.version == self.active_version() else canary

    def canary_marker(self) -> tuple[int, int] | None:
        """Like :meth:`active_marker`, for the CANARY pointer (None: no canary)."""
        return _marker(self.canary_file)

    def load_state_dict(self, version: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.version_dir(version) / WEIGHTS))

    def load_model(self, version: str | None = None) -> tuple[nn.Module, Manifest]:
        """Build the version's architecture with its weights, in eval mode on the CPU."""
        from model.nets import build

        version = version or self.active_version()
        if version is None:
            raise RegistryError(f"{self.root} has no active version; run `python -m model train`")
        manifest = self.get(version)
        model = build(manifest.arch)
        model.load_state_dict(self.load_state_dict(version))
        return model.eval(), manifest

    def onnx_path(self, version: str) -> Path:
        return self.version_dir(version) / ONNX

    # ------------------------------------------------------------ jobs, samples, feedback

    def job_path(self, job_id: str) -> Path:
        return self.jobs_dir / f"{job_id}.json"

    def job_paths(self) -> list[Path]:
        return list(self.jobs_dir.glob("*.json"))

    def cancel_path(self, job_id: str) -> Path:
        """Present while a running job is asked to stop (the trainer polls it between batches)."""
        return self.jobs_dir / f"{job_id}.cancel"

    def samples_path(self, job_id: str) -> Path:
        return self.samples_dir / f"{job_id}.safetensors"

    def feedback_path(self, sample_id: str) -> Path:
        return self.feedback_dir / f"{sample_id}.safetensors"

    def feedback_paths(self) -> list[Path]:
        """Every stored feedback sample, oldest first (ids start with their time)."""
        return sorted(self.feedback_dir.glob("*.safetensors"))

    def review_item_path(self, item_id: str) -> Path:
        return self.review_items_dir / f"{item_id}.safetensors"

    def review_state_path(self, item_id: str) -> Path:
        return self.review_state_dir / f"{item_id}.json"

    def review_item_ids(self) -> list[str]:
        """Every review item, oldest first (ids start with their time)."""
        return sorted(p.name.removesuffix(".safetensors") for p in os.scandir(self.review_items_dir)
                      if p.name.endswith(".safetensors") and not p.name.startswith("."))

    def review_state_ids(self) -> set[str]:
        return {p.name.removesuffix(".json") for p in os.scandir(self.review_state_dir)
                if p.name.endswith(".json") and not p.name.startswith(".")}

    def traffic_chunk_path(self, count: int) -> Path:
        """A new chunk of ``count`` recent inputs: named by time, writer and count, so the ring's
        order and size are read from the names alone."""
        return self.traffic_dir / f"{time.time_ns():020d}-{os.getpid()}-{count}.safetensors"

    def traffic_chunks(self) -> list[tuple[Path, int]]:
        """(path, digits in it) of every chunk of the traffic ring, oldest first."""
        chunks = []
        for entry in os.scandir(self.traffic_dir):
            parts = entry.name.removesuffix(".safetensors").split("-")
            named = entry.name.endswith(".safetensors") and len(parts) == 3
            if named and all(part.isascii() and part.isdigit() for part in parts):
                chunks.append((Path(entry.path), int(parts[2])))
        return sorted(chunks)

    # ------------------------------------------------------------ writing

    def _next_version(self) -> str:
        numbers = [int(m.group(1)) for p in self.versions_dir.iterdir() if (m := VERSION_PATTERN.match(p.name))]
        return f"v{max(numbers, default=0) + 1:04d}"

    def publish(
        self,
        model: nn.Module,
        arch: str,
        *,
        parent: str | None = None,
        metrics: dict[str, Any] | None = None,
        data_hash: str | None = None,
        hyperparameters: dict[str, Any] | None = None,
        job_id: str | None = None,
        write_artifacts: Callable[[Path, str], None] | None = None,
        activate: bool = True,
    ) -> Manifest:
        """Write a complete version under staging/, rename it into versions/, then (optionally)
        move ACTIVE to it. ``write_artifacts(dir, version)`` adds files such as model.onnx."""
        from safetensors.torch import save_file

        with self.lock:
            self._clear_staging()  # we hold the lock, so anything there is from a dead publisher
            version = self._next_version()
            staging = self.staging_dir / f"{version}.{os.getpid()}"
            staging.mkdir(parents=True)
            state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            save_file(state, str(staging / WEIGHTS), metadata={"version": version, "arch": arch})
            if write_artifacts is not None:
                write_artifacts(staging, version)
            manifest = Manifest(
                version=version,
                arch=arch,
                parent=parent,
                metrics=metrics or {},
                data_hash=data_hash,
                hyperparameters=hyperparameters or {},
                job_id=job_id,
                files={p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()},
            )
            atomic_write_bytes(staging / MANIFEST, manifest.model_dump_json(indent=2).encode())
            _fsync_dir(staging)
            os.rename(staging, self.versions_dir / version)
            _fsync_dir(self.versions_dir)
            if activate:
                self._write_active(version)
            return manifest

    def add_artifact(self, version: str, name: str, write: Callable[[Path], None]) -> None:
        """(Re)write one artifact of a published version, e.g. a missing ONNX file, and record
        its new hash in the manifest. Both files are replaced atomically."""
        directory = self.version_dir(version)
        with self.lock:
            with atomic_file(directory / name) as tmp:
                write(tmp)
                digest = sha256_file(tmp)
            manifest = self.get(version)
            manifest.files[name] = digest
            atomic_write_bytes(directory / MANIFEST, manifest.model_dump_json(indent=2).encode())

    def verify_artifact(self, version: str, name: str) -> bool:
        """True when the file exists and matches the hash recorded at publish time."""
        path = self.version_dir(version) / name
        expected = self.get(version).files.get(name)
        return path.is_file() and expected is not None and sha256_file(path) == expected

    def base_version(self) -> str | None:
        """The oldest version trained from scratch (no parent): what `make train` published."""
        bases = [m.version for m in self.list_versions() if m.parent is None]
        return bases[0] if bases else None

    def import_version(self, source: Registry, version: str, activate: bool = True) -> Manifest:
        """Copy ``version`` of another registry in as this registry's next version (files and
        manifest, renamed as a whole like a publish); its lineage is reset (no parent, no job)."""
        with self.lock:
            self._clear_staging()
            new_version = self._next_version()
            staging = self.staging_dir / f"{new_version}.{os.getpid()}"
            shutil.copytree(source.version_dir(version), staging)
            manifest = source.get(version).model_copy(update={"version": new_version, "parent": None, "job_id": None})
            atomic_write_bytes(staging / MANIFEST, manifest.model_dump_json(indent=2).encode())
            os.rename(staging, self.versions_dir / new_version)
            if activate:
                self._write_active(new_version)
            return manifest

    def activate(self, version: str) -> None:
        """Move ACTIVE; a canary of ``version`` ends, as it is live now."""
        if not self.exists(version):
            raise RegistryError(f"no version {version} in {self.root}")
        with self.lock:
            canary = self.canary()
            self._write_active(version)
            if canary is not None and canary.version == version:
                self.canary_file.unlink(missing_ok=True)
                _fsync_dir(self.root)

    def start_canary(self, version: str, percent: float) -> Canary:
        """Serve ``percent`` of requests with ``version`` (replacing any canary under way)."""
        if not self.exists(version):
            raise RegistryError(f"no version {version} in {self.root}")
        with self.lock:
            live = self.active_version()
            if live is None or live == version:
                raise RegistryError(f"{version} is the active version; a canary must be another version")
            canary = Canary(version=version, percent=percent, live=live)
            atomic_write_bytes(self.canary_file, canary.model_dump_json().encode())
            _fsync_dir(self.root)
            return canary

    def end_canary(self, promote: bool) -> Canary:
        """Promote (ACTIVE moves to the canary, then the canary ends) or abort (the canary ends).
        Raises RegistryError when no canary is under way."""
        with self.lock:
            canary = self.canary()
            if canary is None:
                raise RegistryError("no canary rollout is under way")
            if promote:
                self._write_active(canary.version)
            self.canary_file.unlink()
            _fsync_dir(self.root)
            return canary

    def _write_active(self, version: str) -> None:
        atomic_write_bytes(self.active_file, f"{version}\n".encode())
        _fsync_dir(self.root)

    def _clear_staging(self) -> None:
        for leftover in self.staging_dir.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)

    def _clear_staging_if_idle(self) -> None:
        """On open (a server or trainer starting): if no one holds the publish lock, whatever is
        in staging/ was left by a publisher that was killed. A busy lock means a publish is under
        way; that publisher clears leftovers itself."""
        if not any(self.staging_dir.iterdir()):
            return
        try:
            with self.lock.acquire(timeout=0):
                self._clear_staging()
        except Timeout:
            pass


@cache
def open_registry(root: Path) -> Registry:
    """The one :class:`Registry` of ``root`` in this process (opening one also clears a dead
    publisher's ``staging/`` leftovers: once per process is enough)."""
    return Registry(root)
