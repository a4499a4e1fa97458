"""The prediction service over real HTTP: answers, bad input, batching isolation, operations."""

from __future__ import annotations

import base64
import re
import signal
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.conftest import ServerProcess, copy_registry, png_of, post_png, still_running


@pytest.fixture(scope="module")
def server(base_registry, tmp_path_factory) -> ServerProcess:
    root = tmp_path_factory.mktemp("server")
    registry = copy_registry(base_registry, root / "registry")
    proc = ServerProcess(registry.root, env={"DIGITS_API_SERVERS": "2", "DIGITS_MAX_BODY_BYTES": str(5 * 1024 * 1024)})
    proc.start(root)
    yield proc
    proc.stop()


def test_200_mnist_test_pngs_are_classified(server: ServerProcess, mnist_test) -> None:
    images, labels = mnist_test
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda i: post_png(server.url, png_of(images[i])), range(200)))
    assert all(r.status_code == 200 for r in responses)
    bodies = [r.json() for r in responses]
    correct = sum(b["digit"] == int(labels[i]) for i, b in enumerate(bodies))
    assert correct >= 196, correct
    first = bodies[0]
    assert set(first) == {"digit", "confidence", "probabilities", "model_version", "runtime", "request_id"}
    assert len(first["probabilities"]) == 10 and abs(sum(first["probabilities"]) - 1) < 1e-3
    assert first["confidence"] == max(first["probabilities"])
    assert first["model_version"] == "v0001" and first["runtime"] == "onnxruntime"
    assert responses[0].headers["x-request-id"] == first["request_id"]


def test_json_base64_and_data_url(server: ServerProcess, mnist_test) -> None:
    images, labels = mnist_test
    encoded = base64.b64encode(png_of(images[1])).decode()
    for image in (encoded, "data:image/png;base64," + encoded):
        response = requests.post(f"{server.url}/predict", json={"image": image}, timeout=30)
        assert response.status_code == 200 and response.json()["digit"] == int(labels[1])


def test_client_request_id_is_echoed(server: ServerProcess, mnist_test) -> None:
    response = post_png(server.url, png_of(mnist_test[0][2]), headers={"X-Request-ID": "trace-42"})
    assert response.headers["x-request-id"] == "trace-42" and response.json()["request_id"] == "trace-42"


def huge_png_header() -> bytes:
    ihdr = struct.pack(">IIBBBBB", 50000, 50000, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 5000)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
            + struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat)))


