"""Fine-tuning on uploaded samples: hold-out split, MNIST replay mixing, promotion gate.

Replay: uploaded samples are mixed with a random draw of MNIST training images (about 1:1
by default), so the model learns the new handwriting without forgetting the old.
Gate: promote only if MNIST test accuracy drops by at most ``max_accuracy_drop`` and the
candidate is not worse than the base on the held-out part of the upload beyond chance. The
held-out set is small (tens of images), so two accuracies on it are noise; the test is paired:
an exact McNemar test on the samples one model gets right and the other wrong (under "no
worse", each such discordant sample is broken by the candidate with probability 1/2), rejecting
when the one-sided p-value of that many broken samples is below ``holdout_alpha``.

Evidence: with fewer than ``min_holdout_samples`` held-out images no test can tell a worse
candidate from chance (two images: the smallest p-value is 0.25), so such an upload is not
promoted, whatever its figures (send at least ``min_holdout_samples / holdout_fraction`` samples).

Slices: the candidate must not be worse than the base on any slice of :mod:`model.slices`
beyond chance: the same exact McNemar test per slice, Holm's step-down correction over the
slices so that the chance of rejecting a candidate that hurts no slice stays at ``slice_alpha``.

Shadow: given a ``shadow`` judge (the service's shadow evaluation, service/loop/shadow.py), the
candidate is replayed beside the base on recent traffic and people's reviewed items; a candidate
worse on the reviewed items beyond chance (the same exact test, at ``review_alpha``) is rejected.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from model.finetune_options import FinetuneOptions
from model.slices import ReadSlice, correct_per_slice
from model.train import EpochStats, TrainConfig, evaluate, predict_logits, train


@dataclass
class FinetuneOutcome:
    promoted: bool
    reason: str
    model: nn.Module
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    shadow: dict[str, Any] | None = None  # the shadow judge's report, when there was one


def split_holdout(
    images: torch.Tensor, labels: torch.Tensor, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random split; at least one sample on each side when there are two or more."""
    n = len(images)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = min(max(1, round(n * fraction)), n - 1) if n >= 2 else 0
    hold, keep = order[:held], order[held:]
    return images[keep], labels[keep], images[hold], labels[hold]


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float | None:
    return evaluate(model, images, labels).accuracy if len(images) else None


