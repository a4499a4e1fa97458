"""The standalone trainer (``python -m service.trainer``): one at a time on a shared registry,
a killed one's job marked failed by its replacement, SIGTERM mid-job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from model.registry import Registry
from service.jobs import JobStore
from service.schemas import FinetuneOptions
from tests.conftest import DATA_DIR, ROOT, wait_until


class Trainer:
    """A real ``python -m service.trainer`` in its own process group."""

    def __init__(self, registry: Path, log_path: Path) -> None:
        self.log_path = log_path
        env = {**os.environ, "DIGITS_REGISTRY": str(registry), "DIGITS_DATA_DIR": str(DATA_DIR),
               "DIGITS_LOG_LEVEL": "info"}
        with open(log_path, "wb") as log_file:
            self.process = subprocess.Popen([sys.executable, "-m", "service.trainer"], cwd=ROOT, env=env,
                                            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill_group(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(10)


@pytest.fixture
def start_trainer(tmp_path: Path) -> Iterator:
    started: list[Trainer] = []

    def start(registry: Path) -> Trainer:
        trainer = Trainer(registry, tmp_path / f"trainer-{len(started)}.log")
        started.append(trainer)
        return trainer

    yield start
    for trainer in started:
        trainer.stop()


def queue_job(store: JobStore, mnist_test, count: int, epochs: int) -> str:
    images, labels = mnist_test
    record = store.create(images[:count].numpy(), labels[:count].numpy(), FinetuneOptions(epochs=epochs), "upload")
    return record.job_id


def state(store: JobStore, job_id: str) -> str:
    return store.get(job_id).state


def test_second_trainer_waits_and_takes_over_when_the_first_is_killed_mid_job(
    registry_copy: Registry, start_trainer, mnist_test
) -> None:
    store = JobStore(registry_copy)
    long_job = queue_job(store, mnist_test, 200, epochs=50)
    short_job = queue_job(store, mnist_test, 40, epochs=1)
    first = start_trainer(registry_copy.root)
    assert wait_until(lambda: state(store, long_job) == "running", 90), first.log()
    second = start_trainer(registry_copy.root)
    assert wait_until(lambda: "waiting" in second.log(), 60), second.log()
    # the second trainer holds back: one fine-tune at a time across everything on this registry
    assert state(store, long_job) == "running" and state(store, short_job) == "queued"
    assert "trainer ready" not in second.log()

    first.kill_group()  # mid-job; the kernel releases its lock
    assert wait_until(lambda: state(store, long_job) == "failed", 30), second.log()
    assert "interrupted" in store.get(long_job).message
    assert wait_until(lambda: state(store, short_job) in ("succeeded", "rejected"), 120), second.log()


def test_sigterm_mid_job_marks_it_failed_and_exits_cleanly(registry_copy: Registry, start_trainer,
                                                           mnist_test) -> None:
    store = JobStore(registry_copy)
    job = queue_job(store, mnist_test, 200, epochs=50)
    trainer = start_trainer(registry_copy.root)
    assert wait_until(lambda: store.get(job).progress.get("epoch", 0) >= 1, 90), trainer.log()
    trainer.process.terminate()
    assert trainer.process.wait(30) == 0, trainer.log()
    record = store.get(job)
    assert record.state == "failed" and "interrupted" in record.message, record
    assert "trainer stopped" in trainer.log()


def test_refuses_a_registry_without_a_model(tmp_path: Path, start_trainer) -> None:
    trainer = start_trainer(Registry(tmp_path / "empty").root)
    assert trainer.process.wait(60) == 2
    assert "no active model" in trainer.log()
    assert list((tmp_path / "empty" / "jobs").iterdir()) == []
