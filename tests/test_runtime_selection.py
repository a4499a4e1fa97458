"""Runtime selection in the service: torch.compile vs ONNX Runtime, and the fallback."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch

from model.publish import PARITY_IMAGES, publish_model
from service.predict import ModelHolder
from service.settings import Settings
from tests.conftest import png_of, post_png, wait_until


def digits_from(url: str, images) -> list[int]:
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda image: post_png(url, png_of(image)), images))
    assert all(r.status_code == 200 for r in responses)
    return [r.json()["digit"] for r in responses], {r.json()["runtime"] for r in responses}


def test_torch_and_onnx_modes_agree_and_torch_swaps_weights_in_place(start_server, registry_copy, data_dir,
                                                                      mnist_test) -> None:
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
        started = time.monotonic()
        answer = wait_until(lambda s=server: (r := post_png(s.url, png).json())["model_version"] == published.version
                            and r, 2.0, interval=0.05)
        assert answer and time.monotonic() - started <= 2.5
        assert answer["digit"] == 3  # the new weights are live
    assert post_png(torch_server.url, png).json()["runtime"] == "torch-compile"  # same compiled module


def test_compile_failure_at_warm_up_serves_through_onnx(start_server, registry_copy, mnist_test) -> None:
    server = start_server(registry_copy.root, runtime="auto", test_fail_compile="true", trainer_enabled="false")
    response = post_png(server.url, png_of(mnist_test[0][0]))
    assert response.status_code == 200 and response.json()["runtime"] == "onnxruntime"
    assert response.json()["digit"] == int(mnist_test[1][0])
    ready = requests.get(f"{server.url}/ready", timeout=5).json()
    assert "torch.compile failed" in ready["runtime_reason"]
    metrics = requests.get(f"{server.url}/metrics", timeout=5).text
    assert 'digits_runtime_info{reason="fallback",runtime="onnxruntime"} 1.0' in metrics


def test_compile_failure_while_serving_falls_back_to_onnx(registry_copy, data_dir: Path, mnist_test,
                                                        tmp_path: Path) -> None:
    settings = Settings(registry=registry_copy.root, data_dir=data_dir, runtime="torch", max_batch_size=1,
                        run_dir=tmp_path)
    holder = ModelHolder(settings, "cpu", worker_id=0)
    pixels = mnist_test[0][:1].numpy()
    _, _, runtime = holder.predict(pixels)
    assert runtime == "torch-compile"
    holder.runtime.fail_compile = True  # the compiled model starts failing mid-service
    probabilities, version, runtime = holder.predict(pixels)
    assert runtime == "onnxruntime" and version == "v0001"
    assert int(probabilities.argmax()) == int(mnist_test[1][0])
    assert "while serving" in holder.reason


def test_missing_onnx_is_re_exported_at_startup(start_server, registry_copy, mnist_test) -> None:
    registry_copy.onnx_path("v0001").unlink()
    server = start_server(registry_copy.root, runtime="onnx", trainer_enabled="false")
    assert post_png(server.url, png_of(mnist_test[0][0])).json()["digit"] == int(mnist_test[1][0])
    assert registry_copy.verify_artifact("v0001", "model.onnx")


def test_every_worker_swaps_within_two_seconds(start_server, registry_copy, mnist_test) -> None:
    server = start_server(registry_copy.root, runtime="onnx", workers=2, trainer_enabled="false")
    ready = requests.get(f"{server.url}/ready", timeout=5).json()
    assert ready["workers_expected"] == 2 and {w["worker"] for w in ready["workers"]} == {0, 1}
    model, manifest = registry_copy.load_model()
    published = publish_model(registry_copy, model, manifest.arch, mnist_test[0][:PARITY_IMAGES], parent="v0001")
    time.sleep(2.0)
    png = png_of(mnist_test[0][0])
    with ThreadPoolExecutor(8) as pool:  # enough concurrent requests to reach both workers
        versions = {r.json()["model_version"] for r in pool.map(lambda _: post_png(server.url, png), range(64))}
    assert versions == {published.version}
    workers = requests.get(f"{server.url}/ready", timeout=5).json()["workers"]
    assert [w["model_version"] for w in workers] == [published.version] * 2
