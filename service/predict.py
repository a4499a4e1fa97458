"""The predict LitAPI: batch, run, unbatch, and swap in new model versions while serving.

This module deliberately has no ``from __future__ import annotations``: LitServe reads the
annotation of ``decode_request``'s ``request`` parameter as a live object and hands it to
FastAPI, which runs :func:`service.inputs.read_digit` in the API server for every request.
"""

import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Annotated

import litserve as ls
import numpy as np
import torch
from fastapi import Depends

from model.registry import Registry
from service import metrics
from service.inputs import DigitInput, read_digit
from service.logs import configure_logging
from service.runtimes import CompiledTorchRuntime, Runtime, choose_runtime, open_onnx
from service.schemas import PredictResponse
from service.settings import Settings

log = logging.getLogger("digits.worker")
SWAP_POLL_SECONDS = 0.25


def resolve_device(requested: str, litserve_device: str) -> str:
    if requested == "cpu":
        return "cpu"
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return litserve_device if str(litserve_device).startswith("cuda") else "cuda:0"
    return "cpu"


class ModelHolder:
    """The runtime a worker serves, and the watcher that swaps in newly activated versions.

    The watcher polls the registry's ACTIVE pointer (one stat call). For the same
    architecture on torch.compile it copies the weights into the compiled module (no
    recompilation); otherwise it builds the new runtime beside the old one and swaps the
    reference. Either way the swap happens under a lock between batches.
    """

    def __init__(self, settings: Settings, device: str, worker_id: int) -> None:
        self.settings, self.device, self.worker_id = settings, device, worker_id
        self.registry = Registry(settings.registry)
        self.lock = threading.Lock()
        self.marker = self.registry.active_marker()
        version = self.registry.active_version()
        if version is None:
            raise RuntimeError(f"registry {settings.registry} has no active version; run `make train` first")
        choice = choose_runtime(
            self.registry, version, settings.runtime, device, settings.buckets(), settings.inference_threads(),
            settings.warmup_measure_runs, fail_compile=settings.test_fail_compile, data_dir=settings.data_dir,
        )
        self.runtime: Runtime = choice.runtime
        self.reason, self.reason_code = choice.reason, choice.code
        metrics.set_model_info(self.runtime.version, self.runtime.name)
        metrics.set_runtime_info(self.runtime.name, self.reason_code)
        log.info(
            "worker %s serves %s on %s with %s (%s)", worker_id, version, device, self.runtime.name, self.reason
        )
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="model-watcher", daemon=True)

    def start(self) -> None:
        self._watcher.start()

    def stop(self) -> None:
        self._stop.set()

    def predict(self, pixels: np.ndarray) -> tuple[np.ndarray, str, str]:
        with self.lock:
            runtime = self.runtime
            started = time.perf_counter()
            try:
                probabilities = runtime.probabilities(pixels)
            except Exception as exc:
                if not isinstance(runtime, CompiledTorchRuntime):
                    raise
                log.exception("compiled model failed; switching to ONNX Runtime")
                runtime = self._fall_back_to_onnx(f"torch.compile failed while serving ({exc}); fallback")
                probabilities = runtime.probabilities(pixels)
            metrics.inference_latency.labels(runtime.name).observe(time.perf_counter() - started)
            return probabilities, runtime.version, runtime.name

    def _fall_back_to_onnx(self, reason: str) -> Runtime:
        previous = (self.runtime.version, self.runtime.name)
        self.runtime = open_onnx(self.registry, self.runtime.version, self.settings.inference_threads(), self.device,
                                 self.settings.data_dir)
        metrics.set_runtime_info(self.runtime.name, "fallback", (previous[1], self.reason_code))
        self.reason, self.reason_code = reason, "fallback"
        metrics.runtime_fallbacks.inc()
        metrics.set_model_info(self.runtime.version, self.runtime.name, previous)
        write_readiness(self.settings, self.worker_id, self)
        return self.runtime

    def _watch(self) -> None:
        while not self._stop.wait(SWAP_POLL_SECONDS):
            try:
                self.check_for_new_version()
            except Exception:
                log.exception("could not swap to the newly activated version")

    def check_for_new_version(self) -> None:
        marker = self.registry.active_marker()
        if marker == self.marker:
            return
        version = self.registry.active_version()
        if version is None or version == self.runtime.version:
            self.marker = marker
            return
        started = time.perf_counter()
        manifest = self.registry.get(version)
        current = self.runtime
        previous = (current.version, current.name)
        if isinstance(current, CompiledTorchRuntime) and manifest.arch == current.arch:
            state_dict = self.registry.load_state_dict(version)
            with self.lock:
                current.load_weights(state_dict, version)
        elif isinstance(current, CompiledTorchRuntime):
            model, _ = self.registry.load_model(version)
            replacement = CompiledTorchRuntime(model, version, manifest.arch, self.device, self.settings.buckets())
            replacement.warm_up()
            with self.lock:
                self.runtime = replacement
        else:
            replacement = open_onnx(self.registry, version, self.settings.inference_threads(), self.device,
                                    self.settings.data_dir)
            with self.lock:
                self.runtime = replacement
        self.marker = marker
        metrics.model_swaps.labels(self.runtime.name).inc()
        metrics.set_model_info(version, self.runtime.name, previous)
        write_readiness(self.settings, self.worker_id, self)
        log.info("worker %s swapped %s -> %s in %.3f s", self.worker_id, previous[0], version,
                 time.perf_counter() - started)


