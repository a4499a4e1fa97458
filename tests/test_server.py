"""The prediction service over real HTTP: answers, bad input, batching isolation, operations."""

from __future__ import annotations

import base64
import json
import re
import signal
import socket
import struct
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests

from devtools.serverctl import ServerProcess
from tests.conftest import (
    access_line,
    copy_registry,
    large_png,
    png_of,
    post_png,
    service_process,
    still_running,
    wait_until,
)
from tests.faults import poison_png


@pytest.fixture(scope="module")
def server(base_registry, tmp_path_factory) -> ServerProcess:
    """The default placement on CPU: ONNX Runtime inside each of two API servers."""
    root = tmp_path_factory.mktemp("server")
    registry = copy_registry(base_registry, root / "registry")
    proc = service_process(registry.root, runtime="auto", api_servers=2, max_body_bytes=5 * 1024 * 1024,
                           trainer_enabled="false")
    proc.start(root)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def worker_server(base_registry, tmp_path_factory) -> ServerProcess:
    """Requests batched in a LitServe inference worker whose model fails on "poison" digits."""
    root = tmp_path_factory.mktemp("worker-server")
    registry = copy_registry(base_registry, root / "registry")
    proc = service_process(registry.root, command=[sys.executable, "-m", "tests.faults", "poison"],
                           inference="worker", batch_timeout=0.02, trainer_enabled="false")
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


def test_explain_returns_the_digit_the_model_saw(server: ServerProcess, mnist_test) -> None:
    import io

    from PIL import Image

    image = mnist_test[0][3].numpy()
    body = post_png(server.url, png_of(image), params={"explain": "true"}).json()
    seen = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["input_png"]))))
    assert seen.shape == (28, 28) and seen.dtype == np.uint8
    assert np.abs(seen.astype(int) - image.astype(int)).mean() < 40  # an MNIST digit stays itself
    assert "input_png" not in post_png(server.url, png_of(image)).json()
    bad = post_png(server.url, png_of(image), params={"explain": "maybe"})
    assert bad.status_code == 422 and bad.json()["error"] == "invalid_query"


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


def chunks_of(data: bytes, size: int = 65536):
    for start in range(0, len(data), size):
        yield data[start : start + size]


