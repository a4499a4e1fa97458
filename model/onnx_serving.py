"""The ONNX file a version is served from, without torch: the serving contract, ONNX Runtime
sessions, and the check that a version's model.onnx can be served as it is.

A CPU replica (the ``serve-cpu`` image) has ONNX Runtime and no torch, so nothing here imports
torch; only re-exporting a missing or outdated file does (:func:`model.publish.export_version`),
and without torch :func:`ensure_onnx` says what is wrong instead.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from model.registry import ONNX, Registry

log = logging.getLogger("digits.onnx")

INPUT_NAME = "pixels"
OUTPUT_NAME = "probabilities"
# Bumped whenever the graph's inputs or outputs change; a model.onnx with another contract is re-exported.
CONTRACT = "uint8[N,28,28] white-on-black -> float32 probabilities[N,10]"


class OnnxUnavailable(RuntimeError):
    """The version's model.onnx cannot be served as it is, and this process cannot re-export it."""


def ort_threads() -> int:
    """The CPUs this process may run on (cgroup/affinity aware), for ONNX Runtime's pool."""
    return max(1, len(os.sched_getaffinity(0)))


def ort_session(path: Path, providers: list[str] | None = None, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or ort_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    available = ort.get_available_providers()
    wanted = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return ort.InferenceSession(str(path), sess_options=options, providers=wanted)


def has_current_contract(path: Path) -> bool:
    """False for a model.onnx exported before the current input/output contract. Read by ONNX
    Runtime (the onnx package is the exporter's), unoptimised: ~4 ms, not the ~20 ms of a session."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # only the metadata is read
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    return session.get_modelmeta().custom_metadata_map.get("contract") == CONTRACT


def onnx_problem(registry: Registry, version: str) -> str | None:
    """Why the version's model.onnx cannot be served as it is, or None when it can."""
    path = registry.onnx_path(version)
    if not path.is_file():
        return f"{version} has no model.onnx"
    if not registry.verify_artifact(version, ONNX):
        return f"model.onnx of {version} does not match the hash in its manifest (corrupt or replaced)"
    if not has_current_contract(path):
        return f"model.onnx of {version} predates the uint8-in, probabilities-out contract"
    return None


def ensure_onnx(registry: Registry, version: str, data_dir: Path | None = None) -> Path:
    """The version's model.onnx, re-exported from the weights when missing, corrupt, or exported
    for an older contract. Without torch, raises :class:`OnnxUnavailable` saying how to fix it."""
    problem = onnx_problem(registry, version)
    if problem is None:
        return registry.onnx_path(version)
    try:
        from model.publish import export_version
    except ImportError as exc:
        raise OnnxUnavailable(
            f"{problem}, and this process cannot export one: torch is not installed ({exc}). Export it where "
            f"torch is (the trainer image): `python -m model --registry {registry.root} export --version {version}`, "
            "or activate a version that has one"
        ) from exc
    log.warning("%s; re-exporting it from the weights", problem)
    export_version(registry, version, data_dir)
    return registry.onnx_path(version)
