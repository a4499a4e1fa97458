"""How an API server gets predictions: from its own model on CPU, or from LitServe's workers.

Routes (``/predict``, the V2 protocol over REST and gRPC) call ``predictor_of(app)`` and never
know which one serves them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from fastapi import FastAPI

from service.http.errors import ClientError
from service.inference import litserve_adapter as adapter
from service.inference import readiness
from service.inference.model_slot import ModelSlot, ModelUnavailable
from service.inference.worker import ItemResult, WorkItem
from service.loop.canary import check_pinned_answer

log = logging.getLogger("digits.predictor")
WORKER_WATCH_SECONDS = 0.1


@dataclass(frozen=True)
class Prediction:
    probabilities: np.ndarray  # float32 [n,10], rows sum to 1
    model_version: str
    runtime: str


class Predictor(Protocol):
    @property
    def model_version(self) -> str:
        """The version that answers now; "" while no model holder has announced one."""

    async def predict(self, pixels: np.ndarray, pin: str | None = None) -> Prediction:
        """uint8 [n,28,28], white digit on black; ``pin``: the version asked for by name (checked
        by ``service.loop.canary.check_pin``). Raises ClientError (503, 504, 500) when no answer comes."""


def serve_with(app: FastAPI, predictor: Predictor) -> None:
    """Set the predictor this API server's routes call (the model lifespan does, before any request)."""
    app.state.predictor = predictor


def predictor_of(app: FastAPI) -> Predictor:
    """The predictor ``serve_with`` set: the one accessor for /predict, V2 REST and gRPC."""
    return app.state.predictor


class InProcessPredictor:
    """ONNX Runtime in this API server: no hop, no batching window. The call runs on the event
    loop: at ~70 us per image it costs less than handing it to a thread."""

    def __init__(self, slot: ModelSlot) -> None:
        self.slot = slot

    async def predict(self, pixels: np.ndarray, pin: str | None = None) -> Prediction:
        try:
            probabilities, serving = self.slot.predict(pixels, pin)
        except ModelUnavailable as exc:
            raise ClientError(503, "model_unavailable", f"no model is served yet: {exc}") from None
        check_pinned_answer(pin, serving.version)
        return Prediction(probabilities, serving.version, serving.runtime.name)

    @property
    def model_version(self) -> str:
        serving = self.slot.serving
        return serving.version if serving is not None else ""


class WorkerPredictor:
    """Each call is one item on the least-loaded inference worker's queue; the worker batches
    items from every API server. A worker's death answers the requests it held (503)."""

    def __init__(self, server: adapter.DigitServer, run_dir: Path) -> None:
        self.server, self.run_dir = server, run_dir
        self.in_flight = [0] * server.worker_count()
        self.worker_pids: dict[int, int] = {}
        self.model_version = ""  # what the workers announce (their readiness files), as /ready reports

    async def predict(self, pixels: np.ndarray, pin: str | None = None) -> Prediction:
        worker = self._least_loaded_ready_worker()
        self.in_flight[worker] += 1
        try:
            result: ItemResult = await adapter.submit(
                self.server, worker, WorkItem(pixels.tobytes(), len(pixels), time.monotonic(), pin or ""))
        except adapter.WorkerGone as exc:
            raise ClientError(503, "worker_died", f"{exc}; retry: a new worker is starting") from None
        except adapter.QueueTimeout as exc:
            raise ClientError(504, "timeout", f"{exc}; retry") from None
        except adapter.WorkerFailed as exc:
            raise ClientError(500, "inference_failed", f"inference failed: {exc}") from None
        finally:
            self.in_flight[worker] -= 1
        if result.error is not None:
            raise ClientError(500, "inference_failed", result.error)
        check_pinned_answer(pin, result.model_version)
        return Prediction(result.probabilities, result.model_version, result.runtime)

    def _least_loaded_ready_worker(self) -> int:
        """A worker with a warm model; none (one is starting or being replaced, which under load
        can take many seconds): a 503 at once, not a request left waiting in a dead queue."""
        if not self.worker_pids:
            self.refresh_workers()  # the watcher may not have ticked since the workers came up
        ready = [index for index in range(len(self.in_flight)) if index in self.worker_pids]
        if not ready:
            raise ClientError(503, "no_worker", "no inference worker is ready (starting or being replaced); retry",
                              headers={"Retry-After": "1"})
        return min(ready, key=self.in_flight.__getitem__)

    async def watch_workers(self) -> None:
        while True:
            await asyncio.sleep(WORKER_WATCH_SECONDS)
            self.refresh_workers()

    def refresh_workers(self) -> None:
        """Follow the workers' readiness files: the version they serve, and dead workers (their
        file goes or their pid changes), whose held requests are failed."""
        workers = [s for s in readiness.read_all(self.run_dir) if s["role"] == "worker"]
        alive = {s["index"]: s["pid"] for s in workers}
        if workers:
            self.model_version = workers[0]["model_version"]
        for index, pid in self.worker_pids.items():
            if alive.get(index) != pid:
                failed = adapter.fail_requests_held_by(self.server, index)
                if failed:
                    log.error("inference worker %d is gone; answered its %d request(s) with 503", index, failed)
        self.worker_pids = alive
