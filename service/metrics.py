"""Prometheus metrics, shared across LitServe's processes through prometheus_client's
multiprocess mode: every process writes its own files under ``PROMETHEUS_MULTIPROC_DIR``
and ``/metrics`` (in any API server) merges them.

``PROMETHEUS_MULTIPROC_DIR`` must be set before this module is first imported; the service
entry point does that before it imports anything else of ours.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,  # noqa: F401 - re-exported for the route
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

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


def render() -> bytes:
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry)


def set_runtime_info(runtime: str, reason: str, previous: tuple[str, str] | None = None) -> None:
    if previous is not None and previous != (runtime, reason):
        runtime_info.labels(*previous).set(0)
    runtime_info.labels(runtime, reason).set(1)


def set_model_info(version: str, runtime: str, previous: tuple[str, str] | None = None) -> None:
    if previous is not None and previous != (version, runtime):
        model_info.labels(*previous).set(0)
    model_info.labels(version, runtime).set(1)
