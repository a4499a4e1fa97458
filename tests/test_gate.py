"""The promotion gate: an exact McNemar test on paired held-out predictions plus the MNIST bound,
decided on real fine-tunes in-process (no server: the admin tests cover the HTTP path)."""

from __future__ import annotations

import math

import pytest
import torch

from model.finetune import FinetuneOptions, finetune, gate, worse_p_value

MNIST_SUBSET = 2000  # enough to see a real drop, cheap to evaluate


def test_p_value_is_the_exact_binomial_tail() -> None:
    assert worse_p_value(0, 0) == 1.0
    assert worse_p_value(0, 1) == 0.5  # one broken sample, nothing fixed: a coin flip
    assert worse_p_value(0, 5) == pytest.approx(1 / 32)
    assert worse_p_value(5, 0) == 1.0
    assert worse_p_value(2, 8) == pytest.approx(sum(math.comb(10, k) for k in range(8, 11)) / 1024)
    assert worse_p_value(3, 3) == pytest.approx(0.65625)


def test_one_flip_in_forty_is_promoted_and_counted() -> None:
    """The issue's case: 40 held-out images all right before, one wrong after, MNIST unchanged."""
    base = torch.ones(40, dtype=torch.bool)
    candidate = base.clone()
    candidate[7] = False
    decision = gate(base, candidate, 0.995, 0.995, FinetuneOptions())
    assert decision.promoted, decision.reason
    assert decision.metrics == {"holdout_fixed": 0, "holdout_broken": 1, "holdout_worse_p_value": 0.5,
                                "holdout_alpha": 0.05}
    assert "1 broken" in decision.reason and "p = 0.5" in decision.reason


def test_clearly_worse_held_out_or_mnist_drop_is_rejected() -> None:
    base = torch.ones(40, dtype=torch.bool)
    candidate = base.clone()
    candidate[:6] = False  # 6 broken, none fixed: p = 1/64
    assert not gate(base, candidate, 0.995, 0.995, FinetuneOptions()).promoted
    assert gate(base, candidate, 0.995, 0.995, FinetuneOptions(holdout_alpha=0.01)).promoted
    dropped = gate(base, base, 0.995, 0.98, FinetuneOptions())
    assert not dropped.promoted and "MNIST accuracy fell" in dropped.reason


@pytest.fixture(scope="module")
def base_model(base_registry):
    return base_registry.load_model()[0]


def small_finetune(base_model, mnist_train, mnist_test, labels_of, **options):
    images, labels = mnist_test
    upload = images[-100:]  # the last test digits; the gate measures MNIST on the first ones
    test_subset = (images[:MNIST_SUBSET], labels[:MNIST_SUBSET])
    return finetune(base_model, upload, labels_of(labels[-100:]), mnist_train, test_subset,
                    FinetuneOptions(epochs=2, **options))


def test_a_small_honest_upload_is_promoted_with_its_counts(base_model, mnist_train, mnist_test) -> None:
    outcome = small_finetune(base_model, mnist_train, mnist_test, lambda labels: labels)
    assert outcome.promoted, outcome.reason
    after = outcome.after
    assert after["holdout_samples"] == 20
    assert after["holdout_fixed"] + after["holdout_broken"] <= 20
    assert after["holdout_worse_p_value"] >= 0.05 and after["holdout_alpha"] == 0.05


def test_shuffled_labels_are_rejected(base_model, mnist_train, mnist_test) -> None:
    generator = torch.Generator().manual_seed(0)
    outcome = small_finetune(base_model, mnist_train, mnist_test,
                             lambda labels: labels[torch.randperm(len(labels), generator=generator)],
                             learning_rate=0.01, replay_ratio=0)
    assert not outcome.promoted, outcome.reason
    assert outcome.reason.startswith("rejected")
    assert {"holdout_fixed", "holdout_broken", "holdout_worse_p_value"} <= outcome.after.keys()
