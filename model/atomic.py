"""Writing a file so that readers and crashes never see a part of it."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(path: Path, durable: bool = True) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; on success it is fsynced (unless not
    ``durable``: scratch files) and renamed onto ``path`` (readers see the old file or the new
    one, never a part), on error it is removed::

        with atomic_file(target) as tmp:
            save_file(tensors, str(tmp))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    with atomic_file(path, durable) as tmp:
        tmp.write_bytes(data)


def remove_stale_temporaries(directory: Path, older_than: float = 60.0) -> int:
    """Remove what writers killed mid-write left in ``directory`` (their temporary files, which
    listings skip); how many. Only files older than ``older_than`` seconds: a live writer's is
    younger."""
    removed, cutoff = 0, time.time() - older_than
    for tmp in Path(directory).glob(".*.tmp"):
        try:
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()
                removed += 1
        except FileNotFoundError:
            continue  # renamed or removed meanwhile
    return removed
