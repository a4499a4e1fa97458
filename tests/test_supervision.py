"""Every process the server starts is watched: a dead inference worker, API server or trainer is
noticed, its in-flight requests are answered, it is replaced, and /ready tells the truth
meanwhile. Only a crash loop stops the server."""

from __future__ import annotations

import base64
import json
import os
import signal
import sys
import threading
import time

import requests

from tests.conftest import png_of, post_png, wait_until

TOKEN = "supervision-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def holders(server) -> dict[tuple[str, int], int]:
    body = requests.get(f"{server.url}/ready", timeout=5).json()
    return {(h["role"], h["index"]): h["pid"] for h in body["holders"]}


class Load:
    """A few client threads posting digits until stopped (bounded: at most 60 s)."""

    def __init__(self, url: str, png: bytes, clients: int = 4) -> None:
        self.url, self.png = url, png
        self.results: list[tuple[float, int | str]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(clients)]

    def run(self) -> None:
        session, deadline = requests.Session(), time.monotonic() + 60
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                status = session.post(f"{self.url}/predict", files={"file": ("d.png", self.png)},
                                      timeout=10).status_code
            except requests.RequestException as exc:
                status = type(exc).__name__
            self.results.append((time.monotonic(), status))

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(15)


def test_a_killed_inference_worker_is_replaced_and_its_requests_answered(start_server, registry_copy,
                                                                         mnist_test) -> None:
    server = start_server(registry_copy.root, inference="worker", batch_timeout=0.005, trainer_enabled="false")
    old_pid = holders(server)[("worker", 0)]
    with Load(server.url, png_of(mnist_test[0][0])) as load:
        wait_until(lambda: len(load.results) > 20, 20)
        killed_at = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)
        assert wait_until(lambda: _ready_code(server) == 503, 1.5, interval=0.02)  # /ready tells at once
        assert wait_until(lambda: holders(server).get(("worker", 0), old_pid) != old_pid, 90, interval=0.2)
        recovered_at = time.monotonic()
        wait_until(lambda: any(t > recovered_at and s == 200 for t, s in load.results), 10)
    after_kill = [(t, s) for t, s in load.results if t >= killed_at]
    assert {s for _, s in after_kill} <= {200, 503}, after_kill  # no hang, no timeout, no 500
    stalled = [t for t, s in after_kill if s == 503]
    assert all(t - killed_at < 3.0 for t in stalled)  # answered quickly, not after a timeout
    assert any(t > recovered_at and s == 200 for t, s in load.results)
    assert server.process.poll() is None  # the server itself never exits for this


def test_a_killed_api_server_is_replaced(start_server, registry_copy, mnist_test) -> None:
    server = start_server(registry_copy.root, api_servers=2, trainer_enabled="false")
    before = holders(server)
    with Load(server.url, png_of(mnist_test[0][0])) as load:
        wait_until(lambda: len(load.results) > 20, 20)
        os.kill(before[("api", 1)], signal.SIGKILL)
        assert wait_until(lambda: (h := holders(server)).get(("api", 1), before[("api", 1)]) != before[("api", 1)]
                          and len(h) == 2, 30, interval=0.2)
    failed = [s for _, s in load.results if s != 200]
    assert len(failed) <= 4, failed  # at most the requests the killed process held
    assert post_png(server.url, png_of(mnist_test[0][0])).status_code == 200


def test_a_crash_loop_stops_the_server_with_a_clear_line(start_server, registry_copy) -> None:
    server = start_server(registry_copy.root, wait_ready=0, command=[sys.executable, "-m", "tests.faults",
                                                                       "setup-fails"],
                          inference="worker", trainer_enabled="false")
    assert server.process.wait(120) == 0
    assert "crash loop" in server.log_tail(20000)


def test_a_killed_trainer_fails_its_job_and_a_new_one_runs_the_queue(start_server, registry_copy,
                                                                     mnist_train) -> None:
    server = start_server(registry_copy.root, admin_token=TOKEN)
    images, labels = mnist_train
    samples = [{"image": base64.b64encode(png_of(images[i])).decode(), "label": int(labels[i])} for i in range(60)]

    def submit() -> str:
        response = requests.post(f"{server.url}/admin/finetune", headers=AUTH, timeout=60,
                                 json={"samples": samples, "epochs": 30, "replay_ratio": 2.0})
        assert response.status_code == 202, response.text
        return response.json()["job_id"]

    first, second = submit(), submit()
    job = lambda job_id: requests.get(f"{server.url}/admin/jobs/{job_id}", headers=AUTH, timeout=10).json()  # noqa: E731
    assert wait_until(lambda: job(first)["state"] == "running", 120, interval=0.2)
    os.kill(trainer_pid(server), signal.SIGKILL)
    assert wait_until(lambda: job(first)["state"] == "failed", 60, interval=0.2)
    assert "interrupted" in job(first)["message"]
    assert wait_until(lambda: job(second)["state"] in ("running", "succeeded", "rejected"), 60, interval=0.2)


def trainer_pid(server) -> int:
    """The pid the (latest) trainer logged when it took the trainer lock."""
    lines = [json.loads(line) for line in server.log_tail(10**7).splitlines() if '"trainer ready' in line]
    return int(lines[-1]["pid"])


def _ready_code(server) -> int | None:
    try:
        return requests.get(f"{server.url}/ready", timeout=2).status_code
    except requests.RequestException:
        return None
