"""Chaos, bounded (about a minute): load from several clients while a worker, an API server and
the trainer are killed, versions are activated and a fine-tune runs, and a hostile client holds
idle connections from another address and leaves requests halfway. Afterwards nothing that was
accepted is lost, the registry is consistent, only requests in flight at a kill failed, and the
hostile client caused no 5xx."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import threading
import time

import requests

from model.registry import Registry
from tests.conftest import png_of, wait_until
from tests.load import Load

TOKEN = "chaos-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def get_json(url: str, **kwargs) -> dict | list:
    """GET, retried: the test's own requests may meet a process it has just killed."""
    for attempt in range(5):
        try:
            return requests.get(url, timeout=10, **kwargs).json()
        except requests.RequestException:
            if attempt == 4:
                raise
            time.sleep(0.2)
    raise AssertionError("unreachable")


def holders(url: str) -> dict[tuple[str, int], int]:
    return {(h["role"], h["index"]): h["pid"] for h in get_json(f"{url}/ready")["holders"]}


IDLE_CONNECTIONS = 80  # held at once from 127.0.0.2: more than DIGITS_MAX_CONNECTIONS=32 of each API server


def hostile_client(port: int, stop: threading.Event, png: bytes) -> None:
    """Holds IDLE_CONNECTIONS silent connections (renewed every second, before the first-byte deadline)
    and leaves a /predict request mid-body each second; for at most 120 s."""
    deadline, held = time.monotonic() + 120, []
    body = b"--b\r\nContent-Disposition: form-data; name=file; filename=d.png\r\n\r\n" + png
    while not stop.is_set() and time.monotonic() < deadline:
        for sock in held:
            sock.close()
        held = []
        with contextlib.suppress(OSError):
            for _ in range(IDLE_CONNECTIONS):
                held.append(socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0)))
            with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0)) as sock:
                sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b"
                             b"\r\nContent-Length: 100000\r\n\r\n" + body)
        stop.wait(1.0)
    for sock in held:
        sock.close()


def test_chaos_loses_nothing_accepted(start_server, registry_copy, mnist_test, mnist_train) -> None:
    server = start_server(registry_copy.root, inference="worker", api_servers=2, admin_token=TOKEN,
                          feedback_rate=1000, feedback_burst=1000, max_connections=32, max_connections_per_client=12)
    url, images, labels = server.url, *mnist_test
    stop = threading.Event()
    feedback_ids: list[str] = []

    def feedback_client() -> None:
        session, deadline = requests.Session(), time.monotonic() + 120
        i = 0
        while not stop.is_set() and time.monotonic() < deadline and i < 200:
            try:
                response = session.post(f"{url}/feedback", timeout=10, files={"file": ("d.png", png_of(images[i]))},
                                        data={"label": str(int(labels[i]))})
                if response.status_code == 201:
                    feedback_ids.append(response.json()["stored"])
            except requests.RequestException:
                pass
            i += 1
            time.sleep(0.05)

    feedback = threading.Thread(target=feedback_client, daemon=True)  # bounded: 200 posts, 120 s
    hostile = threading.Thread(target=hostile_client, args=(server.port, stop, png_of(images[0])), daemon=True)
    load = Load(url, [png_of(images[i]) for i in range(500)], clients=3)
    kills: list[float] = []
    job = lambda job_id: get_json(f"{url}/admin/jobs/{job_id}", headers=AUTH)  # noqa: E731
    with load:
        feedback.start()
        hostile.start()
        samples = [{"image": base64.b64encode(png_of(mnist_train[0][i])).decode(), "label": int(mnist_train[1][i])}
                   for i in range(60)]
        jobs = [requests.post(f"{url}/admin/finetune", headers=AUTH, timeout=60,
                              json={"samples": samples, "epochs": e}).json()["job_id"] for e in (20, 1)]
        # the kills begin while a fine-tune runs
        assert wait_until(lambda: job(jobs[0])["state"] == "running", 60, interval=0.2)
        assert wait_until(lambda: len(load.outcomes) > 20, 30)
        kills.append(time.time())
        worker = holders(url)[("worker", 0)]
        os.kill(worker, signal.SIGKILL)
        assert wait_until(lambda: holders(url).get(("worker", 0), worker) != worker, 90, interval=0.2)  # replaced
        kills.append(time.time())
        os.kill(api_server_pids(server)[0], signal.SIGKILL)
        trainer = [json.loads(line)["pid"] for line in server.log_tail(10**7).splitlines() if '"trainer ready' in line]
        kills.append(time.time())
        os.kill(trainer[-1], signal.SIGKILL)
        registry = Registry(registry_copy.root)
        model_versions = [m.version for m in registry.list_versions()]
        for version in (model_versions[0], model_versions[-1]):
            assert wait_until(lambda v=version: _activate(url, v), 30, interval=0.2)  # 200: every holder serves it
        assert wait_until(lambda: all(job(j)["state"] in ("succeeded", "rejected", "failed") for j in jobs), 120,
                          interval=0.5)
        stop.set()
        feedback.join(30)
        hostile.join(30)

    # nothing accepted is lost, the registry is consistent
    registry = Registry(registry_copy.root)
    stored = get_json(f"{url}/admin/jobs", headers=AUTH)
    assert {j["job_id"] for j in stored} >= set(jobs)
    assert all(registry.samples_path(j).is_file() for j in jobs)
    assert set(feedback_ids) <= {p.stem for p in registry.feedback_dir.glob("*.safetensors")}
    for manifest in registry.list_versions():
        for name in manifest.files:
            assert registry.verify_artifact(manifest.version, name), (manifest.version, name)
    assert registry.exists(registry.active_version()) and not any(registry.staging_dir.iterdir())
    # the hostile client's idle connections were refused past its bound, its requests left halfway
    # count as 499, and nothing counted a 500
    metrics = requests.get(f"{url}/metrics", timeout=5).text.splitlines()
    counted = [line for line in metrics if line.startswith("digits_http_requests_total{")]
    assert any('route="/predict"' in line and 'status="499"' in line for line in counted), counted
    assert not any('status="500"' in line for line in counted), counted
    assert sum(float(line.split()[-1]) for line in metrics if line.startswith("digits_connections_refused_total")) > 0
    # failures only around the kills, never a hang
    failed = load.failures()
    assert all(o.status in (503, "ConnectionError") for o in failed), failed[:5]
    assert all(any(0 <= o.at - k < 5 for k in kills) for o in failed), failed[:5]
    assert len(load.outcomes) - len(failed) > 100
    assert requests.get(f"{url}/ready", timeout=5).status_code == 200


def _activate(url: str, version: str) -> bool:
    try:
        return requests.post(f"{url}/admin/models/{version}/activate", headers=AUTH, timeout=30).status_code == 200
    except requests.RequestException:
        return False


def api_server_pids(server) -> list[int]:
    """The API servers the supervisor started (it logs each pid), newest last."""
    return [json.loads(line)["pid"] for line in server.log_tail(10**7).splitlines() if '"API server ' in line
            and 'started (pid' in line]
