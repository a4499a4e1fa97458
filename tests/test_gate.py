"""The promotion gate: an exact McNemar test on paired held-out predictions plus the MNIST bound,
decided on real fine-tunes in-process (no server: the admin tests cover the HTTP path)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model import slices
from model.finetune import FinetuneOptions, finetune, gate, worse_p_value
from model.preprocess import prepare_digit

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
                                "holdout_alpha": 0.05, "min_holdout_samples": 20}
    assert "1 broken" in decision.reason and "p = 0.5" in decision.reason


def test_clearly_worse_held_out_or_mnist_drop_is_rejected() -> None:
    base = torch.ones(40, dtype=torch.bool)
    candidate = base.clone()
    candidate[:6] = False  # 6 broken, none fixed: p = 1/64
    assert not gate(base, candidate, 0.995, 0.995, FinetuneOptions()).promoted
    assert gate(base, candidate, 0.995, 0.995, FinetuneOptions(holdout_alpha=0.01)).promoted
    dropped = gate(base, base, 0.995, 0.98, FinetuneOptions())
    assert not dropped.promoted and "MNIST accuracy fell" in dropped.reason


def test_too_few_held_out_samples_are_not_evidence_enough() -> None:
    """Issue 17's case: 2 held-out images (a 30-sample upload at less than the default fraction) cannot
    tell a worse candidate from chance, so the rule is a minimum of held-out samples, named in the reason."""
    options = FinetuneOptions()
    few = gate(torch.tensor([True, False]), torch.tensor([False, False]), 0.995, 0.995, options)
    assert not few.promoted and few.reason.startswith("rejected: too little evidence: 2 held-out samples")
    assert "at least 20" in few.reason and "at least 100 samples" in few.reason
    assert few.metrics["min_holdout_samples"] == 20
    perfect = torch.ones(19, dtype=torch.bool)  # even a flawless candidate: 19 < 20
    assert not gate(perfect, perfect, 0.995, 0.995, options).promoted
    enough = torch.ones(20, dtype=torch.bool)
    assert gate(enough, enough, 0.995, 0.995, options).promoted
    assert gate(perfect, perfect, 0.995, 0.995, FinetuneOptions(min_holdout_samples=10)).promoted


def test_a_slice_worse_beyond_chance_is_named_and_holm_spares_noise() -> None:
    base = torch.ones(40, dtype=torch.bool)
    rng = np.random.default_rng(0)
    before = {f"slice_{i}": rng.random(200) < 0.97 for i in range(20)}
    after = {name: values.copy() for name, values in before.items()}
    for values in after.values():  # one flip each way on every slice: noise
        values[np.flatnonzero(values)[0]] = False
        values[np.flatnonzero(~values)[-1]] = True
    calm = gate(base, base, 0.995, 0.995, FinetuneOptions(), before, after)
    assert calm.promoted, calm.reason
    assert calm.metrics["slices"]["slice_3"]["fixed"] == 1 and calm.metrics["slices"]["slice_3"]["broken"] == 1
    after["slice_7"][np.flatnonzero(after["slice_7"])[:12]] = False  # 12 more broken, none fixed
    hurt = gate(base, base, 0.995, 0.995, FinetuneOptions(), before, after)
    assert not hurt.promoted and "worse on slice slice_7" in hurt.reason, hurt.reason
    assert [name for name, row in hurt.metrics["slices"].items() if row["worse"]] == ["slice_7"]
    # 4 broken on one slice of 20 is p = 1/16 alone, not beyond chance among 20 slices
    after["slice_7"] = before["slice_7"].copy()
    after["slice_7"][np.flatnonzero(after["slice_7"])[:4]] = False
    assert gate(base, base, 0.995, 0.995, FinetuneOptions(), before, after).promoted


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


# ------------------------------------------------------------------ the gate guards every slice


@pytest.fixture(scope="module")
def guarded(mnist_test) -> list[slices.ReadSlice]:
    images, labels = (t.numpy() for t in mnist_test)
    return slices.gate_suite(images, labels)


def rendered_upload(mnist_train, name: str, size: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` images of slice ``name`` made from MNIST *training* digits (not the suite's),
    through the preprocessing as an upload is."""
    images, labels = (t.numpy() for t in mnist_train)
    read = slices.read_slice(slices.build_slice(name, images, labels, size=size, seed=1), prepare_digit)
    assert read.readable.all()
    return torch.from_numpy(read.digits), torch.from_numpy(read.labels)


def guarded_finetune(base_model, upload, mnist_train, mnist_test, guarded, **options):
    images, labels = mnist_test
    test_subset = (images[:MNIST_SUBSET], labels[:MNIST_SUBSET])
    return finetune(base_model, *upload, mnist_train, test_subset, FinetuneOptions(**options), slices=guarded)


def test_an_upload_that_helps_one_slice_and_hurts_none_is_promoted(base_model, mnist_train, mnist_test,
                                                                    guarded) -> None:
    outcome = guarded_finetune(base_model, rendered_upload(mnist_train, "thin"), mnist_train, mnist_test, guarded)
    table = outcome.after["slices"]
    assert outcome.promoted, outcome.reason
    assert table["thin"]["after"] > table["thin"]["before"] and table["thin"]["fixed"] > table["thin"]["broken"]
    assert not any(row["worse"] for row in table.values()) and set(table) == {piece.name for piece in guarded}
    assert "no slice worse" in outcome.reason


def test_an_upload_that_quietly_hurts_one_slice_is_rejected_naming_it(base_model, mnist_train, mnist_test,
                                                                       guarded) -> None:
    """Printed digits, a third of them 7s labelled 1: the held-out part agrees with its own labels
    and the MNIST bound lets it pass, but the printed slice reads its 7s as 1s. (Learning printed
    shapes also costs the tall and 8x8 slices here; the gate names every slice it finds worse.)"""
    digits, labels = rendered_upload(mnist_train, "printed", size=900)
    pick = torch.cat([torch.nonzero(labels == 7)[:, 0][:100], torch.nonzero(labels != 7)[:, 0][:200]])
    digits, labels = digits[pick], labels[pick]
    outcome = guarded_finetune(base_model, (digits, torch.where(labels == 7, 1, labels)), mnist_train, mnist_test,
                               guarded)
    table = outcome.after["slices"]
    assert not outcome.promoted and " printed " in outcome.reason.split(";")[0], outcome.reason
    assert outcome.after["holdout_worse_p_value"] >= 0.05  # the upload's own held-out part sees no harm
    assert table["printed"]["worse"] and table["printed"]["broken"] > table["printed"]["fixed"]
