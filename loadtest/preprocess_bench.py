"""`make bench-preprocess`: microseconds per image for model.preprocess.prepare_digit.

Three inputs: an MNIST test digit as a 28x28 PNG (the clean fast path), a 400x300 JPEG phone
photo and a 4000x3000 JPEG phone photo (from tests.photoset, ruled paper). One process, one
thread; the median of many timed calls after warm-up.

    python -m loadtest.preprocess_bench [--runs 300]
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
from PIL import Image

from model.data import load_split
from model.preprocess import declared_pixels, encode_png, prepare_digit
from service.settings import Settings
from tests.photoset import compose


def photo(digit: np.ndarray, size: tuple[int, int]) -> bytes:
    rendered = Image.open(io.BytesIO(compose(np.random.default_rng(3), digit, "ruled", max(size))))
    buffer = io.BytesIO()
    rendered.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def median_us(data: bytes, runs: int) -> float:
    for _ in range(max(3, runs // 20)):
        prepare_digit(data)
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        prepare_digit(data)
        samples.append(time.perf_counter() - started)
    return float(np.median(samples)) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(Settings().data_dir))
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()
    images, _ = load_split(args.data_dir, train=False)
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
