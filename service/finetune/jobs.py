"""Fine-tune job records and their samples, persisted in the registry (shared by all processes).

Every change of a job's state that two processes could race on (submitting against the queue's
bound, the trainer claiming a job, a cancel) happens under one file lock in the registry, so the
bound and the positions in the queue are exact across API servers and replicas. Samples are
safetensors files written from numpy (no torch: a CPU serving replica queues jobs for a trainer
elsewhere); the trainer reads them into torch.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path

import numpy as np
from filelock import FileLock
from pydantic import BaseModel, Field
from safetensors.numpy import load_file, save_file

from model.atomic import atomic_file, atomic_write_bytes
from model.finetune_options import FinetuneOptions
from model.registry import RECORD_ID_PATTERN, Registry, new_record_id


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"  # a new version was published and activated
    REJECTED = "rejected"  # trained, but the gate kept the live model
    FAILED = "failed"
    CANCELLED = "cancelled"  # DELETE /admin/jobs/{id}: nothing was published


FINISHED_STATES = (JobState.SUCCEEDED, JobState.REJECTED, JobState.FAILED, JobState.CANCELLED)


class JobRecord(BaseModel):
    job_id: str
    state: JobState
    created: float
    updated: float
    samples: int
    source: str
    options: FinetuneOptions
    parent_version: str | None = None
    produced_version: str | None = None
    progress: dict = Field(default_factory=dict, description="epoch, epochs, loss")
    metrics_before: dict = Field(default_factory=dict)
    metrics_after: dict = Field(default_factory=dict)
    shadow: dict | None = Field(None, description="shadow evaluation beside the live model: traffic and reviewed "
                                                  "counts, agreement, confidence shift, accuracies, p-value, decision")
    message: str = ""


PENDING_STATES = (JobState.QUEUED, JobState.RUNNING)

CANCELLING = "cancelling: stops at the next training batch; nothing will be published"

class QueueFull(Exception):
    """As many jobs are queued or running as the bound allows."""


class JobFinished(Exception):
    """The job has ended already; there is nothing to cancel."""


class JobStore:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with FileLock(str(self.registry.jobs_lock_path)):  # a lock object per call: none crosses a fork
            yield

    def _path(self, job_id: str) -> Path:
        if not RECORD_ID_PATTERN.match(job_id):
            raise KeyError(job_id)
        return self.registry.job_path(job_id)

    def create(self, images: np.ndarray, labels: np.ndarray, options: FinetuneOptions, source: str,
               max_pending: int, job_id: str | None = None) -> tuple[JobRecord, int]:
        """Queue a job and say how many are ahead of it. Samples first, then the record: a job is
        visible only once its samples are complete. Raises QueueFull at ``max_pending``. ``job_id``:
        one the caller made (``new_record_id``) and recorded elsewhere first."""
        with self._locked():
            ahead = self.pending_count()
            if ahead >= max_pending:
                raise QueueFull(ahead)
            job_id = job_id or new_record_id()
            with atomic_file(self.registry.samples_path(job_id)) as tmp:
                save_file({"images": np.ascontiguousarray(images, dtype=np.uint8),
                           "labels": np.asarray(labels, dtype=np.int64)}, str(tmp))
            now = time.time()
            record = JobRecord(job_id=job_id, state=JobState.QUEUED, created=now, updated=now, samples=len(labels),
                               source=source, options=options)
            self.save(record)
        return record, ahead

    def save(self, record: JobRecord) -> None:
        record.updated = time.time()
        atomic_write_bytes(self._path(record.job_id), record.model_dump_json(indent=2).encode())

    def get(self, job_id: str) -> JobRecord:
        try:
            return self._as_seen(JobRecord.model_validate_json(self._path(job_id).read_text()))
        except FileNotFoundError:
            raise KeyError(job_id) from None

    def all(self) -> list[JobRecord]:
        records = []
        for path in self.registry.job_paths():
            try:
                records.append(self._as_seen(JobRecord.model_validate_json(path.read_text())))
            except (OSError, ValueError):
                continue
        return sorted(records, key=lambda r: (r.created, r.job_id))

    def _as_seen(self, record: JobRecord) -> JobRecord:
        """A running job asked to stop says so (the trainer owns its record and ends it)."""
        if record.state == JobState.RUNNING and self.cancel_requested(record.job_id):
            record.message = CANCELLING
        return record

    def pending_count(self) -> int:
        return sum(1 for r in self.all() if r.state in PENDING_STATES)

    def claim_next(self) -> JobRecord | None:
        """The trainer's side: the oldest queued job, now marked running (none: None)."""
        with self._locked():
            queued = [r for r in self.all() if r.state == JobState.QUEUED]
            if not queued:
                return None
            record = queued[0]
            record.state, record.message = JobState.RUNNING, "training"
            self.save(record)
            return record

    def cancel(self, job_id: str) -> JobRecord:
        """A queued job is cancelled at once; a running one is asked to stop at its next batch
        (``get`` and ``all`` say so until the trainer ends it). Raises KeyError, JobFinished."""
        with self._locked():
            record = self.get(job_id)
            if record.state in FINISHED_STATES:
                raise JobFinished(record.state)
            if record.state == JobState.QUEUED:
                record.state, record.message = JobState.CANCELLED, "cancelled before it ran; nothing was published"
                self.save(record)
                self.registry.samples_path(job_id).unlink(missing_ok=True)
            else:
                atomic_write_bytes(self.registry.cancel_path(job_id), b"", durable=False)
                record.message = CANCELLING
            return record

    def cancel_requested(self, job_id: str) -> bool:
        return self.registry.cancel_path(job_id).exists()

    def clear_cancel(self, job_id: str) -> None:
        self.registry.cancel_path(job_id).unlink(missing_ok=True)

    def load_samples(self, job_id: str) -> tuple[np.ndarray, np.ndarray]:
        tensors = load_file(str(self.registry.samples_path(job_id)))
        return tensors["images"], tensors["labels"]
