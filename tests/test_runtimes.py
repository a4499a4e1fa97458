"""The two runtimes: compiled torch reuses its graphs (no recompilation at steady state or on
a weight swap), and both agree with eager torch."""

from __future__ import annotations

import re

import numpy as np
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from model.data import normalize
from model.onnx_serving import ensure_onnx
from service.inference.runtimes import OnnxRuntime, RuntimeOptions, choose_runtime
from service.inference.torch_runtime import CompiledTorchRuntime


def eager_probabilities(model, pixels: np.ndarray) -> np.ndarray:
    """Written out here on purpose: an independent check of the serving contract."""
    with torch.no_grad():
        return torch.softmax(model(normalize(torch.from_numpy(pixels))), 1).numpy()


def test_compiled_runtime_reuses_bucket_graphs_and_swaps_weights_without_recompiling(
    base_registry, mnist_test
) -> None:
    torch._dynamo.reset()
    model, manifest = base_registry.load_model()
    eager, _ = base_registry.load_model()
    runtime = CompiledTorchRuntime(model, manifest.version, manifest.arch, "cpu", [1, 2, 4])
    runtime.warm_up()
    compiled_after_warmup = counters["stats"]["unique_graphs"]
    assert compiled_after_warmup >= 3
    pixels = mnist_test[0][:9].numpy()
    for n in (1, 2, 3, 4, 3, 1, 9):  # 3 pads to bucket 4; 9 runs as 4 + 4 + 1
        got = runtime.probabilities(pixels[:n])
        assert got.shape == (n, 10)
        np.testing.assert_allclose(got, eager_probabilities(eager, pixels[:n]), atol=1e-5)
    assert counters["stats"]["unique_graphs"] == compiled_after_warmup

    zeroed = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    runtime.load_weights(zeroed, "v9999")
    out = runtime.probabilities(pixels[:2])
    np.testing.assert_allclose(out, np.full((2, 10), 0.1), atol=1e-6)  # zero weights -> uniform
    assert runtime.version == "v9999"
    assert counters["stats"]["unique_graphs"] == compiled_after_warmup


def test_onnx_runtime_matches_eager_torch(registry_copy, data_dir, mnist_test) -> None:
    model, manifest = registry_copy.load_model()
    path = ensure_onnx(registry_copy, manifest.version, data_dir)
    runtime = OnnxRuntime(path, manifest.version, manifest.arch, threads=1)
    pixels = mnist_test[0][:64].numpy()
    np.testing.assert_allclose(runtime.probabilities(pixels), eager_probabilities(model, pixels), atol=1e-5)


def test_auto_on_cpu_measures_both_and_explains_the_choice(registry_copy) -> None:
    options = RuntimeOptions(device="cpu", threads=1, buckets=(1, 2))
    choice = choose_runtime(registry_copy, "v0001", "auto", options, measure_runs=3)
    assert choice.code == "measured"
    measured = {name: float(ms) for name, ms in re.findall(r"(torch-compile|onnxruntime) ([\d.]+) ms", choice.reason)}
    assert set(measured) == {"torch-compile", "onnxruntime"}, choice.reason
    other = ({"torch-compile", "onnxruntime"} - {choice.runtime.name}).pop()
    assert measured[choice.runtime.name] <= measured[other], choice.reason  # the faster one serves
    assert choice.runtime.probabilities(np.zeros((2, 28, 28), np.uint8)).shape == (2, 10)
