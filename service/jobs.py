"""Fine-tune job records and their samples, persisted in the registry (shared by all processes).

Samples are safetensors files written from numpy (no torch: a CPU serving replica queues jobs
for a trainer elsewhere); the trainer reads them into torch."""

from __future__ import annotations

import time

import numpy as np
from safetensors.numpy import load_file, save_file

from model.atomic import atomic_file, atomic_write_bytes
from model.registry import RECORD_ID_PATTERN, Registry, new_record_id
from service.schemas import FinetuneOptions, JobRecord, JobState


class JobStore:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def _path(self, job_id: str):
        if not RECORD_ID_PATTERN.match(job_id):
            raise KeyError(job_id)
        return self.registry.job_path(job_id)

    def create(self, images: np.ndarray, labels: np.ndarray, options: FinetuneOptions, source: str) -> JobRecord:
        """Store the samples, then the record: a job is visible only once its samples are complete."""
        job_id = new_record_id()
        with atomic_file(self.registry.samples_path(job_id)) as tmp:
            save_file(
                {"images": np.ascontiguousarray(images, dtype=np.uint8),
                 "labels": np.ascontiguousarray(labels, dtype=np.int64)},
                str(tmp),
            )
        now = time.time()
        record = JobRecord(job_id=job_id, state=JobState.QUEUED, created=now, updated=now, samples=len(labels),
                           source=source, options=options)
        self.save(record)
        return record

    def save(self, record: JobRecord) -> None:
        record.updated = time.time()
        atomic_write_bytes(self._path(record.job_id), record.model_dump_json(indent=2).encode())

    def get(self, job_id: str) -> JobRecord:
        try:
            return JobRecord.model_validate_json(self._path(job_id).read_text())
        except FileNotFoundError:
            raise KeyError(job_id) from None

    def all(self) -> list[JobRecord]:
        records = []
        for path in self.registry.job_paths():
            try:
                records.append(JobRecord.model_validate_json(path.read_text()))
            except (OSError, ValueError):
                continue
        return sorted(records, key=lambda r: (r.created, r.job_id))

    def queued(self) -> list[JobRecord]:
        return [r for r in self.all() if r.state == JobState.QUEUED]

    def pending_count(self) -> int:
        return sum(1 for r in self.all() if r.state in (JobState.QUEUED, JobState.RUNNING))

    def load_samples(self, job_id: str) -> tuple[np.ndarray, np.ndarray]:
        tensors = load_file(str(self.registry.samples_path(job_id)))
        return tensors["images"], tensors["labels"]