NOISE_PNG = png_of(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))
BAD_REQUESTS = {
    "text_bytes_as_file": (dict(files={"file": ("x.png", b"this is not an image", "image/png")}), {415}),
    "corrupt_png": (dict(files={"file": ("x.png", NOISE_PNG[: len(NOISE_PNG) // 2], "image/png")}), {415, 422}),
    "blank_image": (dict(files={"file": ("x.png", png_of(np.zeros((28, 28), np.uint8)), "image/png")}), {422}),
    "body_over_limit": (dict(data=b"0" * (5 * 1024 * 1024 + 10), headers={"Content-Type": "application/json"}),
                        {413}),
    "decompression_bomb": (dict(files={"file": ("bomb.png", huge_png_header(), "image/png")}), {413, 422}),
    "missing_file_field": (dict(files={"other": ("x.png", b"abc", "image/png")}), {422}),
    "missing_json_field": (dict(json={"picture": "abc"}), {422}),
    "malformed_json": (dict(data=b'{"image": ', headers={"Content-Type": "application/json"}), {422}),
    "bad_base64": (dict(json={"image": "!!!not base64!!!"}), {422}),
    "unsupported_content_type": (dict(data=b"hello", headers={"Content-Type": "text/plain"}), {415}),
    "no_content_type": (dict(data=b"hello"), {415}),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_gets_a_clear_4xx_json(server: ServerProcess, case: str) -> None:
    kwargs, statuses = BAD_REQUESTS[case]
    response = requests.post(f"{server.url}/predict", timeout=30, **kwargs)
    assert response.status_code in statuses, (response.status_code, response.text)
    body = response.json()
    assert body["error"] and body["detail"] and body["request_id"] == response.headers["x-request-id"]


def test_bad_request_never_fails_its_batch_neighbours(server: ServerProcess, mnist_test) -> None:
    images, labels = mnist_test
    for _round in range(3):
        barrier = threading.Barrier(8)

        def send(i: int, barrier: threading.Barrier = barrier) -> requests.Response:
            barrier.wait()
            if i == 3:
                return requests.post(f"{server.url}/predict", files={"file": ("g.png", b"\x89PNG garbage")}, timeout=30)
            return post_png(server.url, png_of(images[i]))

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(send, range(8)))
        assert 400 <= responses[3].status_code < 500
        for i, response in enumerate(responses):
            if i != 3:
                assert response.status_code == 200 and response.json()["digit"] == int(labels[i])


def test_health_ready_docs(server: ServerProcess) -> None:
    assert requests.get(f"{server.url}/health", timeout=5).json() == {"status": "alive"}
    ready = requests.get(f"{server.url}/ready", timeout=5).json()
    assert ready["ready"] and ready["model_version"] == "v0001" and ready["runtime"] == "onnxruntime"
    spec = requests.get(f"{server.url}/openapi.json", timeout=5).json()
    predict = spec["paths"]["/predict"]["post"]
    assert {"multipart/form-data", "application/json"} <= set(predict["requestBody"]["content"])
    assert "PredictResponse" in str(predict["responses"]["200"])
    assert requests.get(f"{server.url}/docs", timeout=5).status_code == 200


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        if re.fullmatch(re.escape(name) + r"(\{.*\})?", head) and all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def test_metrics_add_up_across_processes(server: ServerProcess, mnist_test) -> None:
    before = requests.get(f"{server.url}/metrics", timeout=5).text
    n = 40
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: post_png(server.url, png_of(mnist_test[0][i])), range(n)))
    requests.post(f"{server.url}/predict", data=b"x", headers={"Content-Type": "text/plain"}, timeout=5)
    after = requests.get(f"{server.url}/metrics", timeout=5).text

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("digits_http_requests_total", route="/predict", status="200") == n
    assert delta("digits_http_requests_total", route="/predict", status="415") == 1
    assert delta("digits_batch_size_sum") == n  # every accepted request went through one batch
    assert delta("digits_batch_size_count") <= n
    assert delta("digits_queue_wait_seconds_count") == n
    assert delta("digits_http_request_duration_seconds_count", route="/predict") == n + 1
    assert metric(after, "digits_model_info", version="v0001", runtime="onnxruntime") == 1
    assert metric(after, "digits_runtime_info", runtime="onnxruntime", reason="configured") == 1


def test_ready_is_503_until_warm_and_sigterm_stops_every_process(base_registry, tmp_path: Path,
                                                               mnist_test) -> None:
    registry = copy_registry(base_registry, tmp_path / "registry")
    server = ServerProcess(registry.root).start(tmp_path, wait_ready=0)
    try:
        statuses = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and 200 not in statuses:
            try:
                statuses.append(requests.get(f"{server.url}/ready", timeout=2).status_code)
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        assert statuses[0] == 503 and statuses[-1] == 200, statuses[:3]

        descendants = server.descendants()
        assert len(descendants) >= 3  # API server, inference worker, trainer (+ helpers)
        results: list[int | str] = []

        def client(i: int) -> None:
            try:
                results.append(post_png(server.url, png_of(mnist_test[0][i % 50]), timeout=30).status_code)
            except requests.ConnectionError:
                results.append("refused")

        threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
        for thread in threads:
            thread.start()
        time.sleep(0.05)
        server.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(60)
        assert server.process.wait(60) == 0
        assert all(r in (200, "refused") for r in results), results  # accepted requests finished
        assert 200 in results
        assert still_running(descendants) == []
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{server.url}/health", timeout=2)
    finally:
        server.stop()


def test_sigint_also_stops_every_process(base_registry, tmp_path: Path) -> None:
    registry = copy_registry(base_registry, tmp_path / "registry")
    server = ServerProcess(registry.root).start(tmp_path)
    try:
        descendants = server.descendants()
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(60) == 0
        assert still_running(descendants) == []
    finally:
        server.stop()


def test_greedy_batching_answers_lone_and_concurrent_requests(start_server, registry_copy, mnist_test) -> None:
    """DIGITS_BATCHING=greedy: no batching window; a batch is whatever queued while the worker was busy."""
    images, labels = mnist_test
    server = start_server(registry_copy.root, batching="greedy", trainer_enabled="false")
    lone = post_png(server.url, png_of(images[0]))
    assert lone.status_code == 200 and lone.json()["digit"] == int(labels[0])
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda i: post_png(server.url, png_of(images[i])), range(64)))
    assert [r.json()["digit"] for r in responses] == [int(label) for label in labels[:64]]
    text = requests.get(f"{server.url}/metrics", timeout=5).text
    assert metric(text, "digits_batch_size_sum") == 65
    assert metric(text, "digits_batch_size_count") < 65  # some requests did share a batch
    time.sleep(2.5)  # idle past the queue's one-second wait: the worker still answers afterwards
    assert post_png(server.url, png_of(images[1])).json()["digit"] == int(labels[1])