def readiness_dir(settings: Settings) -> str:
    if settings.run_dir is None:
        raise RuntimeError("settings.run_dir must be set before the workers start")
    return os.path.join(settings.run_dir, "ready")


def write_readiness(settings: Settings, worker_id: int, holder: ModelHolder) -> None:
    """Each warmed worker leaves a small file; /ready (in the API servers) reads them."""
    directory = readiness_dir(settings)
    os.makedirs(directory, exist_ok=True)
    payload = {
        "worker": worker_id,
        "pid": os.getpid(),
        "device": holder.device,
        "model_version": holder.runtime.version,
        "runtime": holder.runtime.name,
        "runtime_reason": holder.reason,
        "updated": time.time(),
    }
    tmp = os.path.join(directory, f".worker-{worker_id}.tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f)
    os.replace(tmp, os.path.join(directory, f"worker-{worker_id}.json"))


class PredictAPI(ls.LitAPI):
    def __init__(self, settings: Settings) -> None:
        batch_timeout = 0.0 if settings.batching == "greedy" else settings.batch_timeout
        super().__init__(max_batch_size=settings.max_batch_size, batch_timeout=batch_timeout, api_path="/predict")
        self.settings = settings

    def setup(self, device: str) -> None:
        # LitServe stops workers with SIGTERM once the API servers have drained. Exiting through
        # Python (not the default kill) lets multiprocessing clean up after torch.compile's
        # worker pool instead of leaving semaphores behind.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        configure_logging(self.settings.log_level)
        torch.set_num_threads(self.settings.inference_threads())
        worker_id = int(os.environ.get("LITSERVE_WORKER_ID", "0"))
        self.holder = ModelHolder(self.settings, resolve_device(self.settings.device, device), worker_id)
        write_readiness(self.settings, worker_id, self.holder)
        self.holder.start()

    def decode_request(self, request: Annotated[DigitInput, Depends(read_digit)], context: dict) -> np.ndarray:
        context["request_id"] = request.request_id
        metrics.queue_wait.observe(max(0.0, time.monotonic() - request.enqueued_at))
        return np.frombuffer(request.pixels, dtype=np.uint8).reshape(28, 28)

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, str, str]:
        single = x.ndim == 2  # max_batch_size=1: LitServe skips batch/unbatch
        batch = x[None] if single else x
        metrics.batch_size.observe(len(batch))
        probabilities, version, runtime = self.holder.predict(batch)
        return (probabilities[0], version, runtime) if single else (probabilities, version, runtime)

    def unbatch(self, output: tuple[np.ndarray, str, str]) -> list[tuple[np.ndarray, str, str]]:
        probabilities, version, runtime = output
        return [(row, version, runtime) for row in probabilities]

    def encode_response(self, output: tuple[np.ndarray, str, str], context: dict) -> PredictResponse:
        probabilities, version, runtime = output
        digit = int(np.argmax(probabilities))
        return {  # FastAPI validates this against PredictResponse in the API server
            "digit": digit,
            "confidence": round(float(probabilities[digit]), 6),
            "probabilities": [round(float(p), 6) for p in probabilities],
            "model_version": version,
            "runtime": runtime,
            "request_id": context.get("request_id", ""),
        }
