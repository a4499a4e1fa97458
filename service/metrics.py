"""Prometheus metrics, shared across LitServe's processes through prometheus_client's
multiprocess mode: every process writes its own files under ``PROMETHEUS_MULTIPROC_DIR``
and ``/metrics`` (in any API server) merges them.

``PROMETHEUS_MULTIPROC_DIR`` must be set before this module is first imported; the service
entry point does that before it imports anything else of ours.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

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


def set_runtime_info(runtime: str, reason: str, previous: tuple[str, str] | None = None) -> None:
    if previous is not None and previous != (runtime, reason):
        runtime_info.labels(*previous).set(0)
    runtime_info.labels(runtime, reason).set(1)


def set_model_info(version: str, runtime: str, previous: tuple[str, str] | None = None) -> None:
    if previous is not None and previous != (version, runtime):
        model_info.labels(*previous).set(0)
    model_info.labels(version, runtime).set(1)
