"""Fine-tune job records and their samples, persisted in the registry (shared by all processes)."""

from __future__ import annotations

import os
import time
import uuid

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from model.registry import Registry, atomic_write_bytes
from service.schemas import FinetuneOptions, JobRecord

FINISHED = ("succeeded", "rejected", "failed")


class JobStore:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def _path(self, job_id: str):
        if not job_id.isalnum():
            raise KeyError(job_id)
        return self.registry.jobs_dir / f"{job_id}.json"

    def samples_path(self, job_id: str):
        return self.registry.samples_dir / f"{job_id}.safetensors"

    def create(self, images: np.ndarray, labels: np.ndarray, options: FinetuneOptions, source: str) -> JobRecord:
        """Store the samples, then the record: a job is visible only once its samples are complete."""
        job_id = time.strftime("%Y%m%d%H%M%S") + uuid.uuid4().hex[:8]
        tmp = self.samples_path(job_id).with_suffix(f".{os.getpid()}.tmp")
        save_file(
            {"images": torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)),
             "labels": torch.from_numpy(np.asarray(labels, dtype=np.int64))},
            str(tmp),
        )
        os.replace(tmp, self.samples_path(job_id))
        now = time.time()
        record = JobRecord(job_id=job_id, state="queued", created=now, updated=now, samples=len(labels),
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
        for path in self.registry.jobs_dir.glob("*.json"):
            try:
                records.append(JobRecord.model_validate_json(path.read_text()))
            except (OSError, ValueError):
                continue
        return sorted(records, key=lambda r: (r.created, r.job_id))

    def queued(self) -> list[JobRecord]:
        return [r for r in self.all() if r.state == "queued"]

    def pending_count(self) -> int:
        return sum(1 for r in self.all() if r.state in ("queued", "running"))

    def load_samples(self, job_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = load_file(str(self.samples_path(job_id)))
        return tensors["images"], tensors["labels"]
