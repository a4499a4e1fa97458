"""Chaos, bounded (about a minute): load from several clients while a worker, an API server and
the trainer are killed, versions are activated and a fine-tune runs. Afterwards nothing that was
accepted is lost, the registry is consistent, and only requests in flight at a kill failed."""

from __future__ import annotations

import base64
import json
import os
import signal
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


def test_chaos_loses_nothing_accepted(start_server, registry_copy, mnist_test, mnist_train) -> None:
    server = start_server(registry_copy.root, inference="worker", api_servers=2, admin_token=TOKEN,
                          feedback_rate=1000, feedback_burst=1000)
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
    load = Load(url, [png_of(images[i]) for i in range(500)], clients=3)
    kills: list[float] = []
    job = lambda job_id: get_json(f"{url}/admin/jobs/{job_id}", headers=AUTH)  # noqa: E731
    with load:
        feedback.start()
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
