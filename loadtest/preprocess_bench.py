"""`make bench-preprocess`: microseconds per image for model.preprocess.prepare_digit.

Three inputs: an MNIST test digit as a 28x28 PNG (the clean fast path), a 400x300 JPEG phone
photo and a 4000x3000 JPEG phone photo (from model.photoset, ruled paper). One process, one
thread; the median of many timed calls after warm-up. Then every slice of model/slices.py:
the mean over its first ``--per-slice`` images of each image's median time, for this
preprocessing and the first wave's (loadtest/peer_preprocess.py).

    python -m loadtest.preprocess_bench [--runs 300] [--per-slice 20]
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
from PIL import Image

from loadtest import peer_preprocess
from model import slices
from model.data import load_split
from model.photoset import compose
from model.preprocess import declared_pixels, encode_png, prepare_digit
from service.settings import Settings


def photo(digit: np.ndarray, size: tuple[int, int]) -> bytes:
    rendered = Image.open(io.BytesIO(compose(np.random.default_rng(3), digit, "ruled", max(size))))
    buffer = io.BytesIO()
    rendered.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def median_us(data: bytes, runs: int, prepare=prepare_digit) -> float:
    for _ in range(max(3, runs // 20)):
        try_prepare(prepare, data)
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        try_prepare(prepare, data)
        samples.append(time.perf_counter() - started)
    return float(np.median(samples)) * 1e6


def try_prepare(prepare, data: bytes) -> None:
    try:
        prepare(data)
    except ValueError:  # an image a preprocessing refuses costs what it cost to refuse
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(Settings().data_dir))
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--per-slice", type=int, default=20, help="images timed per slice")
    args = parser.parse_args()
    images, labels = load_split(args.data_dir, train=False)
    digit = images[0].numpy()
    cases = {
        "28x28 PNG (MNIST digit)": (encode_png(digit), args.runs * 10),
        "400x300 JPEG photo": (photo(digit, (400, 300)), args.runs),
        "4000x3000 JPEG photo": (photo(digit, (4000, 3000)), max(10, args.runs // 10)),
    }
    print("prepare_digit in one thread, median of N calls")
    print(f"{'input':<26}{'bytes':>10}{'pixels':>12}{'us/image':>12}{'N':>7}")
    for name, (data, runs) in cases.items():
        print(f"{name:<26}{len(data):>10,}{declared_pixels(data):>12,}{median_us(data, runs):>12,.0f}{runs:>7}")
    print(f"\nper slice: mean over {args.per_slice} images of each one's median of 5 calls, us/image")
    print(f"{'slice':<26}{'this wave':>12}{'first wave':>12}")
    for piece in slices.build_suite(images.numpy(), labels.numpy(), scale=args.per_slice / slices.DEFAULT_SIZE):
        data = piece.images[: args.per_slice]
        ours = np.mean([median_us(d, 5) for d in data])
        theirs = np.mean([median_us(d, 5, peer_preprocess.prepare_digit) for d in data])
        print(f"{piece.name:<26}{ours:>12,.0f}{theirs:>12,.0f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
