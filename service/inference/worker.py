"""The LitAPI run by LitServe's inference workers: decode a queued request, predict a batch.

Used when requests are batched across API servers (CUDA, or ``DIGITS_RUNTIME=torch``). What
crosses the queue is already validated: a :class:`WorkItem` of uint8 digits, so a client's
mistake never reaches a batch. If the model fails on a batch, each item is retried alone, so
one poisonous input fails only its own request.
"""

from __future__ import annotations

import logging
import time
from typing import NamedTuple

import numpy as np

from service import metrics
from service.inference import litserve_adapter as adapter
from service.inference import readiness
from service.settings import Settings

log = logging.getLogger("digits.worker")


class WorkItem(NamedTuple):
    pixels: bytes  # uint8 [count,28,28], white on black
    count: int
    enqueued_at: float  # time.monotonic(): system-wide on Linux, so comparable across processes
    pin: str = ""  # a version the client asked for by name (the active or the canary), or ""


class Pinned(NamedTuple):
    pixels: np.ndarray  # uint8 [count,28,28]
    pin: str


class ItemResult(NamedTuple):
    """What goes back for one WorkItem: probabilities [count,10], or an error message."""

    probabilities: np.ndarray | None
    model_version: str
    runtime: str
    error: str | None = None


class PredictAPI(adapter.BatchedAPI[Pinned, ItemResult]):
    def __init__(self, settings: Settings, holds_model: bool) -> None:
        """Without ``holds_model`` (the model is in the API servers) no inference worker runs it."""
        batch_timeout = 0.0 if settings.batching == "greedy" else settings.batch_timeout
        super().__init__(max_batch_size=settings.max_batch_size, batch_timeout=batch_timeout,
                         api_path="/litserve/predict", idle=not holds_model)
        self.settings = settings

    def setup_model(self, device: str) -> None:
        from service.inference.model_slot import ModelSlot
        from service.inference.placement import runtime_options
        from service.logs import configure_logging

        configure_logging(self.settings.log_level)
        index = adapter.process_index()
        options = runtime_options(self.settings, device)
        import torch

        torch.set_num_threads(options.threads)

        def announce(serving) -> None:
            readiness.write(self.settings.run_dir, "worker", index, device=options.device,
                            model_version=serving.version, runtime=serving.runtime.name,
                            runtime_reason=serving.reason, canary_version=self.slot.canary_version)

        from model.registry import Registry

        self.slot = ModelSlot(Registry(self.settings.registry), self.settings.runtime, options,
                              self.settings.warmup_measure_runs, on_change=announce)
        announce(self.slot.serving)
        self.slot.start_watching()

    def decode_request(self, request: WorkItem) -> Pinned:
        metrics.queue_wait.observe(max(0.0, time.monotonic() - request.enqueued_at))
        return Pinned(np.frombuffer(request.pixels, dtype=np.uint8).reshape(request.count, 28, 28), request.pin)

    def predict_batch(self, items: list[Pinned]) -> list[ItemResult]:
        """Items pinned to different versions run apart; the canary split is drawn per batch."""
        pins = {item.pin for item in items}
        if len(pins) > 1:
            results: dict[int, ItemResult] = {}
            for pin in pins:
                group = [index for index, item in enumerate(items) if item.pin == pin]
                results.update(zip(group, self.predict_batch([items[index] for index in group]), strict=True))
            return [results[index] for index in range(len(items))]
        try:
            probabilities, serving = self.slot.predict(np.concatenate([item.pixels for item in items]),
                                                       items[0].pin or None)
        except Exception as exc:
            if len(items) > 1:  # find the item(s) that fail: each alone
                log.warning("a batch of %d requests failed; retrying each alone", len(items))
                return [self.predict_batch([item])[0] for item in items]
            log.exception("inference failed on one request")
            return [ItemResult(None, "", "", f"inference failed: {type(exc).__name__}: {exc}")]
        return [ItemResult(p, serving.version, serving.runtime.name)
                for p in np.split(probabilities, np.cumsum([len(item.pixels) for item in items])[:-1])]
