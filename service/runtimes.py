"""torch.compile and ONNX Runtime behind one small interface, and the choice between them.

A runtime turns a uint8 batch [n,28,28] (white digit on black) into probabilities [n,10].
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from model.data import MNIST_MEAN, MNIST_STD
from model.export import INPUT_NAME, OUTPUT_NAME, ort_session
from model.publish import ensure_onnx
from model.registry import Registry

log = logging.getLogger("digits.runtime")


class Runtime(Protocol):
    name: str
    version: str
    arch: str

    def probabilities(self, pixels: np.ndarray) -> np.ndarray: ...


class CompileFailure(RuntimeError):
    pass


class ProbabilityHead(nn.Module):
    """uint8 pixels in, probabilities out: normalization and softmax fuse into the compiled graph."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels.float().unsqueeze(1) / 255.0 - MNIST_MEAN) / MNIST_STD
        return torch.softmax(self.net(x), dim=1)


class CompiledTorchRuntime:
    """torch.compile'd model; batches are padded up to fixed bucket sizes so every graph is reused."""

    name = "torch-compile"

    def __init__(self, net: nn.Module, version: str, arch: str, device: str, buckets: list[int],
                 fail_compile: bool = False) -> None:
        self.version, self.arch, self.device, self.buckets = version, arch, torch.device(device), sorted(buckets)
        self.net = net.to(self.device).eval()
        self.compiled = torch.compile(ProbabilityHead(self.net), dynamic=False)
        self.fail_compile = fail_compile

    def _bucket(self, n: int) -> int:
        for size in self.buckets:
            if size >= n:
                return size
        raise ValueError(f"batch of {n} exceeds the largest bucket {self.buckets[-1]}")

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        if self.fail_compile:
            raise CompileFailure("torch.compile disabled by DIGITS_TEST_FAIL_COMPILE (test setting)")
        n = len(pixels)
        padded = np.zeros((self._bucket(n), 28, 28), dtype=np.uint8)
        padded[:n] = pixels
        with torch.inference_mode():
            out = self.compiled(torch.from_numpy(padded).to(self.device, non_blocking=True))
        return out[:n].float().cpu().numpy()

    def warm_up(self, buckets: list[int] | None = None) -> None:
        for size in buckets or self.buckets:
            started = time.perf_counter()
            self.probabilities(np.zeros((size, 28, 28), dtype=np.uint8))
            log.info("compiled bucket %d in %.1f s", size, time.perf_counter() - started)

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: str) -> None:
        """Copy new weights into the already-compiled module: same tensors, so no recompilation."""
        with torch.no_grad():
            for name, tensor in self.net.state_dict().items():
                tensor.copy_(state_dict[name])
        self.version = version


class OnnxRuntime:
    name = "onnxruntime"

    def __init__(self, path: Path, version: str, arch: str, threads: int | None = None,
                 device: str = "cpu") -> None:
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else None
        self.session = ort_session(path, providers=providers, threads=threads)
        self.version, self.arch = version, arch
        self.providers = self.session.get_providers()

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        x = (pixels.astype(np.float32)[:, None] / 255.0 - MNIST_MEAN) / MNIST_STD
        logits = self.session.run([OUTPUT_NAME], {INPUT_NAME: x.astype(np.float32, copy=False)})[0]
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        return exp / exp.sum(axis=1, keepdims=True)


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


@dataclass
class Choice:
    runtime: Runtime
    reason: str  # for people: logs and /ready
    code: str  # for /metrics: configured | measured | cuda | fallback


def open_onnx(
    registry: Registry, version: str, threads: int, device: str, data_dir: Path | None = None
) -> OnnxRuntime:
    """ONNX Runtime session for a version; a missing or corrupt model.onnx is re-exported."""
    manifest = registry.get(version)
    path = ensure_onnx(registry, version, data_dir)
    return OnnxRuntime(path, version, manifest.arch, threads=threads, device=device)


def choose_runtime(
    registry: Registry, version: str, mode: str, device: str, buckets: list[int], threads: int,
    measure_runs: int = 20, fail_compile: bool = False, data_dir: Path | None = None,
) -> Choice:
    """Build and warm the runtime for ``mode`` (auto | torch | onnx); explain the choice.

    auto: CUDA -> torch.compile. CPU -> whichever of torch.compile and ONNX Runtime measured
    faster at warm-up. Whenever compiling fails, ONNX Runtime serves instead.
    """
    if mode == "onnx":
        return Choice(open_onnx(registry, version, threads, device, data_dir), "DIGITS_RUNTIME=onnx", "configured")
    model, manifest = registry.load_model(version)
    try:
        compiled = CompiledTorchRuntime(model, version, manifest.arch, device, buckets, fail_compile)
        largest = buckets[-1]
        compiled.warm_up([largest])
    except Exception as exc:
        log.exception("torch.compile failed; falling back to ONNX Runtime")
        return Choice(open_onnx(registry, version, threads, device, data_dir),
                      f"torch.compile failed ({exc}); fallback", "fallback")
    if mode == "auto" and not device.startswith("cuda"):
        onnx_runtime = open_onnx(registry, version, threads, device, data_dir)
        timings = {
            rt.name: sum(time_runtime(rt, np.zeros((n, 28, 28), np.uint8), measure_runs) for n in (1, largest))
            for rt in (compiled, onnx_runtime)
        }
        figures = ", ".join(f"{name} {seconds * 1e3:.2f} ms" for name, seconds in timings.items())
        if timings[OnnxRuntime.name] < timings[CompiledTorchRuntime.name]:
            return Choice(onnx_runtime, f"auto on CPU: measured batch 1 + batch {largest}: {figures}", "measured")
        reason, code = f"auto on CPU: measured batch 1 + batch {largest}: {figures}", "measured"
    else:
        reason, code = ("auto on CUDA", "cuda") if mode == "auto" else ("DIGITS_RUNTIME=torch", "configured")
    try:
        compiled.warm_up([b for b in buckets if b != largest])
    except Exception as exc:
        log.exception("torch.compile failed during warm-up; falling back to ONNX Runtime")
        return Choice(open_onnx(registry, version, threads, device, data_dir),
                      f"torch.compile failed ({exc}); fallback", "fallback")
    return Choice(compiled, reason, code)
