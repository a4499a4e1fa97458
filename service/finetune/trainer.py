"""The fine-tune trainer: one process that runs queued jobs one at a time.

Out of the request path, with its torch threads capped so serving keeps its latency. It runs
beside the server (``DIGITS_TRAINER_ENABLED=true``) or on its own (``python -m
service.finetune.trainer``), for a deployment whose serving replicas run with
``DIGITS_TRAINER_ENABLED=false``. A file lock in the registry makes it one trainer even
across replicas sharing the registry; a second one waits for the lock and takes over when
the first dies. On taking the lock it marks jobs left ``running`` by a crash as failed.
SIGTERM stops it: a running job stops at its next training step and is marked failed.
On taking the lock it also exports model.onnx for every version that lacks it (one trained
elsewhere), so that replicas without torch (serve-cpu) can serve it.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
from functools import cache
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from prometheus_client import start_http_server

from model import data
from model.finetune import finetune
from model.onnx_serving import ensure_onnx
from model.publish import PARITY_IMAGES, publish_model
from model.registry import Registry
from model.slices import ReadSlice, gate_suite
from model.train import EpochStats
from service import metrics
from service.finetune.jobs import JobRecord, JobState, JobStore
from service.loop.shadow import recent_evidence, replay
from service.settings import Settings

log = logging.getLogger("digits.trainer")
POLL_SECONDS = 0.5


@cache
def mnist(data_dir: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return data.load_split(data_dir, train=train)


_gate_slices_lock = threading.Lock()


def gate_slices(data_dir: str) -> list[ReadSlice]:
    """The slice suite the gate guards, built and preprocessed once per trainer process (a job
    that needs it while it is being made waits for it)."""
    with _gate_slices_lock:
        return _made_gate_slices(data_dir)


@cache
def _made_gate_slices(data_dir: str) -> list[ReadSlice]:
    images, labels = mnist(data_dir, False)
    return gate_suite(images.numpy(), labels.numpy())


def mark_interrupted(store: JobStore) -> None:
    for record in store.all():
        if record.state == JobState.RUNNING:
            record.state = JobState.FAILED
            record.message = "interrupted: the trainer stopped (crash or restart) while this job ran; resubmit it"
            store.save(record)
            store.clear_cancel(record.job_id)
            log.warning("marked interrupted job %s as failed", record.job_id, extra={"job_id": record.job_id})


def run_job(record: JobRecord, store: JobStore, registry: Registry, settings: Settings,
            stop: threading.Event) -> JobRecord:
    """Train a claimed (running) job, gate it, publish it if it passes. SIGTERM (``stop``) or a
    cancel stops it at the next batch, and nothing is published."""
    record.parent_version = registry.active_version()
    store.save(record)

    def should_stop() -> bool:
        return stop.is_set() or store.cancel_requested(record.job_id)

    try:
        images, labels = map(torch.from_numpy, store.load_samples(record.job_id))
        base, manifest = registry.load_model(record.parent_version)
        test_set = mnist(str(settings.data_dir), False)

        def progress(stats: EpochStats) -> None:
            record.progress = {"epoch": stats.epoch, "epochs": record.options.epochs,
                               "loss": round(stats.train_loss, 5)}
            store.save(record)

        traffic, reviewed, reviewed_labels = recent_evidence(registry, settings.traffic_ring_size, record.job_id)

        def shadow(candidate: torch.nn.Module) -> dict:
            return replay(base, candidate, traffic, reviewed, reviewed_labels, record.options.review_alpha)

        outcome = finetune(base, images, labels, mnist(str(settings.data_dir), True), test_set,
                           record.options, on_epoch=progress, should_stop=should_stop,
                           slices=gate_slices(str(settings.data_dir)), shadow=shadow)
        if should_stop():
            raise InterruptedError
        record.metrics_before, record.metrics_after, record.shadow = outcome.before, outcome.after, outcome.shadow
        record.message = f"{outcome.reason} ({outcome.seconds:.1f} s)"
        if outcome.promoted:
            published = publish_model(
                registry, outcome.model, manifest.arch, test_set[0][:PARITY_IMAGES],
                parent=manifest.version, job_id=record.job_id,
                metrics={"test_accuracy": outcome.after["mnist_test_accuracy"], "finetune": outcome.after,
                         "finetune_before": outcome.before, "finetune_seconds": round(outcome.seconds, 1),
                         "shadow": outcome.shadow,
                         "slices": {name: {"accuracy": row["after"], "n": row["n"]}
                                    for name, row in outcome.after["slices"].items()}},
                data_hash=manifest.data_hash,
                hyperparameters=record.options.model_dump(),
            )
            record.state, record.produced_version = JobState.SUCCEEDED, published.version
        else:
            record.state = JobState.REJECTED
    except InterruptedError:
        if store.cancel_requested(record.job_id):
            record.state, record.message = JobState.CANCELLED, "cancelled while training; nothing was published"
        else:
            record.state = JobState.FAILED
            record.message = "interrupted: the trainer was stopped while this job ran; resubmit it"
    except Exception as exc:
        log.exception("job %s failed", record.job_id, extra={"job_id": record.job_id})
        record.state, record.message = JobState.FAILED, f"{type(exc).__name__}: {exc}"
    store.save(record)
    store.clear_cancel(record.job_id)
    metrics.finetune_jobs.labels(record.state).inc()
    log.info("job %s %s: %s", record.job_id, record.state, record.message, extra={"job_id": record.job_id})
    return record


def release_memory() -> None:
    """Hand a finished job's freed heap back to the OS: glibc keeps it otherwise, and the trainer
    idles between jobs at the RSS of the last one's peak (measured with `make soak`)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def export_missing_onnx(registry: Registry, data_dir: Path) -> None:
    """model.onnx for every version that lacks a current one: what a torch-less replica serves."""
    for manifest in registry.list_versions():
        try:
            ensure_onnx(registry, manifest.version, data_dir)
        except Exception:
            log.exception("could not export model.onnx of %s", manifest.version)


