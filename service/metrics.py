"""Prometheus metrics, shared across LitServe's processes through prometheus_client's
multiprocess mode: every process writes its own files under ``PROMETHEUS_MULTIPROC_DIR``
and ``/metrics`` (in any API server) merges them.

``PROMETHEUS_MULTIPROC_DIR`` must be set before this module is first imported; the service
entry point does that before it imports anything else of ours.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,  # noqa: F401 - re-exported for the route
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

http_requests = Counter("digits_http_requests", "HTTP requests answered", ["route", "method", "status"])
http_latency = Histogram(
    "digits_http_request_duration_seconds", "Time to answer a request, in the API server", ["route"],
    buckets=LATENCY_BUCKETS,
)
batch_size = Histogram("digits_batch_size", "Requests per inference batch", buckets=BATCH_BUCKETS)
queue_wait = Histogram(
    "digits_queue_wait_seconds", "Time from decoded request to its batch starting", buckets=LATENCY_BUCKETS
)
inference_latency = Histogram(
    "digits_inference_seconds", "Model time per batch", ["runtime"], buckets=LATENCY_BUCKETS
)
split_batches = Counter(
    "digits_split_batches", "Batches of DIGITS_SPLIT_BATCH images or more, by the threads that computed them "
    "(1: no core was idle)", ["threads"],
)
model_info = Gauge(
    "digits_model_info", "1 for the model version and runtime a worker serves", ["version", "runtime"],
    multiprocess_mode="livemax",
)
runtime_info = Gauge(
    "digits_runtime_info", "1 for the runtime a worker uses and why (configured, measured, cuda, fallback)",
    ["runtime", "reason"], multiprocess_mode="livemax",
)
model_swaps = Counter("digits_model_swaps", "Hot swaps to a new model version", ["runtime"])
runtime_fallbacks = Counter("digits_runtime_fallbacks", "Switches from torch.compile to ONNX Runtime")
connections_refused = Counter(
    "digits_connections_refused", "Connections over DIGITS_MAX_CONNECTIONS or DIGITS_MAX_CONNECTIONS_PER_CLIENT"
)
finetune_jobs = Counter("digits_finetune_jobs", "Fine-tune jobs finished", ["state"])

# learning from traffic (service/loop/capture.py, off the request path)
CONFIDENCE_BUCKETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)
review_observed = Counter("digits_review_observed", "Predictions the capture tap has looked at", ["version"])
review_captured = Counter(
    "digits_review_captured", "Predictions kept in the review queue", ["version", "reason"]
)
review_dropped = Counter(
    "digits_review_dropped", "Predictions the capture tap did not keep: its queue was full (tap_full), the "
    "review queue held only labelled or leased items (review_full), over DIGITS_REVIEW_MAX_PER_SECOND (rate), "
    "an input it captured lately (repeat), or a write failed (error)", ["reason"]
)
feedback_corrections = Counter(
    "digits_feedback_corrections", "Corrections posted to /feedback, by the version they say they correct",
    ["version"],
)
prediction_confidence = Histogram(
    "digits_prediction_confidence", "Probability of the predicted digit, per model version (a drift signal)",
    ["version"], buckets=CONFIDENCE_BUCKETS,
)


def observe_many(histogram, values: np.ndarray) -> None:
    """``histogram.observe(v)`` for every value, in one pass: one increment per bucket hit instead of
    one locked multiprocess write per value (8 us each here). It uses the child's bucket and sum
    values as prometheus_client 0.x keeps them (one count per bucket, not cumulative);
    tests/test_loop.py checks the exposed ``_count`` against the predictions sent."""
    if not len(values):
        return
    bounds = np.asarray(histogram._upper_bounds)
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    histogram._sum.inc(float(np.sum(values, dtype=np.float64)))
    for index in np.flatnonzero(counts).tolist():
        histogram._buckets[index].inc(int(counts[index]))


class ConvergenceCollector:
    """What a readiness report says of versions, computed at scrape time (not a per-process value):
    the registry's active version, how many holders serve each version, and whether they agree."""

    def __init__(self, report: dict) -> None:
        self.report = report

    def collect(self) -> Iterator[GaugeMetricFamily]:
        active = GaugeMetricFamily("digits_active_version_info", "1 for the registry's active version",
                                   labels=["version"])
        if self.report["active_version"]:
            active.add_metric([self.report["active_version"]], 1)
        serving = GaugeMetricFamily("digits_model_holders_serving",
                                    "Model holders of this server by the version they serve", labels=["version"])
        for version, count in collections.Counter(h["model_version"] for h in self.report["holders"]).items():
            serving.add_metric([version], count)
        converged = GaugeMetricFamily("digits_model_versions_converged",
                                      "1 when every model holder serves the active version",
                                      value=int(self.report["converged"]))
        yield from (active, serving, converged)


def render(readiness_report: dict | None = None) -> bytes:
    """Every process's metrics merged, plus the version convergence of ``readiness_report``."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    if readiness_report is not None:
        registry.register(ConvergenceCollector(readiness_report))
    return generate_latest(registry)


def low_confidence_edge(threshold: float) -> float:
    """The confidence bucket edge nearest below ``threshold`` (DIGITS_REVIEW_THRESHOLD)."""
    return max((edge for edge in CONFIDENCE_BUCKETS if edge <= threshold), default=CONFIDENCE_BUCKETS[0])


def by_version(low_at: float) -> dict[str, dict[str, float | None]]:
    """Per version, over every process since the server started: predictions, mean confidence,
    the share at or below ``low_at`` (a bucket edge) and the share the capture tap kept for
    review, and the corrections /feedback posted naming it, per prediction (what live and canary
    are compared by)."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    seen: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for family in registry.collect():
        for sample in family.samples:
            totals = seen[sample.labels.get("version", "")]
            if family.name == "digits_prediction_confidence":
                if sample.name.endswith("_count"):
                    totals["count"] = sample.value
                elif sample.name.endswith("_sum"):
                    totals["sum"] = sample.value
                elif sample.name.endswith("_bucket") and float(sample.labels["le"]) == low_at:
                    totals["low"] = sample.value
            elif family.name == "digits_review_observed" and sample.name.endswith("_total"):
                totals["observed"] += sample.value
            elif family.name == "digits_review_captured" and sample.name.endswith("_total"):
                totals["captured"] += sample.value
            elif family.name == "digits_feedback_corrections" and sample.name.endswith("_total"):
                totals["feedback"] += sample.value

    def share(part: float, whole: float) -> float | None:
        return round(part / whole, 4) if whole else None

    return {version: {"predictions": int(t["count"]), "mean_confidence": share(t["sum"], t["count"]),
                      "low_confidence_share": share(t["low"], t["count"]),
                      "review_rate": share(t["captured"], t["observed"]),
                      "feedback": int(t["feedback"]), "feedback_rate": share(t["feedback"], t["count"])}
            for version, t in seen.items() if version}


def set_runtime_info(runtime: str, reason: str, previous: tuple[str, str] | None = None) -> None:
    if previous is not None and previous != (runtime, reason):
        runtime_info.labels(*previous).set(0)
    runtime_info.labels(runtime, reason).set(1)


def set_model_info(version: str, runtime: str, previous: tuple[str, str] | None = None) -> None:
    if previous is not None and previous != (version, runtime):
        model_info.labels(*previous).set(0)
    model_info.labels(version, runtime).set(1)
