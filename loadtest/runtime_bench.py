"""`make bench-runtimes`: per-batch latency of eager torch, torch.compile and ONNX Runtime.

Same model (the active version), same inputs, in one process; the median of many timed
runs after warm-up, at batch 1, 8 and 64, with ratios to eager torch.

    python -m loadtest.runtime_bench [--threads N] [--runs 200]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

from model.nets import ProbabilityHead
from model.onnx_serving import ensure_onnx
from model.registry import Registry
from service.inference.runtimes import OnnxRuntime, time_runtime
from service.inference.torch_runtime import CompiledTorchRuntime
from service.settings import Settings

BATCHES = (1, 8, 64)


class EagerRuntime:
    name = "torch eager"

    def __init__(self, net: torch.nn.Module) -> None:
        self.head = ProbabilityHead(net).eval()

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.head(torch.from_numpy(pixels)).numpy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", default=str(Settings().registry))
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    registry = Registry(args.registry)
    model, manifest = registry.load_model()
    eager_model, _ = registry.load_model()
    print(f"{manifest.version} ({manifest.arch}), {args.threads} thread(s), median of {args.runs} runs; "
          "compiling the batch sizes first ...", flush=True)
    runtimes = [
        EagerRuntime(eager_model),
        CompiledTorchRuntime(model, manifest.version, manifest.arch, "cpu", list(BATCHES)),
        OnnxRuntime(ensure_onnx(registry, manifest.version), manifest.version, manifest.arch, threads=args.threads),
    ]
    runtimes[1].warm_up()
    names = ["torch eager", "torch.compile", "onnxruntime"]
    rng = np.random.default_rng(0)
    table = {}
    for batch in BATCHES:
        pixels = rng.integers(0, 256, (batch, 28, 28), dtype=np.uint8)
        table[batch] = [time_runtime(runtime, pixels, args.runs, warmup=5) * 1e3 for runtime in runtimes]
    header = "".join(f"{n + ' ms':>18}" for n in names) + "".join(f"{'x ' + n:>18}" for n in names[1:])
    print(f"\n{'batch':>5} {header}")
    for batch, times in table.items():
        print(f"{batch:>5} " + "".join(f"{t:>18.3f}" for t in times)
              + "".join(f"{times[0] / t:>17.1f}x" for t in times[1:]))
    print("(x = how many times faster than eager torch)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
