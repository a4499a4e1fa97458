"""What the capture tap costs an API server, per prediction: on the request path (``Tap.observe``)
and in its background thread (``Tap.write``: metrics, captures, the traffic ring), with the
default rules, on a scratch registry.

    python -m loadtest.capture_bench [--predictions 20000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", type=int, default=20_000)
    parser.add_argument("--unsure", type=float, default=0.02, help="share of predictions below the threshold")
    args = parser.parse_args()
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="capture-bench-"))
    from model.registry import Registry
    from service.loop.capture import Observed, Rules, Tap
    from service.loop.review import ReviewQueue
    from service.loop.traffic import TrafficRing
    from service.settings import Settings

    settings = Settings()
    registry = Registry(tempfile.mkdtemp(prefix="capture-bench-registry-"))
    rules = Rules.of(settings)
    tap = Tap(ReviewQueue(registry), TrafficRing(registry, settings.traffic_ring_size), rules,
              queue_size=args.predictions, seed=0)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (1, 28, 28), dtype=np.uint8)
    sure, unsure = np.zeros((1, 10), np.float32), np.full((1, 10), 0.1, np.float32)
    sure[0, 3] = 1.0
    rows = [unsure if rng.random() < args.unsure else sure for _ in range(args.predictions)]

    started = time.perf_counter()
    for probabilities in rows:
        tap.observe(pixels, probabilities, "v0001")
    observe_us = (time.perf_counter() - started) / args.predictions * 1e6
    batch = [Observed(pixels, probabilities, "v0001", time.time(), None) for probabilities in rows]
    started = time.perf_counter()
    for start in range(0, len(batch), 512):
        tap.write(batch[start:start + 512])
    write_us = (time.perf_counter() - started) / args.predictions * 1e6
    print(f"{args.predictions:,} predictions, {args.unsure:.0%} unsure, sample {rules.sample:.0%}, ring every "
          f"{rules.traffic_every}: observe (request path) {observe_us:.2f} us, write (background thread) "
          f"{write_us:.1f} us per prediction")


if __name__ == "__main__":
    main()
