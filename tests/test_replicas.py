"""Replicas as one service: nginx in front of three replicas and one trainer on a shared
registry (devtools/replicas.py, what `make replicas` runs), Prometheus scraping them, all real.

The tests share one topology and run in any order: a killed trainer is replaced and a fine-tune
then promotes under load; Prometheus counts every prediction; a replica killed under load
rejoins. Stopping leaves no process (on a topology of its own).
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import time
from collections.abc import Iterator

import psutil
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from devtools.processes import free_port
from devtools.replicas import Replica, Topology
from tests.conftest import BASE_REGISTRY, DATA_DIR, png_of, still_running, wait_until
from tests.load import Load

for tool in ("nginx", "prometheus"):  # `make test` installs them (Debian's packages)
    if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
        pytest.fail(f"{tool} not found: `apt-get install {tool}` (make test does it)", pytrace=False)

TOKEN = "replicas-admin-token-7d2e"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SWAP_SECONDS = 2.0  # a promotion or activate reaches every replica within this


def version_at(url: str, png: bytes) -> str:
    response = requests.post(f"{url}/predict", files={"file": ("d.png", png, "image/png")}, timeout=30)
    return response.json()["model_version"]


@pytest.fixture(scope="module")
def topology(tmp_path_factory) -> Iterator[Topology]:
    root = tmp_path_factory.mktemp("replicas")
    with Topology(root, BASE_REGISTRY, replicas=3, prometheus_port=free_port(), admin_token=TOKEN,
                  env={"DIGITS_DATA_DIR": str(DATA_DIR), "DIGITS_RUNTIME": "onnx"}) as started:
        started.wait_ready(240)
        yield started


@pytest.fixture(scope="module")
def png(mnist_test) -> bytes:
    return png_of(mnist_test[0][0])


def samples(mnist_test, start: int, count: int) -> list[dict]:
    images, labels = mnist_test
    return [{"image": base64.b64encode(png_of(images[i])).decode(), "label": int(labels[i])}
            for i in range(start, start + count)]


def job(url: str, job_id: str) -> dict:
    return requests.get(f"{url}/admin/jobs/{job_id}", headers=AUTH, timeout=10).json()


def swap_seconds(replicas: list[Replica], png: bytes, version: str, since: float) -> list[float]:
    """Seconds from ``since`` until each replica answers /predict with ``version``."""
    seconds: dict[str, float] = {}
    deadline = time.monotonic() + 10
    while len(seconds) < len(replicas) and time.monotonic() < deadline:
        for replica in replicas:
            if replica.name not in seconds and version_at(replica.url, png) == version:
                seconds[replica.name] = time.time() - since
        time.sleep(0.02)
    assert len(seconds) == len(replicas), (version, seconds)
    return list(seconds.values())


def test_a_killed_trainer_is_replaced_then_a_promotion_reaches_every_replica_under_load(
    topology: Topology, png: bytes, mnist_test
) -> None:
    """What the new trainer does with a job the dead one ran is tests/test_trainer.py's."""
    front, replicas = topology.url, topology.replicas
    trainer_pid = topology.trainer.pid
    topology.trainer.signal_group(signal.SIGKILL)  # the topology's supervisor starts a new trainer
    assert wait_until(lambda: topology.trainer.alive() and topology.trainer.pid != trainer_pid, 10)
    with Load(front, [png], clients=2, pause=0.005, max_seconds=600) as load:
        # what is tested here is how a promotion travels, not the gate: a fine-tune on 100 MNIST digits
        # can really cost the 8 px slice (measured: 97.5 -> 93.5 %), so the slices report, not block
        promoted = requests.post(f"{front}/admin/finetune", headers=AUTH, timeout=60,
                                 json={"samples": samples(mnist_test, 1000, 100), "epochs": 2,
                                       "guard_slices": False}).json()
        # any replica follows any job: they all read the one registry
        for replica in replicas:
            assert job(replica.url, promoted["job_id"])["samples"] == 100

        active = topology.registry / "ACTIVE"
        assert wait_until(lambda: active.read_text().strip() == "v0002", 180, interval=0.05), (
            job(front, promoted["job_id"]), topology.trainer.log_tail())
        promoted_at = active.stat().st_mtime
        assert max(swap_seconds(replicas, png, "v0002", promoted_at)) <= SWAP_SECONDS
        record = wait_until(lambda: (r := job(front, promoted["job_id"]))["state"] != "running" and r, 30)
        assert record["state"] == "succeeded" and record["produced_version"] == "v0002", record
        assert {job(r.url, promoted["job_id"])["state"] for r in replicas} == {"succeeded"}

        # activate through any replica reaches all of them; /admin/models agrees everywhere
        for version in ("v0001", "v0002"):
            asked = time.time()
            response = requests.post(f"{front}/admin/models/{version}/activate", headers=AUTH, timeout=10)
            assert response.status_code == 200, response.text
            assert max(swap_seconds(replicas, png, version, asked)) <= SWAP_SECONDS
            listings = [requests.get(f"{r.url}/admin/models", headers=AUTH, timeout=10).json() for r in replicas]
            assert all(listing == listings[0] for listing in listings)
            assert [m["version"] for m in listings[0] if m["active"]] == [version]
        assert wait_until(lambda: {o.version for o in load.outcomes[-30:]} == {"v0002"}, 10)

    assert load.failures() == [] and len(load.outcomes) > 200, load.failures()[:5]
    versions = [o.version for o in load.outcomes]
    assert versions[0] == "v0001" and versions[-1] == "v0002"
    assert {o.upstream for o in load.outcomes} == {f"127.0.0.1:{r.port}" for r in replicas}


