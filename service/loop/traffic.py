"""The ring of recent inputs: the 28x28 digits the model was given, for replaying a candidate.

Chunks of digits in the registry (``model/registry.py`` names them by time, writer and count),
written whole by the capture tap of every API server and replica; after each write the oldest
chunks beyond ``size`` digits are removed under a file lock. A reader sees complete chunks only.
"""

from __future__ import annotations

import numpy as np
from filelock import FileLock
from safetensors.numpy import load_file, save_file

from model.atomic import atomic_file, remove_stale_temporaries
from model.registry import Registry
from service.settings import default_of

DEFAULT_SIZE: int = default_of("traffic_ring_size")


class TrafficRing:
    def __init__(self, registry: Registry, size: int = DEFAULT_SIZE) -> None:
        self.registry, self.size = registry, size

    def append(self, images: np.ndarray) -> None:
        """Add uint8 [n,28,28] digits; the oldest beyond the ring's size go."""
        images = np.ascontiguousarray(images, dtype=np.uint8).reshape(-1, 28, 28)[-self.size:]
        if not len(images):
            return
        with atomic_file(self.registry.traffic_chunk_path(len(images)), durable=False) as tmp:
            save_file({"images": images}, str(tmp))
        with FileLock(str(self.registry.traffic_lock_path)):
            chunks = self.registry.traffic_chunks()
            total = sum(count for _, count in chunks)
            for path, count in chunks:
                if total - count < self.size:
                    break
                path.unlink(missing_ok=True)
                total -= count

    def remove_stale_temporaries(self) -> None:
        """What a writer killed mid-write left (once per process start is enough)."""
        remove_stale_temporaries(self.registry.traffic_chunk_path(1).parent)

    def recent(self, limit: int) -> np.ndarray:
        """The newest ``limit`` digits (at most the ring's size), oldest first: uint8 [n,28,28]."""
        parts, have = [], 0
        for path, _ in reversed(self.registry.traffic_chunks()):
            if have >= limit:
                break
            try:
                images = load_file(str(path))["images"]
            except (FileNotFoundError, OSError, ValueError):
                continue  # trimmed meanwhile
            parts.append(images[-(limit - have):])
            have += len(parts[-1])
        if not parts:
            return np.zeros((0, 28, 28), dtype=np.uint8)
        return np.concatenate(parts[::-1])

    def __len__(self) -> int:
        return sum(count for _, count in self.registry.traffic_chunks())