def run_trainer(settings: Settings, stop: threading.Event) -> None:
    """Wait for the registry's trainer lock, then run queued jobs until ``stop`` is set."""
    registry = Registry(settings.registry)
    store = JobStore(registry)
    lock = FileLock(str(registry.trainer_lock_path))
    waiting = False
    while not stop.is_set():
        try:
            lock.acquire(timeout=POLL_SECONDS)
            break
        except Timeout:
            if not waiting:
                log.info("another trainer holds %s; waiting to take over", lock.lock_file)
                waiting = True
    else:
        return
    try:
        mark_interrupted(store)
        export_missing_onnx(registry, settings.data_dir)
        # The gate's slice suite is made while the queue is empty, not in the first job's time.
        threading.Thread(target=gate_slices, args=(str(settings.data_dir),), daemon=True).start()
        log.info("trainer ready (threads=%d)", settings.trainer_threads, extra={"pid": os.getpid()})
        while not stop.is_set():
            record = store.claim_next()
            if record is not None:
                run_job(record, store, registry, settings, stop)
                release_memory()
            else:
                stop.wait(POLL_SECONDS)
    finally:
        lock.release()


def _prepared(settings: Settings, stop_on_sigint: bool) -> threading.Event:
    """Logging and torch's threads set up; the event that SIGTERM (and SIGINT, when the trainer
    runs on its own) sets to stop it."""
    from service.logs import configure_logging

    configure_logging(settings.log_level)
    torch.set_num_threads(settings.trainer_threads)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # beside the server, the main process decides when we stop
    signal.signal(signal.SIGINT, (lambda *_: stop.set()) if stop_on_sigint else signal.SIG_IGN)
    return stop


def trainer_loop(settings: Settings) -> None:
    """The trainer process beside the server: SIGTERM stops it; SIGINT is the main process's."""
    run_trainer(settings, _prepared(settings, stop_on_sigint=False))


def start_trainer(settings: Settings) -> mp.Process:
    """The trainer as a child process (spawned: it imports torch afresh). It stops its job at the
    next step on SIGTERM; the server's supervisor replaces it if it dies."""
    process = mp.get_context("spawn").Process(target=trainer_loop, args=(settings,), name="digits-trainer")
    process.start()
    return process


def main() -> int:
    """``python -m service.finetune.trainer``: the trainer on its own until SIGTERM or SIGINT, for a
    deployment whose serving replicas run with ``DIGITS_TRAINER_ENABLED=false``."""
    settings = Settings(_cli_parse_args=True)
    if Registry(settings.registry).active_version() is None:
        print(f"error: {settings.registry} has no active model; run `make train` first", file=sys.stderr)
        return 2
    stop = _prepared(settings, stop_on_sigint=True)
    if settings.trainer_metrics_port is not None:
        start_http_server(settings.trainer_metrics_port, addr=settings.host)
        log.info("trainer metrics on http://%s:%d/metrics", settings.host, settings.trainer_metrics_port)
    run_trainer(settings, stop)
    log.info("trainer stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
