"""The LitAPI run by LitServe's inference workers: batch, predict, unbatch.

Used when requests are batched across API servers (CUDA, or ``DIGITS_RUNTIME=torch``). What
crosses the queue is already validated: a :class:`WorkItem` of uint8 digits, so a client's
mistake never reaches a batch. If the model fails on a batch, each item is retried alone, so
one poisonous input fails only its own request.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple

import litserve as ls
import numpy as np

from service import metrics, readiness
from service.settings import Settings

log = logging.getLogger("digits.worker")


class WorkItem(NamedTuple):
    pixels: bytes  # uint8 [count,28,28], white on black
    count: int
    enqueued_at: float  # time.monotonic(): system-wide on Linux, so comparable across processes


class ItemResult(NamedTuple):
    """What goes back for one WorkItem: probabilities [count,10], or an error message."""

    probabilities: np.ndarray | None
    model_version: str
    runtime: str
    error: str | None = None


@dataclass
class Batch:
    pixels: np.ndarray  # uint8 [sum(sizes),28,28]
    sizes: list[int]


class PredictAPI(ls.LitAPI):
    def __init__(self, settings: Settings, holds_model: bool) -> None:
        if holds_model:
            batch_timeout = 0.0 if settings.batching == "greedy" else settings.batch_timeout
            super().__init__(max_batch_size=settings.max_batch_size, batch_timeout=batch_timeout,
                             api_path="/litserve/predict")
        else:  # LitServe always starts a worker; without a model it waits on its queue (no batching loop)
            super().__init__(max_batch_size=1, api_path="/litserve/predict")
        self.settings, self.holds_model = settings, holds_model

    def setup(self, device: str) -> None:
        # LitServe stops workers with SIGTERM once the API servers have drained. Exiting through
        # Python (not the default kill) lets multiprocessing clean up after torch.compile's worker
        # pool instead of leaving semaphores behind.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        if not self.holds_model:
            return  # CPU: the model runs in the API servers; this worker only idles
        from service.litserve_adapter import process_index
        from service.logs import configure_logging
        from service.model_slot import ModelSlot
        from service.placement import runtime_options

        configure_logging(self.settings.log_level)
        index = process_index()
        options = runtime_options(self.settings, device)
        import torch

        torch.set_num_threads(options.threads)

        def announce(serving) -> None:
            readiness.write(self.settings.run_dir, "worker", index, device=options.device,
                            model_version=serving.version, runtime=serving.runtime.name,
                            runtime_reason=serving.reason)

        from model.registry import Registry

        self.slot = ModelSlot(Registry(self.settings.registry), self.settings.runtime, options,
                              self.settings.warmup_measure_runs, on_change=announce)
        announce(self.slot.serving)
        self.slot.start_watching()

    def decode_request(self, request: WorkItem) -> np.ndarray:
        metrics.queue_wait.observe(max(0.0, time.monotonic() - request.enqueued_at))
        return np.frombuffer(request.pixels, dtype=np.uint8).reshape(request.count, 28, 28)

    def batch(self, inputs: list[np.ndarray]) -> Batch:
        return Batch(np.concatenate(inputs), [len(x) for x in inputs])

    def predict(self, x: Batch | np.ndarray) -> list[ItemResult]:
        batch = x if isinstance(x, Batch) else Batch(x, [len(x)])  # max_batch_size=1: no batch()
        try:
            probabilities, serving = self.slot.predict(batch.pixels)
        except Exception as exc:
            if len(batch.sizes) > 1:  # find the item(s) that fail: each alone
                return [self.predict(item)[0] for item in self._split(batch.pixels, batch.sizes)]
            log.exception("inference failed on one request")
            return [ItemResult(None, "", "", f"inference failed: {type(exc).__name__}: {exc}")]
        return [ItemResult(p, serving.version, serving.runtime.name)
                for p in self._split(probabilities, batch.sizes)]

    @staticmethod
    def _split(array: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
        return np.split(array, np.cumsum(sizes)[:-1])

    def unbatch(self, output: list[ItemResult]) -> list[ItemResult]:
        return output

    def encode_response(self, output: list[ItemResult] | ItemResult) -> ItemResult:
        return output[0] if isinstance(output, list) else output  # max_batch_size=1: no unbatch()
