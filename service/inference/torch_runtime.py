"""The torch.compile runtime; imported only where torch serves (workers on CUDA, DIGITS_RUNTIME=torch)."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn

from model.nets import ProbabilityHead
from service.inference.runtimes import TORCH_COMPILE

log = logging.getLogger("digits.runtime")


def compile_head(net: nn.Module) -> nn.Module:
    """The compiled serving graph (one place, so a test can make compiling fail)."""
    return torch.compile(ProbabilityHead(net), dynamic=False)


class CompiledTorchRuntime:
    """torch.compile'd model; batches are padded up to fixed bucket sizes so every graph is reused,
    and batches larger than the largest bucket run in chunks."""

    name = TORCH_COMPILE

    def __init__(self, net: nn.Module, version: str, arch: str, device: str, buckets: list[int]) -> None:
        self.version, self.arch, self.device, self.buckets = version, arch, torch.device(device), sorted(buckets)
        self.net = net.to(self.device).eval()
        self.compiled = compile_head(self.net)

    def _bucket(self, n: int) -> int:
        return next(size for size in self.buckets if size >= n)

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        largest = self.buckets[-1]
        if len(pixels) > largest:
            return np.concatenate([self.probabilities(pixels[i : i + largest]) for i in range(0, len(pixels), largest)])
        n = len(pixels)
        padded = np.zeros((self._bucket(n), 28, 28), dtype=np.uint8)
        padded[:n] = pixels
        with torch.inference_mode():
            out = self.compiled(torch.from_numpy(padded).to(self.device, non_blocking=True))
        return out[:n].float().cpu().numpy()

    def warm_up(self, buckets: list[int] | None = None) -> None:
        for size in self.buckets if buckets is None else buckets:
            started = time.perf_counter()
            self.probabilities(np.zeros((size, 28, 28), dtype=np.uint8))
            log.info("compiled bucket %d in %.1f s", size, time.perf_counter() - started)

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: str) -> None:
        """Copy new weights into the already-compiled module: same tensors, so no recompilation."""
        with torch.no_grad():
            for name, tensor in self.net.state_dict().items():
                tensor.copy_(state_dict[name])
        self.version = version
