"""The slice suite on the base model: this preprocessing against the first wave's (the frozen
reference in loadtest/peer_preprocess.py) on every slice, and the issue's targets per slice."""

from __future__ import annotations

import numpy as np
import pytest

from loadtest import peer_preprocess
from model import slices
from model.finetune import slice_decisions
from model.preprocess import encode_png, prepare_digit

TIGHT = ("tight_crop", "tight_margin_1", "tight_margin_2")
LOW_RES_UPSCALED = ("low_res_8_upscaled", "low_res_12_upscaled", "low_res_16_upscaled")


@pytest.fixture(scope="module")
def suite(mnist_test) -> list[slices.Slice]:
    images, labels = (t.numpy() for t in mnist_test)
    return slices.build_suite(images, labels)


@pytest.fixture(scope="module")
def right(suite, base_registry) -> dict[str, dict[str, np.ndarray]]:
    """Per preprocessing, per slice: which images the base model reads right."""
    model = base_registry.load_model()[0]
    table = {"this": slices.correct_per_slice(slices.read_suite(suite, prepare_digit), model),
             "reference": slices.correct_per_slice(slices.read_suite(suite, peer_preprocess.prepare_digit), model)}
    columns = {name: slices.accuracies(values) for name, values in table.items()}
    print("\n" + slices.format_table(columns, {piece.name: len(piece.labels) for piece in suite}))
    return table


def accuracy(right, name: str, column: str = "this") -> float:
    return float(right[column][name].mean())


def test_the_suite_is_deterministic_and_complete(mnist_test) -> None:
    images, labels = (t.numpy() for t in mnist_test)
    first = slices.build_slice("tight_crop", images, labels, size=20)
    again = slices.build_slice("tight_crop", images, labels, size=20)
    assert first.images == again.images and (first.labels == again.labels).all()
    assert slices.build_slice("tight_crop", images, labels, size=20, seed=1).images != first.images
    printed = slices.build_slice("printed", images, labels, size=50)
    assert set(printed.labels.tolist()) == set(range(10))
    assert len(slices.font_paths()) >= 9  # DejaVu, Liberation and FreeFont faces (make test installs them)
    assert {"mnist_png", "printed", *TIGHT, *LOW_RES_UPSCALED} <= set(slices.SLICE_NAMES)
    assert {f"photo_{c}" for c in slices.photoset.CONDITIONS} <= set(slices.SLICE_NAMES)


def test_no_slice_is_worse_than_the_first_wave(right) -> None:
    """A paired exact McNemar test per slice (the first wave as 'before'), Holm-corrected at 0.05."""
    table = slice_decisions(right["reference"], right["this"], alpha=0.05)
    worse = {name: row for name, row in table.items() if row["worse"]}
    assert not worse, worse


def test_tight_crops_read_within_half_a_point_of_clean_mnist(right) -> None:
    clean = accuracy(right, "mnist_png")
    assert {name: accuracy(right, name) for name in TIGHT if accuracy(right, name) < clean - 0.005} == {}


def test_low_resolution_upscaled_reads_at_least_97_percent(right) -> None:
    assert {name: accuracy(right, name) for name in LOW_RES_UPSCALED if accuracy(right, name) < 0.97} == {}


def test_printed_digits_read_at_least_99_5_percent(right) -> None:
    assert accuracy(right, "printed") >= 0.995


def test_photos_read_at_least_98_percent(right) -> None:
    photos = np.concatenate([values for name, values in right["this"].items() if name.startswith("photo_")])
    assert photos.mean() >= 0.98


def test_the_whole_mnist_test_set_as_pngs_reads_at_least_99_5_percent(mnist_test, base_registry) -> None:
    images, labels = (t.numpy() for t in mnist_test)
    whole = slices.Slice("mnist_test", "all 10,000", tuple(encode_png(d) for d in images), labels.astype(np.int64))
    right = slices.correct_per_slice([slices.read_slice(whole, prepare_digit)], base_registry.load_model()[0])
    assert right["mnist_test"].mean() >= 0.995
