"""Stored user corrections (28x28 digit, true label) for a later fine-tune, within bounds.

The store is bounded in samples and bytes. When full it refuses (507) rather than evicting:
an accepted correction is never lost, and a flood cannot push out what others sent. An
operator empties it (fine-tune with ``source: feedback``, then clear ``feedback/``).

Counting is O(1): the registry's feedback index holds the count and bytes, updated under a
file lock (shared by all API-server processes and replicas on the registry) together with
each write. A missing index (a fresh or emptied directory) is rebuilt by one scan.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
from filelock import FileLock
from safetensors.numpy import load_file, save

from model.atomic import atomic_write_bytes
from model.registry import Registry, new_record_id
from service.http.errors import ClientError


def encode_sample(pixels: np.ndarray, label: int) -> bytes:
    return save({"image": np.ascontiguousarray(pixels, dtype=np.uint8), "label": np.array([label], dtype=np.int64)})


def read_sample(path: Path) -> tuple[np.ndarray, int]:
    """(uint8 [28,28] digit, label) of one stored sample."""
    tensors = load_file(str(path))
    return tensors["image"], int(tensors["label"][0])


SAMPLE_BYTES = len(encode_sample(np.zeros((28, 28), np.uint8), 0))  # every sample has this size


class Usage(NamedTuple):
    samples: int
    bytes: int


class FeedbackStore:
    def __init__(self, registry: Registry, max_samples: int, max_bytes: int) -> None:
        self.registry = registry
        self.max_samples, self.max_bytes = max_samples, max_bytes

    def usage(self) -> Usage:
        """Samples and bytes stored, from the index (one small read)."""
        try:
            return Usage(**json.loads(self.registry.feedback_index.read_bytes()))
        except FileNotFoundError:
            with FileLock(self.registry.feedback_lock_path):
                return self._usage_locked()
        except (ValueError, TypeError):  # unreadable index: rebuild it
            with FileLock(self.registry.feedback_lock_path):
                return self._recount()

    def check_room(self) -> Usage:
        """507 when one more sample would pass a bound (a cheap early check; ``add`` checks again)."""
        usage = self.usage()
        self._refuse_if_full(usage, SAMPLE_BYTES)
        return usage

    def add(self, pixels: np.ndarray, label: int) -> tuple[str, Usage]:
        """Store one sample; its id and the store's usage after it."""
        data = encode_sample(pixels, label)
        sample_id = new_record_id()
        with FileLock(self.registry.feedback_lock_path):
            usage = self._usage_locked()
            self._refuse_if_full(usage, len(data))
            atomic_write_bytes(self.registry.feedback_path(sample_id), data)
            usage = Usage(usage.samples + 1, usage.bytes + len(data))
            self._write_index(usage)
        return sample_id, usage

    def load_all(self) -> tuple[np.ndarray, np.ndarray]:
        images, labels = [], []
        for path in self.registry.feedback_paths():
            image, label = read_sample(path)
            images.append(image)
            labels.append(label)
        return np.asarray(images, dtype=np.uint8).reshape(-1, 28, 28), np.asarray(labels, dtype=np.int64)

    def _refuse_if_full(self, usage: Usage, size: int) -> None:
        if usage.samples + 1 > self.max_samples or usage.bytes + size > self.max_bytes:
            raise ClientError(
                507, "feedback_full",
                f"the feedback store is full ({usage.samples:,} samples, {usage.bytes:,} bytes; limits "
                f"{self.max_samples:,} samples, {self.max_bytes:,} bytes): an operator fine-tunes on it and "
                "empties it, or raises DIGITS_FEEDBACK_MAX_SAMPLES / DIGITS_FEEDBACK_MAX_BYTES",
            )

    # ---------------------------------------------------------- under the lock

    def _usage_locked(self) -> Usage:
        try:
            return Usage(**json.loads(self.registry.feedback_index.read_bytes()))
        except (FileNotFoundError, ValueError, TypeError):
            return self._recount()

    def _recount(self) -> Usage:
        paths = self.registry.feedback_paths()
        usage = Usage(len(paths), sum(path.stat().st_size for path in paths))
        self._write_index(usage)
        return usage

    def _write_index(self, usage: Usage) -> None:
        atomic_write_bytes(self.registry.feedback_index, json.dumps(usage._asdict()).encode())
