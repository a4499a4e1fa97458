"""Every process the server starts is watched: a dead inference worker, API server or trainer is
noticed, its in-flight requests are answered, it is replaced, and /ready tells the truth
meanwhile. Only a crash loop stops the server."""

from __future__ import annotations

import base64
import json
import os
import signal
import sys
import time

import psutil
import requests

from service.inference.predictor import WORKER_WATCH_SECONDS
from tests.conftest import png_of, post_png, wait_until
from tests.load import Load

TOKEN = "supervision-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def holders(server) -> dict[tuple[str, int], int]:
    body = requests.get(f"{server.url}/ready", timeout=5).json()
    return {(h["role"], h["index"]): h["pid"] for h in body["holders"]}


def test_a_killed_inference_worker_is_replaced_and_its_requests_answered(start_server, registry_copy,
                                                                         mnist_test) -> None:
    server = start_server(registry_copy.root, inference="worker", batch_timeout=0.005, trainer_enabled="false")
    old_pid = holders(server)[("worker", 0)]
    with Load(server.url, [png_of(mnist_test[0][0])]) as load:
        assert wait_until(lambda: len(load.outcomes) > 20, 20)
        killed_at = time.time()
        os.kill(old_pid, signal.SIGKILL)
        assert wait_until(lambda: _ready_code(server) == 503, 1.5, interval=0.02)  # /ready tells at once
        # while the replacement starts (seconds; many under load) a request is refused at once, not queued;
        # the API servers see the death on their watcher's next tick (a request sent before that waits in
        # the dead worker's queue until the tick answers it), so ask after three ticks
        time.sleep(3 * WORKER_WATCH_SECONDS)
        asked = time.monotonic()
        during = post_png(server.url, png_of(mnist_test[0][0]), timeout=10)
        assert during.status_code == 503 and during.json()["error"] == "no_worker", during.text
        assert during.headers["Retry-After"] == "1" and time.monotonic() - asked < 1.0
        assert wait_until(lambda: holders(server).get(("worker", 0), old_pid) != old_pid, 90, interval=0.2)
        recovered_at = time.time()
        assert wait_until(lambda: any(o.status == 200 for o in load.since(recovered_at)), 10)  # serves again
    after_kill = load.since(killed_at)
    assert {o.status for o in after_kill} <= {200, 503}, after_kill[:5]  # no hang, no timeout, no 500
    # refused only while no worker was ready (at once, with Retry-After), never after the new one was
    assert all(o.at < recovered_at + 1.0 for o in after_kill if o.status == 503), after_kill[-5:]
    assert server.process.poll() is None  # the server itself never exits for this


def test_a_killed_api_server_is_replaced(start_server, registry_copy, mnist_test) -> None:
    server = start_server(registry_copy.root, api_servers=2, trainer_enabled="false")
    before = holders(server)
    with Load(server.url, [png_of(mnist_test[0][0])]) as load:
        assert wait_until(lambda: len(load.outcomes) > 20, 20)
        os.kill(before[("api", 1)], signal.SIGKILL)
        assert wait_until(lambda: (h := holders(server)).get(("api", 1), before[("api", 1)]) != before[("api", 1)]
                          and len(h) == 2, 30, interval=0.2)
    assert len(load.failures()) <= 4, load.failures()  # at most the requests the killed process held
    assert post_png(server.url, png_of(mnist_test[0][0])).status_code == 200


def test_a_crash_loop_stops_the_server_with_a_clear_line(start_server, registry_copy) -> None:
    server = start_server(registry_copy.root, wait_ready=0, command=[sys.executable, "-m", "tests.faults",
                                                                       "setup-fails"],
                          inference="worker", trainer_enabled="false")
    assert server.process.wait(120) == 0
    assert "crash loop" in server.log_tail(20000)


def test_a_dead_litserve_manager_stops_the_server_with_a_clear_line(start_server, registry_copy) -> None:
    """LitServe's manager process holds its shutdown event: without it nothing can be supervised."""
    server = start_server(registry_copy.root, api_servers=1, trainer_enabled="false")
    api_servers = {json.loads(line)["pid"] for line in server.log_tail(10**6).splitlines()
                   if '"API server ' in line and "started (pid" in line}
    forked = [child for child in psutil.Process(server.process.pid).children()
              if child.cmdline()[-2:] == ["-m", "service"] and child.pid not in api_servers]
    assert len(forked) == 1, forked  # the manager: the one forked child that is not an API server
    forked[0].kill()
    assert server.process.wait(60) == 1
    assert "LitServe's manager process died; stopping the server" in server.log_tail(20000)


def test_a_killed_trainer_is_replaced_and_the_new_one_runs_the_queue(start_server, registry_copy,
                                                                     mnist_train) -> None:
    """What a replacement trainer does with the job the dead one ran is tests/test_trainer.py's."""
    server = start_server(registry_copy.root, admin_token=TOKEN)
    assert wait_until(lambda: trainer_pids(server), 60, interval=0.2)
    killed = trainer_pids(server)[-1]
    os.kill(killed, signal.SIGKILL)
    assert wait_until(lambda: trainer_pids(server)[-1] != killed, 60, interval=0.2), server.log_tail()
    images, labels = mnist_train
    samples = [{"image": base64.b64encode(png_of(images[i])).decode(), "label": int(labels[i])} for i in range(60)]
    response = requests.post(f"{server.url}/admin/finetune", headers=AUTH, timeout=60,
                             json={"samples": samples, "epochs": 1})
    assert response.status_code == 202, response.text
    job_url = f"{server.url}/admin/jobs/{response.json()['job_id']}"
    assert wait_until(lambda: requests.get(job_url, headers=AUTH, timeout=10).json()["state"]
                      in ("running", "succeeded", "rejected"), 60, interval=0.2)


def trainer_pids(server) -> list[int]:
    """The pids the trainers logged when each took the trainer lock, oldest first."""
    return [int(json.loads(line)["pid"]) for line in server.log_tail(10**7).splitlines() if '"trainer ready' in line]


def _ready_code(server) -> int | None:
    try:
        return requests.get(f"{server.url}/ready", timeout=2).status_code
    except requests.RequestException:
        return None
