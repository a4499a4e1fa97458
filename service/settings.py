"""Every knob of the service, from environment variables (``DIGITS_*``) and matching flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.preprocess import DEFAULT_MAX_PIXELS

MiB = 1024 * 1024


class Settings(BaseSettings):
    """Read from ``DIGITS_<NAME>`` env vars; ``python -m service --<name> VALUE`` overrides them."""

    model_config = SettingsConfigDict(env_prefix="DIGITS_", cli_kebab_case=True, extra="ignore")

    # where
    host: str = Field("127.0.0.1", description="interface to listen on (127.0.0.1, 0.0.0.0 or ::)")
    port: int = Field(8000, ge=1, le=65535)
    registry: Path = Field(Path("registry"), description="model registry directory (shared state)")
    data_dir: Path = Field(Path("data"), description="prepared MNIST (replay data for fine-tuning)")

    # how the model runs
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available")
    runtime: Literal["auto", "torch", "onnx"] = Field(
        "auto", description="torch: torch.compile; onnx: ONNX Runtime; auto: see README"
    )
    max_batch_size: int = Field(16, ge=1, le=256, description="largest batch the worker assembles")
    batch_timeout: float = Field(0.002, ge=0, le=1, description="seconds a batch waits to fill (window batching)")
    batching: Literal["window", "greedy"] = Field(
        "window", description="window: wait batch_timeout for a batch to fill; greedy: take what queued while busy"
    )
    inference: Literal["auto", "api", "worker"] = Field(
        "auto", description="where the model runs: api (ONNX Runtime in every API server, CPU), worker (LitServe "
        "inference workers batch requests from all API servers), auto: api on CPU unless DIGITS_RUNTIME=torch, "
        "worker on CUDA"
    )
    workers: int = Field(1, ge=1, le=16, description="inference worker processes per device (inference=worker)")
    api_servers: int = Field(2, ge=1, le=16, description="HTTP server processes")
    worker_threads: int | None = Field(
        None, ge=1, le=256,
        description="intra-op threads per model (torch and ONNX Runtime); default: 1 in each API server with "
        "inference=api; in each inference worker the CPUs this process may use minus api_servers x workers, at "
        "least 1 (measured: on 2 cores, 2 threads halve throughput)",
    )
    split_batch: int = Field(
        16, ge=0, le=4096,
        description="(api) a batch of this many images or more is split over the cores the other API servers "
        "leave idle (service/inference/cores.py); 0: never split",
    )
    request_timeout: float = Field(30.0, gt=0, description="seconds a request may wait in the queue")

    # limits on what clients send
    read_timeout: float = Field(
        10.0, gt=0, le=600, description="seconds a request may take to arrive whole, from its first byte (408)")
    first_byte_timeout: float = Field(
        3.0, gt=0, le=600, description="seconds a new connection may wait before its first byte (408; at most "
        "read_timeout)")
    max_connections: int = Field(1024, ge=1, description="concurrent connections per API server (503 above)")
    max_connections_per_client: int = Field(
        128, ge=1, description="concurrent connections of one client address per API server while it holds half "
        "of max_connections or more (503 above); behind a proxy, set it to max_connections")
    max_body_bytes: int = Field(5 * MiB, ge=1024, description="largest request body (413 above)")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=784, description="largest width*height decoded (413 above)")

    # admin and fine-tuning
    admin_token: SecretStr | None = Field(None, description="bearer token for /admin/*; unset: admin disabled")
    admin_token_file: Path | None = Field(None, description="file holding the admin token")
    finetune_max_samples: int = Field(10_000, ge=1)
    finetune_max_archive_bytes: int = Field(200 * MiB, ge=1024, description="uncompressed size cap of an upload")
    finetune_max_body_bytes: int = Field(50 * MiB, ge=1024, description="largest admin upload body")
    trainer_threads: int = Field(1, ge=1, le=64, description="torch threads of the fine-tune trainer")
    trainer_enabled: bool = Field(True, description="run the fine-tune trainer process beside the server")
    finetune_max_queued: int = Field(
        8, ge=1, le=1000, description="jobs queued or running at once; beyond it /admin/finetune answers 429"
    )
    activate_wait_seconds: float = Field(
        10.0, ge=0, le=300,
        description="how long an activation waits for every model holder to serve the version (then 202)",
    )

    # replicas: a standalone trainer (python -m service.finetune.trainer) beside serving replicas
    trainer_metrics_port: int | None = Field(
        None, ge=1, le=65535, description="standalone trainer: serve its /metrics on DIGITS_HOST:this port"
    )

    # operations
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = Field(True, description="one structured log line per request")
    run_dir: Path | None = Field(None, description="scratch dir for metrics and readiness; default: a temp dir")
    warmup_measure_runs: int = Field(20, ge=1, description="timed runs per runtime when runtime=auto")

    # feedback (POST /feedback): bounded, rate-limited, optionally behind a token
    feedback_max_samples: int = Field(
        10_000, ge=1, description="stored feedback samples; beyond it /feedback answers 507 until emptied"
    )
    feedback_max_bytes: int = Field(32 * MiB, ge=1024, description="bytes of stored feedback (507 above)")
    feedback_rate: float = Field(
        1.0, gt=0, le=10_000, description="feedback posts per second per client address (token bucket refill)"
    )
    feedback_burst: int = Field(20, ge=1, le=10_000, description="feedback posts a client may send at once")
    feedback_token: SecretStr | None = Field(None, description="bearer token /feedback requires; unset: open")

    # learning from traffic: the review queue and the ring of recent inputs (service/loop/)
    review_capture: bool = Field(
        True, description="keep inputs of served predictions (review queue, traffic ring); false: keep none")
    review_threshold: float = Field(
        0.8, ge=0, le=1, description="predictions less confident than this go to the review queue")
    review_sample: float = Field(0.001, ge=0, le=1, description="share of all other predictions also queued")
    review_keep_original: bool = Field(
        False, description="also keep the uploaded image of a captured /predict request (not only its 28x28)")
    review_max_items: int = Field(
        5000, ge=1, le=1_000_000, description="items in the review queue; when full the oldest unlabelled go")
    review_max_bytes: int = Field(64 * MiB, ge=64 * 1024, description="bytes of the review queue (as above)")
    review_max_per_second: float = Field(
        20.0, gt=0, le=100_000, description="captures an API server writes per second at most (a burst of a "
        "second's worth); beyond it they are dropped (counted): a flood of unsure traffic costs the server little")
    review_lease_seconds: float = Field(
        300.0, gt=0, le=86_400, description="how long a reviewer holds leased items before others may get them")
    traffic_ring_size: int = Field(
        2000, ge=1, le=100_000, description="recent inputs kept for shadow evaluation (oldest dropped)")
    traffic_every: int = Field(4, ge=1, le=1_000_000, description="every Nth prediction goes to the traffic ring")
    capture_queue_size: int = Field(
        4096, ge=1, le=1_000_000,
        description="predictions waiting for the capture thread per API server; beyond it they are dropped "
        "(counted), never waited for")

    # Open Inference Protocol (KServe V2): REST under /v2 on the HTTP port, gRPC on its own port
    grpc_port: int = Field(
        8001, ge=1, le=65535,
        description="gRPC port of inference.GRPCInferenceService; every API server binds it (SO_REUSEPORT)",
    )

    @model_validator(mode="after")
    def _token_from_file(self) -> Settings:
        if self.admin_token is None and self.admin_token_file is not None:
            token = self.admin_token_file.read_text().strip()
            if token:
                self.admin_token = SecretStr(token)
        return self

    def admin_token_value(self) -> str | None:
        return self.admin_token.get_secret_value() if self.admin_token else None

    def feedback_token_value(self) -> str | None:
        return self.feedback_token.get_secret_value() if self.feedback_token else None

    def inference_threads(self) -> int:
        """Threads for an inference worker's model: the CPUs we may use (affinity aware), minus
        ``api_servers`` x ``workers``, at least 1; ``worker_threads`` when set."""
        if self.worker_threads:
            return self.worker_threads
        return max(1, len(os.sched_getaffinity(0)) - self.api_servers * self.workers)

    def buckets(self) -> list[int]:
        """Padded batch sizes the compiled graph is built for: 1, 2, 4, ... max_batch_size."""
        sizes, size = [], 1
        while size < self.max_batch_size:
            sizes.append(size)
            size *= 2
        return [*sizes, self.max_batch_size]


def settings_of(app: Any) -> Settings:
    """The settings an app was built with (``build_server`` keeps them on ``app.state``): the one
    way routes, dependencies and checks read them."""
    return app.state.settings


def default_of(name: str) -> Any:
    """A setting's default, for code that takes the knob as an argument (one home for the value)."""
    return Settings.model_fields[name].default
