"""Which processes hold a warmed model, told through small files in the run directory.

Each model-holding process (an API server on CPU, an inference worker otherwise) writes
``ready/<role>-<index>.json`` when its model is warm and again after every swap, or, while it
cannot serve, a file whose ``problem`` says why; the supervisor removes the file of a process
that died. ``/ready`` (in any API server) reads them.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from model.atomic import atomic_write_bytes


def directory(run_dir: Path) -> Path:
    return Path(run_dir) / "ready"


def clear(run_dir: Path) -> None:
    """At start: a previous run's files must not make a new server look ready."""
    shutil.rmtree(directory(run_dir), ignore_errors=True)
    directory(run_dir).mkdir(parents=True, exist_ok=True)


def path_of(run_dir: Path, role: str, index: int) -> Path:
    return directory(run_dir) / f"{role}-{index}.json"


def write(run_dir: Path, role: str, index: int, **state: object) -> None:
    payload = {"role": role, "index": index, "pid": os.getpid(), "updated": time.time(), **state}
    atomic_write_bytes(path_of(run_dir, role, index), json.dumps(payload).encode(), durable=False)


def remove(run_dir: Path, role: str, index: int) -> None:
    path_of(run_dir, role, index).unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_all(run_dir: Path) -> list[dict]:
    """Every model holder's state whose process is still alive, sorted by role and index."""
    states = []
    for path in sorted(directory(run_dir).glob("*.json")):
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # being replaced right now; the next poll sees it
        if pid_alive(int(state.get("pid", -1))):
            states.append(state)
    return states
