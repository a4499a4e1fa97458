"""Fine-tuning on uploaded samples: hold-out split, MNIST replay mixing, promotion gate.

Replay: uploaded samples are mixed with a random draw of MNIST training images (about 1:1
by default), so the model learns the new handwriting without forgetting the old.
Gate: promote only if MNIST test accuracy drops by at most ``max_accuracy_drop`` and
accuracy on the held-out part of the upload does not fall.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from model.train import EpochStats, TrainConfig, evaluate, predict_logits, train


@dataclass
class FinetuneOptionsLike:
    """The knobs fine-tuning reads (service.schemas.FinetuneOptions provides them)."""

    epochs: int = 8
    learning_rate: float = 5e-4
    batch_size: int = 64
    replay_ratio: float = 1.0
    holdout_fraction: float = 0.2
    max_accuracy_drop: float = 0.005
    seed: int = 0


@dataclass
class FinetuneOutcome:
    promoted: bool
    reason: str
    model: nn.Module
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


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


def finetune(
    base: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    mnist_train: tuple[torch.Tensor, torch.Tensor],
    mnist_test: tuple[torch.Tensor, torch.Tensor],
    options: FinetuneOptionsLike,
    on_epoch: Callable[[EpochStats], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> FinetuneOutcome:
    """Train a copy of ``base`` on uploaded uint8 digits [N,28,28]; decide on promotion."""
    started = time.perf_counter()
    train_x, train_y, hold_x, hold_y = split_holdout(images, labels, options.holdout_fraction, options.seed)
    before = {"mnist_test_accuracy": accuracy(base, *mnist_test), "holdout_accuracy": accuracy(base, hold_x, hold_y)}

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
    after = {"mnist_test_accuracy": accuracy(model, *mnist_test), "holdout_accuracy": accuracy(model, hold_x, hold_y)}
    before.update(holdout_samples=len(hold_x), train_samples=len(train_x), replay_samples=replay_count)
    after.update(holdout_samples=len(hold_x), train_samples=len(train_x), replay_samples=replay_count)

    drop = before["mnist_test_accuracy"] - after["mnist_test_accuracy"]
    figures = (
        f"MNIST test {before['mnist_test_accuracy']:.2%} -> {after['mnist_test_accuracy']:.2%}, "
        f"held-out upload {_pct(before['holdout_accuracy'])} -> {_pct(after['holdout_accuracy'])}"
    )
    if drop > options.max_accuracy_drop:
        limit = options.max_accuracy_drop
        promoted, reason = False, f"rejected: MNIST accuracy fell {drop:.2%} (> {limit:.2%}); {figures}"
    elif before["holdout_accuracy"] is not None and after["holdout_accuracy"] < before["holdout_accuracy"]:
        promoted, reason = False, f"rejected: held-out accuracy fell; {figures}"
    else:
        promoted, reason = True, f"promoted: {figures}"
    return FinetuneOutcome(promoted, reason, model, before, after, time.perf_counter() - started)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"
