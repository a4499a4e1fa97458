"""One training loop (Adam + cross-entropy, as in the seed tutorial), used by base training
and by fine-tuning, and one evaluation routine.

Data stays as uint8 tensors in memory and is batched by index: at 28x28 that is faster and
simpler than a DataLoader of PIL images.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from model.data import normalize


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 128
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    augment: bool = True
    seed: int = 0
    schedule: str = "onecycle"  # "onecycle" (base training) or "constant" (fine-tuning)
    label_smoothing: float = 0.05

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    train_accuracy: float
    samples_per_s: float
    eval_accuracy: float | None = None


@dataclass
class EvalResult:
    accuracy: float
    per_class_accuracy: list[float]
    confusion: list[list[int]] = field(repr=False)

    def to_dict(self) -> dict:
        return asdict(self)


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def random_affine(
    x: torch.Tensor,
    generator: torch.Generator,
    max_degrees: float = 8.0,
    scale: tuple[float, float] = (0.92, 1.08),
    max_shift: float = 0.08,
) -> torch.Tensor:
    """A different small rotation, scale and shift for every image of a batch [N,1,H,W].

    The background of a normalized image is not 0, so we warp (x - bg) and add bg back.
    """
    n = x.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(max_degrees)
    factor = torch.empty(n).uniform_(*scale, generator=generator)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * max_shift * 2  # grid units span 2
    cos, sin = torch.cos(angle) / factor, torch.sin(angle) / factor
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    background = x.amin(dim=(1, 2, 3), keepdim=True)
    return F.grid_sample(x - background, grid, align_corners=False, padding_mode="zeros") + background


def train(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    evaluate_on: tuple[torch.Tensor, torch.Tensor] | None = None,
    teacher_logits: torch.Tensor | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    show_progress: bool = True,
) -> list[EpochStats]:
    """Train in place on uint8 images [N,28,28] with int64 labels; return per-epoch stats.

    ``teacher_logits`` [N,10] (NaN rows for samples without one) adds a distillation term
    that keeps the model's outputs on those samples close to a teacher's: fine-tuning uses
    it on replayed MNIST images so the new model remembers what the old one knew.
    """
    model.to(memory_format=torch.channels_last)  # measurably faster convolutions on CPU
    generator = seed_everything(config.seed)
    steps_per_epoch = math.ceil(len(images) / config.batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    if config.schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.learning_rate, epochs=config.epochs, steps_per_epoch=steps_per_epoch
        )
    else:
        scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    history: list[EpochStats] = []
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        total_loss, correct, seen, started = 0.0, 0, 0, time.perf_counter()
        bar = tqdm(
            range(steps_per_epoch), desc=f"epoch {epoch}/{config.epochs}", disable=not show_progress, leave=True
        )
        for step in bar:
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            x, y = normalize(images[index]), labels[index]
            if config.augment:
                x = random_affine(x, generator)
            logits = model(x.contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
            if teacher_logits is not None:
                loss = loss + distillation_loss(logits, teacher_logits[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            if step % 20 == 0 or step == steps_per_epoch - 1:
                rate = seen / (time.perf_counter() - started)
                bar.set_postfix(loss=f"{total_loss / seen:.4f}", samples_s=f"{rate:,.0f}")
            if should_stop and should_stop():
                raise InterruptedError("training stopped on request")
        stats = EpochStats(epoch, total_loss / seen, correct / seen, seen / (time.perf_counter() - started))
        if evaluate_on is not None:
            stats.eval_accuracy = evaluate(model, *evaluate_on).accuracy
        history.append(stats)
        if on_epoch:
            on_epoch(stats)
    model.eval()
    return history


def distillation_loss(logits: torch.Tensor, teacher: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """KL(teacher || student) at a temperature, over the rows that have a teacher."""
    rows = ~teacher.isnan().any(dim=1)
    if not rows.any():
        return logits.new_zeros(())
    student = F.log_softmax(logits[rows] / temperature, dim=1)
    target = F.log_softmax(teacher[rows] / temperature, dim=1)
    return F.kl_div(student, target, log_target=True, reduction="batchmean") * temperature**2


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    model.eval()
    return torch.cat([model(normalize(images[i : i + batch_size])) for i in range(0, len(images), batch_size)])


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> EvalResult:
    """Accuracy, per-class accuracy and the confusion matrix (rows: true digit)."""
    predicted = predict_logits(model, images).argmax(1)
    confusion = torch.zeros(10, 10, dtype=torch.long)
    confusion.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
    per_class = (confusion.diag().float() / confusion.sum(1).clamp(min=1).float()).tolist()
    return EvalResult(
        accuracy=(predicted == labels).float().mean().item(),
        per_class_accuracy=per_class,
        confusion=confusion.tolist(),
    )
