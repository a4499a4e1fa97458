"""Where the model runs, decided once at start from the settings and the machine.

* ``api``: ONNX Runtime inside every API server, one thread each (CPU). On a CPU with one
  thread, a batch of 16 costs as much as 16 single images, so the hop to another process and
  the batching window would only add latency and CPU. A large batch is split over the cores the
  other API servers leave idle (:mod:`service.inference.cores`).
* ``worker``: LitServe's inference workers batch requests from all API servers (CUDA, where the
  model is cheap per image only in batches, or ``DIGITS_RUNTIME=torch`` for torch.compile).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from typing import Literal

from service.inference.cores import CoreShare
from service.inference.runtimes import RuntimeOptions
from service.settings import Settings


@dataclass(frozen=True)
class Placement:
    where: Literal["api", "worker"]
    device: str  # "cpu" or "cuda" (LitServe picks the worker's cuda:N)
    reason: str


@cache
def torch_available() -> bool:
    """False where torch is not installed (the serve-cpu image): ONNX Runtime in the API servers only."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def cuda_available() -> bool:
    # NVML-based: answers without initialising CUDA in this process, which forks API servers.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    if not torch_available():
        return False
    import torch

    return torch.cuda.is_available()


def decide(settings: Settings) -> Placement:
    cuda = settings.device == "cuda" or (settings.device == "auto" and cuda_available())
    device = "cuda" if cuda else "cpu"
    if settings.inference == "worker":
        return Placement("worker", device, "DIGITS_INFERENCE=worker")
    if settings.inference == "api":
        return Placement("api", "cpu", "DIGITS_INFERENCE=api")
    if cuda:
        return Placement("worker", device, "auto: CUDA batches in the inference workers")
    if settings.runtime == "torch":
        return Placement("worker", device, "auto: DIGITS_RUNTIME=torch runs in the inference workers")
    return Placement("api", device, "auto: CPU, ONNX Runtime in every API server")


def torch_problem(settings: Settings, placement: Placement) -> str | None:
    """What this configuration needs torch for when torch is not installed, or None."""
    if torch_available():
        return None
    if placement.where == "worker":
        return (f"the model would run in LitServe's inference workers ({placement.reason}), which need torch, and "
                "torch is not installed here: serve with DIGITS_INFERENCE=api and DIGITS_RUNTIME=onnx (ONNX Runtime "
                "in the API servers), or use an image with torch (cuda, trainer)")
    if settings.trainer_enabled:
        return ("the fine-tune trainer needs torch, and torch is not installed here: set DIGITS_TRAINER_ENABLED=false "
                "(a trainer elsewhere, `python -m service.finetune.trainer` on the same registry, runs the queued "
                "jobs) or "
                "install digit-service[train]")
    return None


def runtime_options(settings: Settings, device: str, api_server: int | None = None) -> RuntimeOptions:
    """``device`` as LitServe gave it to a worker (cuda:N), or "cpu". In API server ``api_server``
    the model gets one thread unless DIGITS_WORKER_THREADS says otherwise (every API server has its
    own), and batches of DIGITS_SPLIT_BATCH images or more spread over the cores the others leave idle."""
    device = device if str(device).startswith("cuda") else "cpu"
    if api_server is None:
        return RuntimeOptions(device=device, threads=settings.inference_threads(), buckets=tuple(settings.buckets()),
                              data_dir=settings.data_dir)
    threads = settings.worker_threads or 1
    cores = CoreShare(settings.run_dir, api_server, settings.split_batch) if threads == 1 and settings.split_batch \
        else None
    return RuntimeOptions(device=device, threads=threads, buckets=tuple(settings.buckets()),
                          data_dir=settings.data_dir, cores=cores)
