"""How an API server gets predictions: from its own model on CPU, or from LitServe's workers.

Routes (``/predict``, the V2 protocol) call ``app.state.predictor.predict(pixels)`` and never
know which one serves them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service import litserve_adapter as adapter
from service import readiness
from service.errors import ClientError
from service.model_slot import ModelSlot, ModelUnavailable
from service.worker import ItemResult, WorkItem

log = logging.getLogger("digits.predictor")
WORKER_WATCH_SECONDS = 0.1


@dataclass(frozen=True)
class Prediction:
    probabilities: np.ndarray  # float32 [n,10], rows sum to 1
    model_version: str
    runtime: str


class Predictor(Protocol):
    async def predict(self, pixels: np.ndarray) -> Prediction:
        """uint8 [n,28,28], white digit on black."""


class InProcessPredictor:
    """ONNX Runtime in this API server: no hop, no batching window. The call runs on the event
    loop: at ~70 us per image it costs less than handing it to a thread."""

    def __init__(self, slot: ModelSlot) -> None:
        self.slot = slot

    async def predict(self, pixels: np.ndarray) -> Prediction:
        try:
            probabilities, serving = self.slot.predict(pixels)
        except ModelUnavailable as exc:
            raise ClientError(503, "model_unavailable", f"no model is served yet: {exc}") from None
        return Prediction(probabilities, serving.version, serving.runtime.name)

    @property
    def model_version(self) -> str:
        serving = self.slot.serving
        return serving.version if serving is not None else ""


class WorkerPredictor:
    """Each call is one item on the least-loaded inference worker's queue; the worker batches
    items from every API server. A worker's death answers the requests it held (503)."""

    def __init__(self, server: adapter.DigitServer, run_dir) -> None:
        self.server, self.run_dir = server, run_dir
        self.in_flight = [0] * server.worker_count()
        self.worker_pids: dict[int, int] = {}
        self.model_version = ""

    async def predict(self, pixels: np.ndarray) -> Prediction:
        worker = min(range(len(self.in_flight)), key=self.in_flight.__getitem__)
        self.in_flight[worker] += 1
        try:
            response, status = await adapter.submit(
                self.server, worker, WorkItem(pixels.tobytes(), len(pixels), time.monotonic()))
        except adapter.WorkerGone as exc:
            raise ClientError(503, "worker_died", f"{exc}; retry: a new worker is starting") from None
        finally:
            self.in_flight[worker] -= 1
        if adapter.is_error(status):
            raise _worker_error(response)
        result: ItemResult = response
        if result.error is not None:
            raise ClientError(500, "inference_failed", result.error)
        self.model_version = result.model_version
        return Prediction(result.probabilities, result.model_version, result.runtime)

    async def watch_workers(self) -> None:
        """Notice dead workers (their readiness file goes or their pid changes) and fail the
        requests they held."""
        while True:
            await asyncio.sleep(WORKER_WATCH_SECONDS)
            alive = {s["index"]: s["pid"] for s in readiness.read_all(self.run_dir) if s["role"] == "worker"}
            for index, pid in self.worker_pids.items():
                if alive.get(index) != pid:
                    failed = adapter.fail_requests_held_by(self.server, index)
                    if failed:
                        log.error("inference worker %d is gone; answered its %d request(s) with 503", index, failed)
            self.worker_pids = alive


def _worker_error(response: object) -> ClientError:
    """LitServe's error statuses: its queue timeout (an HTTPException 504) or a pickled exception."""
    with contextlib.suppress(Exception):
        response = pickle.loads(response) if isinstance(response, bytes) else response
    status = getattr(response, "status_code", 500)
    if status == 504:
        return ClientError(504, "timeout", "the request waited too long for an inference worker; retry")
    return ClientError(500, "inference_failed", f"inference failed: {response}")
