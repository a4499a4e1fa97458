"""Turning a trained model into a registry version: weights, ONNX (with parity), plots.

Base training and fine-tuning both publish through :func:`publish_model`, so every version
gets the same artifacts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model import data
from model.export import export_with_parity
from model.nets import build
from model.registry import ONNX, Manifest, Registry
from model.slices import gate_suite, slice_table
from model.train import EpochStats, EvalResult, TrainConfig, evaluate, train

PARITY_IMAGES = 1000
DEFAULT_EPOCHS = {"digitnet": 5, "simplenet": 5}
DEFAULT_LR = {"digitnet": 3e-3, "simplenet": 1e-3}


def publish_model(
    registry: Registry,
    model: nn.Module,
    arch: str,
    parity_images: torch.Tensor,
    *,
    extra_artifacts: Callable[[Path], None] | None = None,
    **manifest_fields: Any,
) -> Manifest:
    """Publish weights + model.onnx (parity-checked) + any extra files, then activate."""

    def write_artifacts(directory: Path, version: str) -> None:
        export_with_parity(model, directory / ONNX, version, arch, parity_images)
        if extra_artifacts is not None:
            extra_artifacts(directory)

    return registry.publish(model, arch, write_artifacts=write_artifacts, **manifest_fields)


def train_base_model(
    data_dir: Path,
    registry_root: Path,
    arch: str = "digitnet",
    epochs: int | None = None,
    batch_size: int = 128,
    learning_rate: float | None = None,
    augment: bool = True,
    seed: int = 0,
    limit: int | None = None,
) -> Manifest:
    """Train from scratch on MNIST, evaluate on the 10k test set, publish and activate."""
    from model.plots import plot_confusion, plot_training

    train_images, train_labels = data.load_split(data_dir, train=True)
    test_images, test_labels = data.load_split(data_dir, train=False)
    if limit:
        train_images, train_labels = train_images[:limit], train_labels[:limit]
    config = TrainConfig(
        epochs=epochs or DEFAULT_EPOCHS.get(arch, 4),
        batch_size=batch_size,
        learning_rate=learning_rate or DEFAULT_LR.get(arch, 1e-3),
        augment=augment,
        seed=seed,
    )
    torch.manual_seed(seed)  # the initial weights too
    model = build(arch)
    print(f"training {arch} on {len(train_images):,} MNIST images: {config.to_dict()}", flush=True)
    started = time.perf_counter()
    history: list[EpochStats] = train(
        model,
        train_images,
        train_labels,
        config,
        evaluate_on=(test_images, test_labels),
        on_epoch=lambda s: print(
            f"epoch {s.epoch}: loss {s.train_loss:.4f}, test accuracy {s.eval_accuracy:.4%}", flush=True
        ),
    )
    train_seconds = time.perf_counter() - started
    result: EvalResult = evaluate(model, test_images, test_labels)
    print(f"trained in {train_seconds:.0f} s wall time; test accuracy {result.accuracy:.4%}", flush=True)
    slices = slice_table(gate_suite(test_images.numpy(), test_labels.numpy()), model)
    print("slices: " + ", ".join(f"{name} {row['accuracy']:.2%}" for name, row in slices.items()), flush=True)

    def write_plots(directory: Path) -> None:
        plot_training(history, directory / "training.png")
        plot_confusion(result.confusion, directory / "confusion.png")

    return publish_model(
        Registry(registry_root),
        model,
        arch,
        test_images[:PARITY_IMAGES],
        extra_artifacts=write_plots,
        metrics={
            "test_accuracy": result.accuracy,
            "per_class_accuracy": result.per_class_accuracy,
            "train_seconds": round(train_seconds, 1),
            "slices": slices,
            "history": [vars(s) for s in history],
        },
        data_hash=data.data_hash(data_dir),
        hyperparameters={**config.to_dict(), "train_size": len(train_images)},
    )


def parity_images_for(data_dir: Path | None) -> torch.Tensor:
    """MNIST test images when the data is prepared, else fixed pseudo-random digits-sized noise."""
    if data_dir is not None and data.is_prepared(data_dir):
        return data.load_split(data_dir, train=False)[0][:PARITY_IMAGES]
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (PARITY_IMAGES, 28, 28), dtype=torch.uint8, generator=generator)


def export_version(registry: Registry, version: str | None = None, data_dir: Path | None = None) -> tuple[Path, float]:
    """(Re)write model.onnx of a published version, e.g. when it is missing or corrupt."""
    model, manifest = registry.load_model(version)
    parity_images = parity_images_for(data_dir)
    diff: list[float] = []
    registry.add_artifact(
        manifest.version,
        ONNX,
        lambda path: diff.append(export_with_parity(model, path, manifest.version, manifest.arch, parity_images)),
    )
    return registry.onnx_path(manifest.version), diff[0]
