"""CPU serving without torch: the real server, with torch made unimportable in all its processes.

A directory put first on PYTHONPATH holds a ``torch`` package whose import raises ImportError, as
in the serve-cpu image where torch is not installed (a torch-less venv would take minutes to build).
The test process itself has torch: it publishes the versions the server then swaps to.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
import torch
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http

from devtools.serverctl import ServerProcess, settings_env
from model.onnx_serving import INPUT_NAME, OUTPUT_NAME, ort_session
from model.publish import PARITY_IMAGES, publish_model
from tests.conftest import ROOT, png_of, post_png, serves_everywhere, service_process, wait_until

BLOCKED = "torch is not installed (blocked by tests/test_torchless.py)"


@pytest.fixture
def no_torch(tmp_path: Path) -> dict[str, str]:
    """The environment of a process in which ``import torch`` fails."""
    package = tmp_path / "no-torch" / "torch"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"raise ImportError({BLOCKED!r})\n")
    env = {"PYTHONPATH": os.pathsep.join([str(package.parent), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    check = subprocess.run([sys.executable, "-c", "import torch"], env={**os.environ, **env}, capture_output=True,
                           text=True, timeout=60)
    assert check.returncode != 0 and BLOCKED in check.stderr  # the blocker works
    return env


@pytest.fixture
def start_torchless(tmp_path: Path, no_torch: dict[str, str]):
    """start_torchless(registry, wait_ready, **settings): `python -m service` without torch, on the
    defaults a CPU replica runs with (inference and runtime auto), the trainer disabled."""
    started = []

    def start(registry: Path, wait_ready: float = 180.0, **settings: object):
        defaults = {"runtime": "auto", "inference": "auto", "device": "auto", "trainer_enabled": "false"}
        server = service_process(registry, **{**defaults, **settings})
        server.env.update(no_torch)
        started.append(server)
        return server.start(tmp_path, wait_ready)

    yield start
    for server in started:
        server.stop()


def biased_model(registry, digit: int):
    """The base model (loaded with torch, here in the test), changed to answer ``digit``."""
    model, manifest = registry.load_model("v0001")
    with torch.no_grad():
        model.classifier[-1].bias += 100.0 * torch.nn.functional.one_hot(torch.tensor(digit), 10)
    return model, manifest.arch


def test_serves_predict_v2_grpc_and_hot_swaps_without_torch(start_torchless, registry_copy, mnist_test) -> None:
    biased, arch = biased_model(registry_copy, digit=3)
    (registry_copy.version_dir("v0001") / "model.safetensors").unlink()  # serving needs model.onnx + manifest
    server = start_torchless(registry_copy.root)
    ready = requests.get(f"{server.url}/ready", timeout=5)
    assert ready.status_code == 200 and ready.json()["runtime"] == "onnxruntime"
    spawned = [c for c in psutil.Process(server.process.pid).children() if "spawn_main" in " ".join(c.cmdline())]
    assert spawned == []  # the model is in the API servers: no inference worker is started
    images, labels = mnist_test[0][:20].numpy(), mnist_test[1][:20].numpy()

    answers = [post_png(server.url, png_of(image)).json() for image in images]
    assert np.mean([a["digit"] for a in answers] == labels) >= 0.9
    assert {a["runtime"] for a in answers} == {"onnxruntime"} and {a["model_version"] for a in answers} == {"v0001"}
    big = post_png(server.url, png_of(np.kron(images[0], np.ones((16, 16), np.uint8))))  # 448 px: the decoder process
    assert big.status_code == 200 and big.json()["digit"] == answers[0]["digit"]

    # the V2 pixels input is the model's own input: the answers are the ONNX file's, run here
    session = ort_session(registry_copy.onnx_path("v0001"), providers=["CPUExecutionProvider"])
    expected = session.run([OUTPUT_NAME], {INPUT_NAME: images})[0].argmax(1).tolist()
    http = triton_http.InferenceServerClient(f"127.0.0.1:{server.port}")
    pixels = triton_http.InferInput("pixels", list(images.shape), "UINT8")
    pixels.set_data_from_numpy(images, binary_data=True)
    assert http.is_server_ready() and http.infer("digits", [pixels]).as_numpy("digit").tolist() == expected
    http.close()
    with triton_grpc.InferenceServerClient(server.grpc_address) as grpc:
        tensor = triton_grpc.InferInput("pixels", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images)
        assert grpc.is_model_ready("digits")
        assert grpc.infer("digits", [tensor]).as_numpy("digit").tolist() == expected

    published = publish_model(registry_copy, biased, arch, mnist_test[0][:PARITY_IMAGES], parent="v0001")
    png = png_of(images[0])  # a 7
    assert serves_everywhere(server.url, published.version, 5.0)
    answer = post_png(server.url, png).json()
    assert answer["model_version"] == published.version and answer["digit"] == 3
    assert answer["runtime"] == "onnxruntime"


def test_a_version_without_onnx_is_reported_then_served_once_exported(start_torchless, registry_copy, mnist_test,
                                                                      data_dir: Path, tmp_path: Path) -> None:
    """Trained elsewhere, no model.onnx: the torch-less replica stays up, unready, and says why in
    /ready, /predict and its log; it serves as soon as the trainer (with torch) has exported the file."""
    registry_copy.onnx_path("v0001").unlink()
    server = start_torchless(registry_copy.root, wait_ready=0)

    def not_ready_report() -> dict | None:
        try:
            response = requests.get(f"{server.url}/ready", timeout=2)
        except requests.ConnectionError:
            return None
        return response.status_code == 503 and "reason" in response.json() and response.json()

    report = wait_until(not_ready_report, 120.0)
    assert report, server.log_tail()
    assert "v0001 has no model.onnx" in report["reason"] and "torch is not installed" in report["reason"]
    assert "python -m model" in report["reason"] and report["problems"] == {"api 0": report["reason"]}
    response = post_png(server.url, png_of(mnist_test[0][0]))
    assert response.status_code == 503 and response.json()["error"] == "model_unavailable"
    assert "v0001 has no model.onnx" in response.json()["detail"]
    assert "v0001 has no model.onnx" in server.log_tail(20_000)
    assert server.process.poll() is None  # up, not crash-looping

    # the trainer (with torch) exports what the registry's versions lack when it starts
    trainer = ServerProcess(env=settings_env(registry=registry_copy.root, data_dir=data_dir),
                            command=[sys.executable, "-m", "service.finetune.trainer"]).start(tmp_path, wait_ready=0)
    try:
        assert wait_until(lambda: requests.get(f"{server.url}/ready", timeout=2).status_code == 200, 120.0), \
            trainer.log_tail()
    finally:
        trainer.stop()
    assert registry_copy.verify_artifact("v0001", "model.onnx")
    answer = post_png(server.url, png_of(mnist_test[0][0])).json()
    assert answer["digit"] == int(mnist_test[1][0]) and answer["model_version"] == "v0001"
    assert np.isclose(sum(answer["probabilities"]), 1.0, atol=1e-4)


def test_a_swap_to_a_version_without_onnx_is_reported_in_ready(start_torchless, registry_copy, mnist_test) -> None:
    """A newly activated version the torch-less replica cannot load: it keeps serving the one it
    has (ready, not converged) and /ready's problems say which version and why, until it is over."""
    biased, arch = biased_model(registry_copy, digit=3)
    server = start_torchless(registry_copy.root, api_servers=2)
    published = publish_model(registry_copy, biased, arch, mnist_test[0][:PARITY_IMAGES], parent="v0001")
    assert serves_everywhere(server.url, published.version, 5.0)
    registry_copy.onnx_path("v0001").unlink()  # v0001, activated again, cannot be served here now
    registry_copy.activate("v0001")

    def reported() -> dict | None:
        body = requests.get(f"{server.url}/ready", timeout=2).json()
        return body if len(body.get("problems", {})) == body["holders_expected"] else None

    report = wait_until(reported, 30.0)
    assert report, server.log_tail()
    assert report["ready"] and not report["converged"] and report["active_version"] == "v0001"
    assert report["serving_versions"] == [published.version]
    assert set(report["problems"]) == {"api 0", "api 1"}
    assert "cannot swap to the active version: v0001 has no model.onnx" in report["reason"]
    assert "torch is not installed" in report["reason"]
    assert requests.get(f"{server.url}/ready", timeout=2).status_code == 200
    answer = post_png(server.url, png_of(mnist_test[0][0])).json()
    assert answer["model_version"] == published.version and answer["digit"] == 3  # still serving

    registry_copy.activate(published.version)  # over: the problem goes with it
    cleared = wait_until(lambda: "problems" not in (body := requests.get(f"{server.url}/ready", timeout=2).json())
                         and body["converged"], 30.0)
    assert cleared, requests.get(f"{server.url}/ready", timeout=2).json()


@pytest.mark.parametrize("settings,needs", [
    ({"trainer_enabled": "true"}, "the fine-tune trainer needs torch"),
    ({"runtime": "torch"}, "inference workers"),
])
def test_what_needs_torch_is_refused_at_start_saying_so(start_torchless, registry_copy, settings, needs) -> None:
    server = start_torchless(registry_copy.root, wait_ready=0, **settings)
    assert server.process.wait(60) == 2
    assert needs in server.log_tail() and "torch is not installed" in server.log_tail()
