"""PNG plots saved beside a published version: training curves and the confusion matrix."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from model.train import EpochStats


def plot_training(history: list[EpochStats], path: Path) -> None:
    epochs = [s.epoch for s in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, [s.train_loss for s in history], marker="o")
    loss_ax.set(title="training loss", xlabel="epoch", ylabel="cross-entropy")
    acc_ax.plot(epochs, [100 * s.train_accuracy for s in history], marker="o", label="train (augmented)")
    if all(s.eval_accuracy is not None for s in history):
        acc_ax.plot(epochs, [100 * s.eval_accuracy for s in history], marker="o", label="MNIST test")
    acc_ax.set(title="accuracy", xlabel="epoch", ylabel="%")
    acc_ax.legend()
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.set_xticks(epochs)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(confusion: list[list[int]], path: Path, title: str = "confusion matrix (MNIST test)") -> None:
    fig, ax = plt.subplots(figsize=(6, 5.5))
    image = ax.imshow(confusion, cmap="Blues")
    for row in range(10):
        for col in range(10):
            count = confusion[row][col]
            if count:
                color = "white" if count > max(map(max, confusion)) / 2 else "black"
                ax.text(col, row, str(count), ha="center", va="center", fontsize=7, color=color)
    ax.set(title=title, xlabel="predicted digit", ylabel="true digit", xticks=range(10), yticks=range(10))
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