def correct(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """bool [N]: which samples the model gets right."""
    if not len(images):
        return torch.zeros(0, dtype=torch.bool)
    return predict_logits(model, images).argmax(1) == labels


def worse_p_value(fixed: int, broken: int) -> float:
    """Exact one-sided McNemar p-value that a candidate which broke ``broken`` samples and fixed
    ``fixed`` is worse: P(X >= broken), X ~ Binomial(fixed + broken, 1/2)."""
    n = fixed + broken
    return sum(math.comb(n, k) for k in range(broken, n + 1)) / 2**n


@dataclass(frozen=True)
class Gate:
    """The promotion decision and the figures it rests on."""

    promoted: bool
    reason: str
    metrics: dict[str, Any]


def slice_decisions(before: dict[str, np.ndarray], after: dict[str, np.ndarray],
                    alpha: float) -> dict[str, dict[str, Any]]:
    """Per slice: accuracy before and after, samples fixed and broken, the one-sided McNemar
    p-value, and whether it is worse (Holm's step-down over all slices at ``alpha``)."""
    table = {}
    for name, base_right in before.items():
        candidate_right = after[name]
        fixed = int((candidate_right & ~base_right).sum())
        broken = int((base_right & ~candidate_right).sum())
        table[name] = {"before": round(float(base_right.mean()), 4), "after": round(float(candidate_right.mean()), 4),
                       "n": len(base_right), "fixed": fixed, "broken": broken,
                       "p_value": round(worse_p_value(fixed, broken), 6), "worse": False}
    ordered = sorted(table, key=lambda name: table[name]["p_value"])
    for rank, name in enumerate(ordered):
        if table[name]["p_value"] >= alpha / (len(ordered) - rank):
            break
        table[name]["worse"] = True
    return table


def gate(base_right: torch.Tensor, candidate_right: torch.Tensor, mnist_before: float, mnist_after: float,
         options: FinetuneOptions, slices_before: dict[str, np.ndarray] | None = None,
         slices_after: dict[str, np.ndarray] | None = None, shadow: dict[str, Any] | None = None) -> Gate:
    """Promote only on enough held-out evidence, and unless MNIST fell by more than the bound,
    the held-out upload got worse beyond chance, or any slice did, or (``shadow``, a report with
    ``worse`` and ``decision``) the reviewed traffic did."""
    fixed = int((candidate_right & ~base_right).sum())
    broken = int((base_right & ~candidate_right).sum())
    p_value = worse_p_value(fixed, broken)
    held = (f"held-out upload {_pct(_mean(base_right))} -> {_pct(_mean(candidate_right))} "
            f"({fixed} fixed, {broken} broken, p = {p_value:.3g})")
    figures = f"MNIST test {mnist_before:.2%} -> {mnist_after:.2%}, {held}"
    metrics: dict[str, Any] = {"holdout_fixed": fixed, "holdout_broken": broken,
                               "holdout_worse_p_value": round(p_value, 6), "holdout_alpha": options.holdout_alpha,
                               "min_holdout_samples": options.min_holdout_samples}
    if slices_before is not None:
        metrics["guard_slices"] = options.guard_slices
    worse_slices: list[str] = []
    if slices_before is not None and slices_after is not None:
        metrics["slices"] = slice_decisions(slices_before, slices_after, options.slice_alpha)
        metrics["slice_alpha"] = options.slice_alpha
        worse_slices = [name for name, row in metrics["slices"].items() if row["worse"]]
        figures += f", no slice worse (Holm, alpha {options.slice_alpha})" if not worse_slices else ""
    failures = []
    if len(base_right) < options.min_holdout_samples:
        failures.append(f"too little evidence: {len(base_right)} held-out samples, a promotion needs at least "
                        f"{options.min_holdout_samples} (upload at least "
                        f"{math.ceil(options.min_holdout_samples / options.holdout_fraction)} samples)")
    drop = mnist_before - mnist_after
    if drop > options.max_accuracy_drop:
        failures.append(f"MNIST accuracy fell {drop:.2%} (> {options.max_accuracy_drop:.2%})")
    if p_value < options.holdout_alpha:
        failures.append(f"worse on the held-out upload (p = {p_value:.3g} < {options.holdout_alpha})")
    if worse_slices:
        rows = metrics["slices"]
        worse = "worse on slice " + ", ".join(
            f"{name} {rows[name]['before']:.2%} -> {rows[name]['after']:.2%} ({rows[name]['fixed']} fixed, "
            f"{rows[name]['broken']} broken, p = {rows[name]['p_value']:.3g})" for name in worse_slices
        ) + f" (Holm, alpha {options.slice_alpha})"
        if options.guard_slices:
            failures.append(worse)
        else:
            figures += f", slices not guarded (guard_slices false): {worse}"
    if shadow is not None and shadow["worse"]:
        failures.append(f"shadow evaluation: {shadow['decision']}")
    if failures:
        return Gate(False, f"rejected: {'; '.join(failures)}; {figures}", metrics)
    return Gate(True, f"promoted: {figures}", metrics)


def finetune(
    base: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    mnist_train: tuple[torch.Tensor, torch.Tensor],
    mnist_test: tuple[torch.Tensor, torch.Tensor],
    options: FinetuneOptions,
    on_epoch: Callable[[EpochStats], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    slices: list[ReadSlice] | None = None,
    shadow: Callable[[nn.Module], dict[str, Any]] | None = None,
) -> FinetuneOutcome:
    """Train a copy of ``base`` on uploaded uint8 digits [N,28,28]; decide on promotion
    (``slices``: the slice suite, read through the preprocessing, for the per-slice gate;
    ``shadow(candidate)``: the shadow evaluation's report, for the shadow rule)."""
    started = time.perf_counter()
    train_x, train_y, hold_x, hold_y = split_holdout(images, labels, options.holdout_fraction, options.seed)
    base_right = correct(base, hold_x, hold_y)
    before = {"mnist_test_accuracy": accuracy(base, *mnist_test), "holdout_accuracy": _mean(base_right)}

    replay_count = min(len(mnist_train[0]), round(len(train_x) * options.replay_ratio))
    pick = torch.randperm(len(mnist_train[0]), generator=torch.Generator().manual_seed(options.seed + 1))
    pick = pick[:replay_count]
    replay_x = mnist_train[0][pick]
    mixed_x = torch.cat([train_x, replay_x])
    mixed_y = torch.cat([train_y, mnist_train[1][pick]])
    # Learning without forgetting: on replayed images, also match the base model's outputs.
    teacher = None
    if replay_count:
        teacher = torch.cat([torch.full((len(train_x), 10), float("nan")), predict_logits(base, replay_x)])

    model = copy.deepcopy(base)
    config = TrainConfig(
        epochs=options.epochs,
        batch_size=options.batch_size,
        learning_rate=options.learning_rate,
        augment=False,
        seed=options.seed,
        schedule="constant",
        label_smoothing=0.0,
    )
    train(model, mixed_x, mixed_y, config, teacher_logits=teacher, on_epoch=on_epoch, should_stop=should_stop,
          show_progress=False)
    candidate_right = correct(model, hold_x, hold_y)
    after = {"mnist_test_accuracy": accuracy(model, *mnist_test), "holdout_accuracy": _mean(candidate_right)}
    sizes = {"holdout_samples": len(hold_x), "train_samples": len(train_x), "replay_samples": replay_count}
    before.update(sizes)
    slices_before = correct_per_slice(slices, base) if slices else None
    slices_after = correct_per_slice(slices, model) if slices else None
    report = shadow(model) if shadow is not None else None
    decision = gate(base_right, candidate_right, before["mnist_test_accuracy"], after["mnist_test_accuracy"], options,
                    slices_before, slices_after, report)
    after.update(sizes, **decision.metrics)
    return FinetuneOutcome(decision.promoted, decision.reason, model, before, after, time.perf_counter() - started,
                           report)


def _mean(right: torch.Tensor) -> float | None:
    return float(right.float().mean()) if len(right) else None


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"
