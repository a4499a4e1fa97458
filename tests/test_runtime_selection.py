"""Runtime selection and hot swaps in the service: torch.compile vs ONNX Runtime, the fallback,
swaps in every model-holding process, and the watcher retrying after a failure."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from model.data import normalize
from model.nets import build
from model.preprocess import prepare_digit
from model.publish import PARITY_IMAGES, publish_model
from service.inference.model_slot import ModelSlot
from service.inference.runtimes import RuntimeOptions
from tests.conftest import png_of, post_png, wait_until


def digits_from(url: str, images) -> tuple[list[int], set[str]]:
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda image: post_png(url, png_of(image)), images))
    assert all(r.status_code == 200 for r in responses)
    return [r.json()["digit"] for r in responses], {r.json()["runtime"] for r in responses}


def wait_for_version(url: str, png: bytes, version: str, timeout: float = 2.0) -> dict | None:
    return wait_until(lambda: (r := post_png(url, png).json())["model_version"] == version and r, timeout,
                      interval=0.05)


def test_torch_and_onnx_modes_agree_and_torch_swaps_weights_in_place(start_server, registry_copy, mnist_test) -> None:
    images = mnist_test[0][:200]
    torch_server = start_server(registry_copy.root, runtime="torch", max_batch_size=4, trainer_enabled="false")
    onnx_server = start_server(registry_copy.root, runtime="onnx", trainer_enabled="false")
    torch_digits, torch_runtimes = digits_from(torch_server.url, images)
    onnx_digits, onnx_runtimes = digits_from(onnx_server.url, images)
    assert torch_runtimes == {"torch-compile"} and onnx_runtimes == {"onnxruntime"}
    assert torch_digits == onnx_digits
    assert requests.get(f"{torch_server.url}/ready", timeout=5).json()["runtime_reason"] == "DIGITS_RUNTIME=torch"

    model, manifest = registry_copy.load_model()
    with torch.no_grad():
        model.classifier[-1].bias += 100.0 * torch.nn.functional.one_hot(torch.tensor(3), 10)  # bias towards "3"
    published = publish_model(registry_copy, model, manifest.arch, mnist_test[0][:PARITY_IMAGES], parent="v0001")
    png = png_of(images[0])  # a 7
    for server in (torch_server, onnx_server):
        answer = wait_for_version(server.url, png, published.version)
        assert answer and answer["digit"] == 3  # the new weights are live within 2 s
    assert post_png(torch_server.url, png).json()["runtime"] == "torch-compile"  # same compiled module


def test_compile_failure_at_warm_up_serves_through_onnx(start_server, registry_copy, mnist_test) -> None:
    server = start_server(registry_copy.root, command=[sys.executable, "-m", "tests.faults", "compile-fails"],
                          inference="worker", runtime="auto", trainer_enabled="false")
    response = post_png(server.url, png_of(mnist_test[0][0]))
    assert response.status_code == 200 and response.json()["runtime"] == "onnxruntime"
    assert response.json()["digit"] == int(mnist_test[1][0])
    ready = requests.get(f"{server.url}/ready", timeout=5).json()
    assert "torch.compile failed" in ready["runtime_reason"] and "injected" in ready["runtime_reason"]
    metrics = requests.get(f"{server.url}/metrics", timeout=5).text
    assert 'digits_runtime_info{reason="fallback",runtime="onnxruntime"} 1.0' in metrics


def slot_for(registry, data_dir: Path, mode: str, **changes) -> ModelSlot:
    options = RuntimeOptions(device="cpu", threads=1, buckets=(1,), data_dir=data_dir)
    return ModelSlot(registry, mode, options, measure_runs=2, **changes)


def test_compile_failure_while_serving_falls_back_to_onnx(registry_copy, data_dir: Path, mnist_test) -> None:
    seen = []
    slot = slot_for(registry_copy, data_dir, "torch", on_change=seen.append)
    pixels = mnist_test[0][:1].numpy()
    assert slot.predict(pixels)[1].runtime.name == "torch-compile"

    def broken(_):
        raise RuntimeError("the compiled graph broke")

    slot.serving.runtime.compiled = broken  # the compiled model starts failing mid-service
    probabilities, serving = slot.predict(pixels)
    assert serving.runtime.name == "onnxruntime" and serving.version == "v0001" and serving.code == "fallback"
    assert int(probabilities.argmax()) == int(mnist_test[1][0])
    assert "while serving" in serving.reason and seen == [serving]  # readiness is told


def test_the_watcher_retries_a_swap_that_failed(registry_copy, data_dir: Path, mnist_test) -> None:
    slot = slot_for(registry_copy, data_dir, "onnx")
    model, manifest = registry_copy.load_model()
    published = publish_model(registry_copy, model, manifest.arch, mnist_test[0][:PARITY_IMAGES], parent="v0001")
    weights = registry_copy.version_dir(published.version) / "model.safetensors"
    weights.rename(weights.with_suffix(".away"))  # the ONNX file is fine, but a re-export would need these
    registry_copy.onnx_path(published.version).write_bytes(b"corrupt")
    with pytest.raises(Exception, match=r"(?i)protobuf|onnx|parse|load|safetensors|no such file"):
        slot.refresh()
    assert slot.serving.version == "v0001"  # still serving, marker unchanged
    weights.with_suffix(".away").rename(weights)
    assert slot.refresh() and slot.serving.version == published.version  # the next poll succeeds
    assert slot.predict(mnist_test[0][:1].numpy())[1].version == published.version


def test_missing_onnx_is_re_exported_at_startup(start_server, registry_copy, mnist_test) -> None:
    registry_copy.onnx_path("v0001").unlink()
    server = start_server(registry_copy.root, trainer_enabled="false")
    assert post_png(server.url, png_of(mnist_test[0][0])).json()["digit"] == int(mnist_test[1][0])
    assert registry_copy.verify_artifact("v0001", "model.onnx")


def test_every_model_holder_swaps_within_two_seconds(start_server, registry_copy, mnist_test) -> None:
    """Two inference workers, and two API servers holding the model: all serve a new version within 2 s,
    also one of another architecture."""
    workers = start_server(registry_copy.root, inference="worker", workers=2, trainer_enabled="false")
    api = start_server(registry_copy.root, api_servers=2, trainer_enabled="false")
    for server, role in ((workers, "worker"), (api, "api")):
        holders = requests.get(f"{server.url}/ready", timeout=5).json()["holders"]
        assert sorted((h["role"], h["index"]) for h in holders) == [(role, 0), (role, 1)]
    simple = build("simplenet")  # untrained: another architecture, other answers
    published = publish_model(registry_copy, simple, "simplenet", mnist_test[0][:PARITY_IMAGES], parent="v0001")
    png = png_of(mnist_test[0][0])
    for server in (workers, api):
        assert wait_until(lambda s=server: all(h["model_version"] == published.version for h in
                                               requests.get(f"{s.url}/ready", timeout=5).json()["holders"]), 2.0)
        with ThreadPoolExecutor(8) as pool:  # enough concurrent requests to reach every holder
            versions = {r.json()["model_version"] for r in pool.map(lambda _, s=server: post_png(s.url, png),
                                                                     range(64))}
        assert versions == {published.version}
    # the answers are the new architecture's own, not the old model's under a new label
    with torch.no_grad():
        expected = torch.softmax(simple.eval()(normalize(torch.from_numpy(prepare_digit(png)[None]))), 1)[0]
    for server in (workers, api):
        np.testing.assert_allclose(post_png(server.url, png).json()["probabilities"], expected.numpy(), atol=1e-4)
