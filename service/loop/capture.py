"""The capture tap: every served prediction passes it, off the request path.

``TappedPredictor`` wraps the API server's predictor (so /predict, V2 REST and gRPC all pass
it) and hands each answered batch to a ``Tap``: a bounded in-process queue that a background
thread drains in batches. ``observe`` never blocks and never raises: when the queue is full
the prediction is dropped and counted (``digits_review_dropped_total{reason="tap_full"}``).

The thread observes the confidence histogram per version, keeps predictions below the
threshold (and a sampled share of the rest) in the review queue, and every Nth input in the
traffic ring. With capture off (``DIGITS_REVIEW_CAPTURE=false``) it stores no input at all,
only the metrics.

What it writes is bounded in files per second, whatever the traffic, because the thread shares
the API server's cores: at most ``DIGITS_REVIEW_MAX_PER_SECOND`` captures, none of an input this
tap captured lately (a client, or a load test, sending the same digits again; counted as
``repeat``), and one traffic-ring chunk a second. Before those bounds, a load test repeating 64
digits cost 14 % of V2 throughput at one connection and 5-7 % of /predict's (make bench's A/B).
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from model.registry import open_registry
from service import metrics
from service.inference.predictor import Prediction, Predictor
from service.loop.review import Capture, ReviewQueue
from service.loop.traffic import TrafficRing
from service.settings import Settings, default_of

log = logging.getLogger("digits.capture")
BATCH_ITEMS = 512  # predictions written per batch at most
FLUSH_SECONDS = 0.25  # the thread writes what came in every this often
RECENT_CAPTURES = 4096  # inputs this tap captured lately: the same digit again is not queued again
RING_FLUSH_SECONDS = 1.0  # the traffic ring gets one chunk a second at most from this tap ...
RING_MAX_PER_FLUSH = 256  # ... of at most this many inputs, spread evenly over that second's
# The upload of the current /predict request, set by its endpoint (kept only with DIGITS_REVIEW_KEEP_ORIGINAL).
ORIGINAL: contextvars.ContextVar[bytes | None] = contextvars.ContextVar("digits_original_upload", default=None)


@dataclass(frozen=True)
class Rules:
    """What the tap keeps (the settings' ``review_*`` and ``traffic_every``, their defaults too)."""

    enabled: bool = default_of("review_capture")
    threshold: float = default_of("review_threshold")
    sample: float = default_of("review_sample")
    keep_original: bool = default_of("review_keep_original")
    traffic_every: int = default_of("traffic_every")
    max_per_second: float = default_of("review_max_per_second")

    @classmethod
    def of(cls, settings: Settings) -> Rules:
        return cls(settings.review_capture, settings.review_threshold, settings.review_sample,
                   settings.review_keep_original, settings.traffic_every, settings.review_max_per_second)


@dataclass(frozen=True)
class Observed:
    pixels: np.ndarray  # uint8 [n,28,28]
    probabilities: np.ndarray  # float32 [n,10]
    version: str
    time: float
    original: bytes | None


class Tap:
    """Answered batches go on a bounded deque (an append: no lock, no wake-up); a thread drains it
    every FLUSH_SECONDS and writes in batches, so the tap costs the request path almost nothing
    and the API server's event loop is not woken for it per request."""

    def __init__(self, review: ReviewQueue, ring: TrafficRing, rules: Rules, queue_size: int = 4096,
                 seed: int | None = None) -> None:
        self.review, self.ring, self.rules = review, ring, rules
        self.pending: deque[Observed] = deque()
        self.queue_size = queue_size
        self.random = np.random.default_rng(seed)
        self.seen = 0  # predictions looked at by this tap (every Nth goes to the ring)
        self.thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.allowance, self.refilled = rules.max_per_second, time.monotonic()  # captures it may write now
        self.recent: dict[int, None] = {}  # hashes of the inputs captured lately, oldest first
        self.ring_pending: list[np.ndarray] = []  # inputs for the ring since its last chunk
        self.ring_flushed = time.monotonic()

    def observe(self, pixels: np.ndarray, probabilities: np.ndarray, version: str,
                original: bytes | None = None) -> None:
        """Hand an answered batch to the thread; drop it (counted) rather than wait."""
        if len(self.pending) >= self.queue_size:
            metrics.review_dropped.labels("tap_full").inc(len(pixels))
            return
        self.pending.append(Observed(pixels, probabilities, version, time.time(), original))

    def start(self) -> Tap:
        self.thread = threading.Thread(target=self._run, name="digits-capture", daemon=True)
        self.thread.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then stop the thread."""
        if self.thread is not None:
            self._stop.set()
            self.thread.join(timeout)
            self.thread = None

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_SECONDS):
            self._drain()
            if time.monotonic() - self.ring_flushed >= RING_FLUSH_SECONDS:
                self._flush_ring()
        self._drain()
        self._flush_ring()

    def _drain(self) -> None:
        """Write everything queued now, BATCH_ITEMS predictions at a time."""
        batch: list[Observed] = []
        predictions = 0
        while self.pending:
            batch.append(self.pending.popleft())  # only this thread takes from the left
            predictions += len(batch[-1].pixels)
            if predictions >= BATCH_ITEMS or not self.pending:
                try:
                    self.write(batch)
                except Exception:
                    log.exception("capture: could not write %d prediction(s)", len(batch))
                    metrics.review_dropped.labels("error").inc(predictions)
                batch, predictions = [], 0

    def write(self, batch: list[Observed]) -> None:
        """The metrics of a batch, then its captures and its share of the ring (vectorised: the
        thread shares the API server's CPU and GIL)."""
        captures, traffic = [], []
        fresh: dict[int, None] = {}  # the input hash of each capture, in order
        for version in dict.fromkeys(o.version for o in batch):
            group = [o for o in batch if o.version == version]
            pixels = np.concatenate([o.pixels for o in group])
            probabilities = np.concatenate([o.probabilities for o in group])
            confidences = probabilities.max(axis=1)
            metrics.review_observed.labels(version).inc(len(confidences))
            metrics.observe_many(metrics.prediction_confidence.labels(version), confidences)
            if not self.rules.enabled:
                continue
            positions = self.seen + 1 + np.arange(len(confidences))
            self.seen += len(confidences)
            traffic.append(pixels[positions % self.rules.traffic_every == 0])
            unsure = confidences < self.rules.threshold
            sampled = ~unsure & (self.random.random(len(confidences)) < self.rules.sample)
            owner = np.repeat(np.arange(len(group)), [len(o.pixels) for o in group])  # each prediction's batch
            for index in np.flatnonzero(unsure | sampled).tolist():
                key = hash(pixels[index].tobytes())
                if key in self.recent or key in fresh:
                    metrics.review_dropped.labels("repeat").inc()
                    continue
                fresh[key] = None
                observed = group[owner[index]]
                when, upload = observed.time, observed.original if len(observed.pixels) == 1 else None
                captures.append(Capture(pixels[index].copy(), int(probabilities[index].argmax()),
                                        float(confidences[index]), version, when,
                                        "low_confidence" if unsure[index] else "sample",
                                        upload if self.rules.keep_original else None))
        captures = self._within_rate(captures)
        if captures:
            stored = self.review.add(captures)
            self._remember(list(fresh)[:stored])
            for capture in captures[:stored]:
                metrics.review_captured.labels(capture.version, capture.reason).inc()
            if stored < len(captures):
                metrics.review_dropped.labels("review_full").inc(len(captures) - stored)
        if traffic and len(chosen := np.concatenate(traffic)):  # a drain's share of the ring's chunk, spread
            self.ring_pending.append(evenly(chosen, RING_MAX_PER_FLUSH * FLUSH_SECONDS / RING_FLUSH_SECONDS))

    def _remember(self, keys: list[int]) -> None:
        """The inputs just stored: captured lately, until RECENT_CAPTURES newer ones push them out."""
        for key in keys:
            self.recent[key] = None
        while len(self.recent) > RECENT_CAPTURES:
            del self.recent[next(iter(self.recent))]

    def _flush_ring(self) -> None:
        """One chunk of what came for the ring since the last: at most RING_MAX_PER_FLUSH, evenly spread."""
        self.ring_flushed = time.monotonic()
        if not self.ring_pending:
            return
        inputs, self.ring_pending = evenly(np.concatenate(self.ring_pending), RING_MAX_PER_FLUSH), []
        try:
            self.ring.append(inputs)
        except Exception:
            log.exception("capture: could not write %d input(s) to the traffic ring", len(inputs))

    def _within_rate(self, captures: list[Capture]) -> list[Capture]:
        """At most ``max_per_second`` captures a second (a token bucket of a second's worth): each
        one is a file in the registry, and a reviewer labels a few a second at best."""
        now = time.monotonic()
        self.allowance = min(self.rules.max_per_second,
                             self.allowance + (now - self.refilled) * self.rules.max_per_second)
        self.refilled = now
        kept = captures[:int(self.allowance)]
        self.allowance -= len(kept)
        if len(kept) < len(captures):
            metrics.review_dropped.labels("rate").inc(len(captures) - len(kept))
        return kept


def evenly(rows: np.ndarray, at_most: float) -> np.ndarray:
    """``rows``, or ``at_most`` of them evenly spaced when there are more."""
    if len(rows) <= at_most:
        return rows
    return rows[np.linspace(0, len(rows) - 1, int(at_most)).round().astype(int)]


class TappedPredictor:
    """A Predictor whose every answer also goes to the tap (after it is computed, without waiting)."""

    def __init__(self, inner: Predictor, tap: Tap) -> None:
        self.inner, self.tap = inner, tap

    @property
    def model_version(self) -> str:
        return self.inner.model_version

    async def predict(self, pixels: np.ndarray, pin: str | None = None) -> Prediction:
        prediction = await self.inner.predict(pixels, pin)
        original = ORIGINAL.get() if self.tap.rules.keep_original else None  # never held for nothing
        self.tap.observe(pixels, prediction.probabilities, prediction.model_version, original)
        return prediction


def tap_for(settings: Settings) -> Tap:
    """This API server's tap on the settings' registry (started)."""
    registry = open_registry(settings.registry)
    review = ReviewQueue(registry, settings.review_max_items, settings.review_max_bytes,
                         settings.review_lease_seconds)
    ring = TrafficRing(registry, settings.traffic_ring_size)
    review.remove_stale_temporaries()
    ring.remove_stale_temporaries()
    return Tap(review, ring, Rules.of(settings), settings.capture_queue_size).start()
