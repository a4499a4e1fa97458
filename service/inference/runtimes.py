"""torch.compile and ONNX Runtime behind one small interface, and the choice between them.

A runtime turns a uint8 batch [n,28,28] (white digit on black) into probabilities [n,10].
Both run :class:`model.nets.ProbabilityHead`: compiled by torch, or exported to ONNX.

No torch here: the compiled runtime (:mod:`service.inference.torch_runtime`) is imported only when it is
built, so ONNX Runtime serves where torch is not installed (the ``serve-cpu`` image).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from model.onnx_serving import INPUT_NAME, OUTPUT_NAME, ensure_onnx, ort_session
from model.registry import Registry
from service import metrics
from service.inference.cores import CoreShare

log = logging.getLogger("digits.runtime")


class Runtime(Protocol):
    name: str
    version: str
    arch: str

    def probabilities(self, pixels: np.ndarray) -> np.ndarray: ...


TORCH_COMPILE = "torch-compile"  # the compiled runtime's name


def is_compiled(runtime: Runtime) -> bool:
    return runtime.name == TORCH_COMPILE


class OnnxRuntime:
    """``cores`` (API servers on CPU): large batches are split over the cores other API servers leave idle."""

    name = "onnxruntime"

    def __init__(self, path: Path, version: str, arch: str, threads: int, device: str = "cpu",
                 cores: CoreShare | None = None) -> None:
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else None
        self.session = ort_session(path, providers=providers, threads=threads)
        self.version, self.arch, self.cores = version, arch, cores

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        if self.cores is None:
            return self.run(pixels)
        return self.cores.compute(pixels, self.run)

    def run(self, pixels: np.ndarray) -> np.ndarray:
        """The session on this thread (one intra-op thread in an API server)."""
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]


@dataclass(frozen=True)
class RuntimeOptions:
    """What building a runtime needs besides the registry and the version."""

    device: str  # "cpu" or "cuda:N"
    threads: int  # intra-op threads
    buckets: tuple[int, ...]  # compiled batch sizes
    data_dir: Path | None = None  # MNIST, for the parity check of a re-export
    cores: CoreShare | None = None  # an API server's share of idle cores, for ONNX Runtime's large batches


def build_runtime(kind: str, registry: Registry, version: str, options: RuntimeOptions) -> Runtime:
    """The one way a runtime is made: ``kind`` is ``torch`` (compiled, not yet warmed) or ``onnx``
    (a missing, corrupt or outdated model.onnx is re-exported first)."""
    manifest = registry.get(version)
    if kind == "onnx":
        path = ensure_onnx(registry, version, options.data_dir)
        return OnnxRuntime(path, version, manifest.arch, options.threads, options.device, options.cores)
    from service.inference.torch_runtime import CompiledTorchRuntime

    model, _ = registry.load_model(version)
    return CompiledTorchRuntime(model, version, manifest.arch, options.device, list(options.buckets))


def time_runtime(runtime: Runtime, pixels: np.ndarray, runs: int, warmup: int = 1) -> float:
    """Median seconds per call on one batch (after ``warmup`` untimed calls)."""
    for _ in range(warmup):
        runtime.probabilities(pixels)
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        runtime.probabilities(pixels)
        samples.append(time.perf_counter() - started)
    return float(np.median(samples))


@dataclass(frozen=True)
class Serving:
    """A runtime chosen to serve, and why."""

    runtime: Runtime
    reason: str  # for people: logs and /ready
    code: str  # for /metrics: configured | measured | cuda | fallback

    @property
    def version(self) -> str:
        return self.runtime.version


def fallback_to_onnx(registry: Registry, version: str, options: RuntimeOptions, why: str) -> Serving:
    """ONNX Runtime in place of a compiled model that failed (at start, warm-up or while serving)."""
    log.exception("torch.compile failed (%s); falling back to ONNX Runtime", why)
    metrics.runtime_fallbacks.inc()
    return Serving(build_runtime("onnx", registry, version, options), f"torch.compile failed ({why}); fallback",
                  "fallback")


def choose_runtime(registry: Registry, version: str, mode: str, options: RuntimeOptions,
                   measure_runs: int = 20) -> Serving:
    """Build and warm the runtime for ``mode`` (auto | torch | onnx); explain the choice.

    auto: CUDA -> torch.compile. CPU -> whichever of torch.compile and ONNX Runtime measured
    faster at warm-up. Whenever compiling fails, ONNX Runtime serves instead.
    """
    if mode == "onnx":
        return Serving(build_runtime("onnx", registry, version, options), "DIGITS_RUNTIME=onnx", "configured")
    largest = options.buckets[-1]
    try:
        compiled = build_runtime("torch", registry, version, options)
        compiled.warm_up([largest])
    except Exception as exc:
        return fallback_to_onnx(registry, version, options, str(exc))
    if mode == "auto" and not options.device.startswith("cuda"):
        onnx_runtime = build_runtime("onnx", registry, version, options)
        timings = {
            rt.name: sum(time_runtime(rt, np.zeros((n, 28, 28), np.uint8), measure_runs) for n in (1, largest))
            for rt in (compiled, onnx_runtime)
        }
        figures = ", ".join(f"{name} {seconds * 1e3:.2f} ms" for name, seconds in timings.items())
        reason, code = f"auto on CPU: measured batch 1 + batch {largest}: {figures}", "measured"
        if timings[OnnxRuntime.name] < timings[TORCH_COMPILE]:
            return Serving(onnx_runtime, reason, code)
    else:
        reason, code = ("auto on CUDA", "cuda") if mode == "auto" else ("DIGITS_RUNTIME=torch", "configured")
    try:
        compiled.warm_up([b for b in options.buckets if b != largest])
    except Exception as exc:
        return fallback_to_onnx(registry, version, options, f"during warm-up: {exc}")
    return Serving(compiled, reason, code)
