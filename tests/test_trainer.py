"""The standalone trainer (``python -m service.finetune.trainer``): one at a time on a shared registry,
a killed one's job marked failed by its replacement, SIGTERM mid-job."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.processes import Child
from model.finetune_options import FinetuneOptions
from model.registry import Registry
from service.finetune.jobs import JobStore
from tests.conftest import DATA_DIR, wait_until


def trainer_process(registry: Path, log_path: Path) -> Child:
    """A real ``python -m service.finetune.trainer`` in its own process group, started."""
    trainer = Child("trainer", [sys.executable, "-m", "service.finetune.trainer"], log_path,
                    env={"DIGITS_REGISTRY": str(registry), "DIGITS_DATA_DIR": str(DATA_DIR),
                         "DIGITS_LOG_LEVEL": "info"})
    trainer.spawn()
    return trainer


@pytest.fixture
def start_trainer(tmp_path: Path) -> Iterator:
    started: list[Child] = []

    def start(registry: Path) -> Child:
        trainer = trainer_process(registry, tmp_path / f"trainer-{len(started)}.log")
        started.append(trainer)
        return trainer

    yield start
    for trainer in started:
        trainer.stop(timeout=30)


def queue_job(store: JobStore, mnist_test, count: int, epochs: int) -> str:
    images, labels = mnist_test
    record, _ = store.create(images[:count].numpy(), labels[:count].numpy(), FinetuneOptions(epochs=epochs),
                             "upload", max_pending=10)
    return record.job_id


def state(store: JobStore, job_id: str) -> str:
    return store.get(job_id).state


def test_a_waiting_trainer_takes_over_a_killed_ones_queue_and_stops_on_sigterm(
    registry_copy: Registry, start_trainer, mnist_test
) -> None:
    store = JobStore(registry_copy)
    killed_job = queue_job(store, mnist_test, 200, epochs=50)
    next_job = queue_job(store, mnist_test, 200, epochs=50)
    first = start_trainer(registry_copy.root)
    assert wait_until(lambda: state(store, killed_job) == "running", 90), first.log()
    second = start_trainer(registry_copy.root)
    assert wait_until(lambda: "waiting to take over" in second.log(), 60), second.log()
    # the second trainer holds back: one fine-tune at a time across everything on this registry
    assert state(store, killed_job) == "running" and state(store, next_job) == "queued"
    assert "trainer ready" not in second.log()

    first.kill_group()  # mid-job; the kernel releases its lock
    assert wait_until(lambda: state(store, killed_job) == "failed", 30), second.log()
    assert "interrupted" in store.get(killed_job).message
    # the queue goes on; SIGTERM then stops the new trainer's job at its next step
    assert wait_until(lambda: store.get(next_job).progress.get("epoch", 0) >= 1, 90), second.log()
    second.process.terminate()
    assert second.process.wait(30) == 0, second.log()
    record = store.get(next_job)
    assert record.state == "failed" and "the trainer was stopped" in record.message, record
    assert "trainer stopped" in second.log()


def test_refuses_a_registry_without_a_model(tmp_path: Path, start_trainer) -> None:
    trainer = start_trainer(Registry(tmp_path / "empty").root)
    assert trainer.process.wait(60) == 2
    assert "no active model" in trainer.log()
    assert list((tmp_path / "empty" / "jobs").iterdir()) == []
