"""Shadow evaluation with the real base model on real MNIST: replay on the traffic ring and the
review queue of a real registry, the gate's shadow rule, and the job record's shadow section."""

from __future__ import annotations

import copy
import threading
import time

import numpy as np
import pytest
import torch

from model.finetune import FinetuneOptions, finetune, gate
from model.registry import Registry
from service.finetune.jobs import JobStore
from service.finetune.trainer import run_job
from service.loop.review import Capture, ReviewQueue
from service.loop.shadow import recent_evidence, replay
from service.loop.traffic import TrafficRing
from service.settings import Settings
from tests.conftest import DATA_DIR

REVIEWED = 60


def review(registry: Registry, images: np.ndarray, labels: np.ndarray) -> None:
    """Captured and labelled through the queue, the way reviewers do it."""
    queue = ReviewQueue(registry)
    queue.add([Capture(image, prediction=0, confidence=0.5, version="v0001", time=time.time()) for image in images])
    token, _, items = queue.lease("tester", len(images))
    by_bytes = {image.tobytes(): int(label) for image, label in zip(images, labels, strict=True)}
    for item in items:
        queue.label(item.item_id, token, by_bytes[item.image.tobytes()])


def shifted(model: torch.nn.Module) -> torch.nn.Module:
    """The model with its output classes rotated by one: it answers (digit + 1) % 10."""
    broken = copy.deepcopy(model)
    last = [m for m in broken.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.copy_(last.weight.roll(1, 0))
        last.bias.copy_(last.bias.roll(1, 0))
    return broken


@pytest.fixture
def evidence(registry_copy, mnist_test) -> Registry:
    images, labels = mnist_test
    TrafficRing(registry_copy, 500).append(images[:300].numpy())
    review(registry_copy, images[300:300 + REVIEWED].numpy(), labels[300:300 + REVIEWED].numpy())
    return registry_copy


def test_the_live_model_beside_itself_agrees_and_passes(evidence) -> None:
    base, _ = evidence.load_model()
    traffic, reviewed, labels = recent_evidence(evidence, 500, job_id="none")
    assert traffic.shape == (300, 28, 28) and reviewed.shape == (REVIEWED, 28, 28) and len(labels) == REVIEWED
    report = replay(base, base, traffic, reviewed, labels, 0.05)
    assert report["agreement"] == 1.0 and report["confidence_shift"] == 0.0
    assert report["fixed"] == report["broken"] == 0 and report["p_value"] == 1.0 and not report["worse"]
    assert report["live_accuracy"] == report["candidate_accuracy"] > 0.9


def test_a_candidate_worse_on_reviewed_traffic_is_rejected_by_the_gate(evidence) -> None:
    base, _ = evidence.load_model()
    traffic, reviewed, labels = recent_evidence(evidence, 500, job_id="none")
    report = replay(base, shifted(base), traffic, reviewed, labels, 0.05)
    assert report["worse"] and report["p_value"] < 1e-6 and report["broken"] > 50
    assert report["agreement"] < 0.1 and report["candidate_accuracy"] < 0.1
    held = torch.ones(40, dtype=torch.bool)  # every other rule passes
    rejected = gate(held, held, 0.99, 0.99, FinetuneOptions(), shadow=report)
    assert not rejected.promoted and "shadow evaluation: worse on reviewed traffic" in rejected.reason
    assert gate(held, held, 0.99, 0.99, FinetuneOptions(),
                shadow=replay(base, base, traffic, reviewed, labels, 0.05)).promoted


def test_no_evidence_is_said_and_does_not_block(registry_copy) -> None:
    base, _ = registry_copy.load_model()
    traffic, reviewed, labels = recent_evidence(registry_copy, 500, job_id="none")
    report = replay(base, shifted(base), traffic, reviewed, labels, 0.05)
    assert report["traffic_samples"] == report["reviewed_samples"] == 0 and not report["worse"]
    assert "no reviewed items" in report["decision"] and "no recent traffic" in report["traffic"]
    held = torch.ones(40, dtype=torch.bool)
    assert gate(held, held, 0.99, 0.99, FinetuneOptions(), shadow=report).promoted


def test_finetune_consults_the_judge(evidence, mnist_train, mnist_test) -> None:
    """A real fine-tune whose judge replays a broken stand-in for the candidate: rejected by the shadow rule."""
    base, _ = evidence.load_model()
    traffic, reviewed, labels = recent_evidence(evidence, 500, job_id="none")
    images, upload_labels = mnist_test[0][1000:1100], mnist_test[1][1000:1100]
    outcome = finetune(base, images, upload_labels, mnist_train, (mnist_test[0][:2000], mnist_test[1][:2000]),
                       FinetuneOptions(epochs=1),
                       shadow=lambda candidate: replay(base, shifted(candidate), traffic, reviewed, labels, 0.05))
    assert not outcome.promoted and "shadow evaluation" in outcome.reason
    assert outcome.shadow["worse"] and outcome.shadow["reviewed_samples"] == REVIEWED


def test_the_job_record_gets_a_shadow_section(evidence, mnist_test) -> None:
    store = JobStore(evidence)
    images, labels = mnist_test
    store.create(images[2000:2100].numpy(), labels[2000:2100].numpy(), FinetuneOptions(epochs=1), "upload",
                 max_pending=10)
    record = store.claim_next()
    settings = Settings(registry=evidence.root, data_dir=DATA_DIR, traffic_ring_size=500)
    done = run_job(record, store, evidence, settings, threading.Event())
    shadow = store.get(done.job_id).shadow
    assert shadow is not None, done.message
    assert shadow["traffic_samples"] == 300 and shadow["reviewed_samples"] == REVIEWED
    assert shadow["agreement"] > 0.9 and not shadow["worse"] and "not worse" in shadow["decision"]