def test_feedback_posted_anywhere_lands_in_one_store(topology: Topology, mnist_test) -> None:
    images, labels = mnist_test
    counts = []
    for i, replica in enumerate(topology.replicas):
        response = requests.post(f"{replica.url}/feedback", files={"file": ("f.png", png_of(images[i]))},
                                 data={"label": str(int(labels[i]))}, timeout=10)
        assert response.status_code == 201, response.text
        counts.append(response.json()["feedback_samples"])
    assert counts == [counts[0], counts[0] + 1, counts[0] + 2]  # one store, whichever replica took it
    assert len(list((topology.registry / "feedback").glob("*.safetensors"))) == counts[-1]


def served_200(url: str) -> float:
    """The /predict 200s a replica has answered, from its own /metrics."""
    families = text_string_to_metric_families(requests.get(f"{url}/metrics", timeout=10).text)
    return sum(sample.value for family in families for sample in family.samples
               if sample.name == "digits_http_requests_total" and sample.labels.get("route") == "/predict"
               and sample.labels.get("status") == "200")


def test_prometheus_counts_every_prediction_over_all_replicas(topology: Topology, png: bytes) -> None:
    assert topology.prometheus is not None
    predictions_200 = 'digits_http_requests_total{component="serving",route="/predict",status="200"}'

    def counted() -> float:
        result = topology.prometheus.query(f"sum({predictions_200})")
        return float(result[0]["value"][1]) if result else 0.0

    before = sum(served_200(replica.url) for replica in topology.replicas)  # nothing else sends meanwhile
    sent = 60
    for _ in range(sent):
        assert requests.post(f"{topology.url}/predict", files={"file": ("d.png", png, "image/png")},
                             timeout=30).status_code == 200
    assert wait_until(lambda: counted() == before + sent, 20, interval=0.5), (counted(), before, sent)
    per_replica = topology.prometheus.query(predictions_200)
    assert len(per_replica) == len(topology.replicas)
    assert topology.prometheus.query('up{component="trainer"}')[0]["value"][1] == "1"


def test_a_replica_killed_under_load_costs_under_a_tenth_of_a_percent_and_rejoins(
    topology: Topology, png: bytes
) -> None:
    victim, others = topology.replicas[1], [topology.replicas[0], topology.replicas[2]]
    active = (topology.registry / "ACTIVE").read_text().strip()
    with Load(topology.url, [png], clients=2, pause=0.005, max_seconds=300) as load:
        assert wait_until(lambda: len(load.outcomes) >= 300, 30)
        pid, killed_at = victim.pid, time.time()
        victim.signal_group(signal.SIGKILL)  # SIGKILL to its whole process group: a crash
        for other in others:
            assert version_at(other.url, png) == active
        assert wait_until(lambda: victim.alive() and victim.pid != pid, 10)
        assert wait_until(lambda: victim.in_service, 120), victim.log_tail()
        rejoined = victim.in_service_since  # not now: nginx may have sent it requests since
        assert requests.get(f"{victim.url}/ready", timeout=5).json()["model_version"] == active
        address = f"127.0.0.1:{victim.port}"
        assert wait_until(lambda: any(o.upstream == address and o.at > rejoined for o in load.outcomes), 15)
        assert wait_until(lambda: len(load.outcomes) >= 1000, 60)

    failed = load.failures()
    assert len(failed) / len(load.outcomes) < 0.001, (len(failed), len(load.outcomes), failed[:5])
    # the others kept serving while it was down (a response can be in transit for a moment after the kill)
    down = [o for o in load.outcomes if killed_at + 1 < o.at < rejoined and o.status == 200]
    assert len(down) > 100 and {o.upstream for o in down} == {f"127.0.0.1:{r.port}" for r in others}
    assert any("restarting" in event and victim.name in event for event in topology.events)


def test_stopping_a_topology_leaves_no_process(tmp_path) -> None:
    """On a topology of its own (one replica), so that the others' may run in any order."""
    with Topology(tmp_path, BASE_REGISTRY, replicas=1, env={"DIGITS_DATA_DIR": str(DATA_DIR)}) as topology:
        topology.wait_ready(240)
        groups = {child.pid for child in topology.children()}
        members = []
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getpgid(process.pid) in groups:
                    members.append(process)
        assert len(members) > len(groups)  # a replica has children: API server, worker, manager
        topology.stop()
    assert still_running(members) == []
