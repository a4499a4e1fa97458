"""Which processes hold a warmed model, and which version each serves, told through small
files in the run directory.

Each model-holding process (an API server on CPU, an inference worker otherwise) writes
``ready/<role>-<index>.json`` when its model is warm and again after every swap (with a
``swap_problem`` while the active version cannot be swapped in), or, while it cannot serve, a
file whose ``problem`` says why; the supervisor removes the file of a process
that died. ``/ready``, V2 readiness and metadata, ``/metrics`` and activation (in any API
server) read them through :func:`report`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from fastapi import FastAPI

from model.atomic import atomic_write_bytes
from model.registry import open_registry
from service.settings import settings_of


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


def report(app: FastAPI) -> dict:
    """What /ready says, and what V2 readiness, model metadata, /metrics and activation follow.

    ``ready``: every expected holder has a warmed model. ``active_version``: the registry's
    ACTIVE. ``converged``: ready, and every holder serves the active version (false for the
    fraction of a second a swap takes). ``serving_versions``: what the holders serve now;
    ``model_version``: the active version once they all serve it, None until then.
    ``problems``: why a holder that is up cannot serve (it counts as missing), or cannot swap to
    the active version (it serves the one it has: ready, not converged).
    """
    expected: list[tuple[str, int]] = app.state.model_holders
    states = read_all(settings_of(app).run_dir)
    holders = [state for state in states if "problem" not in state]
    problems = {f"{s['role']} {s['index']}": s.get("problem") or s["swap_problem"] for s in states
                if "problem" in s or "swap_problem" in s}
    present = {(h["role"], h["index"]) for h in holders}
    missing = [f"{role} {index}" for role, index in expected if (role, index) not in present]
    active = open_registry(settings_of(app).registry).active_version()
    serving = sorted({h["model_version"] for h in holders})
    body = {"ready": not missing, "holders_ready": len(expected) - len(missing), "holders_expected": len(expected),
            "missing": missing, "active_version": active, "serving_versions": serving,
            "converged": not missing and serving == [active], "holders": holders,
            "model_version": active if not missing and serving == [active] else None}
    if problems:  # e.g. a version without model.onnx, and no torch to export one
        body.update(problems=problems, reason="; ".join(sorted(set(problems.values()))))
    if holders:
        first = holders[0]
        body.update(runtime=first["runtime"], runtime_reason=first["runtime_reason"])
    return body


def behind(report_body: dict, version: str) -> list[str]:
    """The holders (``"role index"``) of a report not serving ``version`` yet, missing ones included."""
    return report_body["missing"] + [f"{h['role']} {h['index']}" for h in report_body["holders"]
                                     if h["model_version"] != version]