NOISE_PNG = png_of(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))
BAD_REQUESTS = {  # case -> (request, status, error code)
    "text_bytes_as_file": (dict(files={"file": ("x.png", b"this is not an image", "image/png")}), 415,
                           "unsupported_image_type"),
    "truncated_png": (dict(files={"file": ("x.png", NOISE_PNG[: len(NOISE_PNG) // 2], "image/png")}), 422,
                      "corrupt_image"),
    "blank_image": (dict(files={"file": ("x.png", png_of(np.zeros((28, 28), np.uint8)), "image/png")}), 422,
                    "no_ink"),
    "body_over_limit": (dict(data=b"0" * (5 * 1024 * 1024 + 10), headers={"Content-Type": "application/json"}),
                        413, "payload_too_large"),
    "chunked_body_over_limit": (dict(data=chunks_of(b"0" * (5 * 1024 * 1024 + 10)),
                                     headers={"Content-Type": "application/json"}), 413, "payload_too_large"),
    "decompression_bomb": (dict(files={"file": ("bomb.png", huge_png_header(), "image/png")}), 413,
                           "image_too_large"),
    "missing_file_field": (dict(files={"other": ("x.png", b"abc", "image/png")}), 422, "missing_file"),
    "missing_json_field": (dict(json={"picture": "abc"}), 422, "invalid_fields"),
    "malformed_json": (dict(data=b'{"image": ', headers={"Content-Type": "application/json"}), 422,
                       "malformed_json"),
    "bad_base64": (dict(json={"image": "!!!not base64!!!"}), 422, "invalid_base64"),
    "multipart_without_boundary": (dict(data=b"x", headers={"Content-Type": "multipart/form-data"}), 422,
                                   "malformed_multipart"),
    "unsupported_content_type": (dict(data=b"hello", headers={"Content-Type": "text/plain"}), 415,
                                 "unsupported_media_type"),
    "no_content_type": (dict(data=b"hello"), 415, "unsupported_media_type"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_gets_a_clear_4xx_json(server: ServerProcess, case: str) -> None:
    kwargs, status, code = BAD_REQUESTS[case]
    response = requests.post(f"{server.url}/predict", timeout=30, **kwargs)
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert body["error"] == code and body["detail"] and body["request_id"] == response.headers["x-request-id"]


def test_wrong_method_gets_405_json(server: ServerProcess) -> None:
    response = requests.get(f"{server.url}/predict", timeout=5)
    assert response.status_code == 405 and response.json()["error"] == "method_not_allowed"


def test_health_ready_docs(server: ServerProcess) -> None:
    assert requests.get(f"{server.url}/health", timeout=5).json() == {"status": "alive"}
    ready = requests.get(f"{server.url}/ready", timeout=5).json()
    assert ready["ready"] and ready["model_version"] == "v0001" and ready["runtime"] == "onnxruntime"
    assert sorted((h["role"], h["index"]) for h in ready["holders"]) == [("api", 0), ("api", 1)]
    spec = requests.get(f"{server.url}/openapi.json", timeout=5).json()
    predict = spec["paths"]["/predict"]["post"]
    assert {"multipart/form-data", "application/json"} <= set(predict["requestBody"]["content"])
    assert "PredictResponse" in str(predict["responses"]["200"]) and "PredictResponse" in spec["components"]["schemas"]
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
    assert delta("digits_batch_size_sum") == n  # in the API servers: one image per model call
    assert delta("digits_http_request_duration_seconds_count", route="/predict") == n + 1
    assert metric(after, "digits_model_info", version="v0001", runtime="onnxruntime") == 1
    assert metric(after, "digits_runtime_info", runtime="onnxruntime", reason="configured") == 1


def test_a_bad_item_in_a_batch_fails_only_its_own_request(worker_server: ServerProcess, mnist_test) -> None:
    """The poison digit passes validation and reaches the worker inside a batch with others; the
    model fails on that batch, each item is retried alone, and only the poison's request fails."""
    images, labels = mnist_test
    before = requests.get(f"{worker_server.url}/metrics", timeout=5).text

    def shared_batches_failed() -> list[int]:
        """Sizes of the failed batches the worker retried item by item (it logs each)."""
        return [int(n) for n in re.findall(r"a batch of (\d+) requests failed", worker_server.log_tail(10**6))]

    rounds = 0
    while rounds < 6 and not shared_batches_failed():  # until the poison shared a batch (the first round, mostly)
        rounds += 1
        barrier = threading.Barrier(8)

        def send(i: int, barrier: threading.Barrier = barrier) -> requests.Response:
            barrier.wait()
            return post_png(worker_server.url, poison_png() if i == 3 else png_of(images[i]))

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(send, range(8)))
        assert responses[3].status_code == 500 and responses[3].json()["error"] == "inference_failed"
        for i, response in enumerate(responses):
            if i != 3:
                assert response.status_code == 200 and response.json()["digit"] == int(labels[i])
    assert wait_until(lambda: any(n > 1 for n in shared_batches_failed()), 5), "the poison never shared a batch"
    after = requests.get(f"{worker_server.url}/metrics", timeout=5).text
    assert metric(after, "digits_batch_size_sum") - metric(before, "digits_batch_size_sum") == 7 * rounds
    assert (metric(after, "digits_queue_wait_seconds_count") - metric(before, "digits_queue_wait_seconds_count")
            == 8 * rounds)


def test_ready_is_503_until_the_worker_is_warm_and_sigterm_drains(base_registry, tmp_path: Path,
                                                                 mnist_test) -> None:
    registry = copy_registry(base_registry, tmp_path / "registry")
    run_dir = tmp_path / "run"
    server = service_process(registry.root, inference="worker", run_dir=run_dir)
    try:
        for attempt in range(2):  # the second start reuses DIGITS_RUN_DIR: old readiness must not count
            server.start(tmp_path, wait_ready=0)
            first = wait_until(lambda: _ready_status(server), 60, interval=0.02)
            assert first == 503, first
            server.wait_ready(120)
            if attempt == 0:
                server.stop()
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
        wait_until(lambda: len(results) >= 4, 30, interval=0.005)
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


def _ready_status(server: ServerProcess) -> int | None:
    try:
        return requests.get(f"{server.url}/ready", timeout=2).status_code
    except requests.ConnectionError:
        return None


def test_sigint_also_stops_every_process(base_registry, tmp_path: Path) -> None:
    registry = copy_registry(base_registry, tmp_path / "registry")
    server = service_process(registry.root).start(tmp_path)
    try:
        descendants = server.descendants()
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(60) == 0
        assert still_running(descendants) == []
    finally:
        server.stop()


def test_greedy_batching_and_batch_size_one_in_the_worker(start_server, registry_copy, mnist_test) -> None:
    """DIGITS_BATCHING=greedy: no batching window; a batch is whatever queued while the worker was
    busy. DIGITS_MAX_BATCH_SIZE=1: LitServe's loop without batch/unbatch."""
    images, labels = mnist_test
    greedy = start_server(registry_copy.root, inference="worker", batching="greedy", trainer_enabled="false")
    single = start_server(registry_copy.root, inference="worker", max_batch_size=1, trainer_enabled="false")
    for server in (greedy, single):
        lone = post_png(server.url, png_of(images[0]))
        assert lone.status_code == 200 and lone.json()["digit"] == int(labels[0])
        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(lambda i, s=server: post_png(s.url, png_of(images[i])), range(64)))
        assert [r.json()["digit"] for r in responses] == [int(label) for label in labels[:64]]
    text = requests.get(f"{greedy.url}/metrics", timeout=5).text
    assert metric(text, "digits_batch_size_sum") == 65
    assert metric(text, "digits_batch_size_count") < 65  # some requests did share a batch
    assert metric(requests.get(f"{single.url}/metrics", timeout=5).text, "digits_batch_size_count") == 65


def test_a_request_left_waiting_past_the_timeout_gets_504(start_server, registry_copy, mnist_test) -> None:
    server = start_server(registry_copy.root, inference="worker", batching="greedy", request_timeout=1e-6,
                          trainer_enabled="false")
    response = post_png(server.url, png_of(mnist_test[0][0]))
    assert response.status_code == 504 and response.json()["error"] == "timeout"


def test_a_client_leaving_mid_body_counts_as_499(server: ServerProcess) -> None:
    """Not as a 500: a client must not be able to inflate the 5xx rate that alerts watch."""
    before = requests.get(f"{server.url}/metrics", timeout=5).text
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"X-Request-ID: left-mid-body\r\nContent-Length: 100000\r\n\r\n" + b"{" * 1000)
        time.sleep(0.2)
    line = wait_until(lambda: access_line(server, "left-mid-body"), 10)
    assert line and line["status"] == 499, line
    after = requests.get(f"{server.url}/metrics", timeout=5).text
    counted = {status: metric(after, "digits_http_requests_total", route="/predict", status=status)
               - metric(before, "digits_http_requests_total", route="/predict", status=status)
               for status in ("499", "500")}
    assert counted == {"499": 1, "500": 0}, counted


def api_server_and_decoder(server: ServerProcess) -> tuple[psutil.Process, list[psutil.Process]]:
    """The newest API server (the supervisor logs each pid) and its big-image decoder processes."""
    pid = [json.loads(line)["pid"] for line in server.log().splitlines()
           if '"API server ' in line and "started (pid" in line][-1]
    api_server = psutil.Process(pid)
    return api_server, [c for c in api_server.children() if "spawn_main" in " ".join(c.cmdline())]


def test_sigterm_after_a_large_image_stops_every_process_in_seconds(base_registry, tmp_path: Path,
                                                                    mnist_test) -> None:
    """The big-image decoder process stops with its API server, even a killed one; LitServe's own
    log lines are whole."""
    registry = copy_registry(base_registry, tmp_path / "registry")
    server = service_process(registry.root, trainer_enabled="false").start(tmp_path)
    try:
        png, label = large_png(mnist_test[0][0]), int(mnist_test[1][0])
        assert post_png(server.url, png).json()["digit"] == label
        api_server, decoders = api_server_and_decoder(server)
        assert len(decoders) == 1
        api_server.kill()  # SIGKILL: it cannot stop its decoder itself
        assert still_running(decoders, grace=5.0) == []
        server.wait_ready(60)  # the supervisor's replacement

        response = post_png(server.url, png)
        assert response.status_code == 200 and response.json()["digit"] == label, response.text
        descendants = server.descendants()
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(60) == 0
        took = time.monotonic() - started
        left = still_running(descendants)
        print(f"SIGTERM after a large image: stopped in {took:.1f} s; {len(descendants)} processes, left: {left}")
        assert left == []
        assert took < 15, took
        log = server.log()
        assert "--- Logging error ---" not in log and "Forcibly killing" not in log, log[-3000:]
        assert "Shutting down LitServe" in log  # LitServe's own line, no longer lost
    finally:
        server.stop()
