"""Learning from traffic on real servers: capture, the review routes and their errors, kill -9 of an
API server mid-labelling and of the trainer mid-job, and the 3-minute acceptance (devtools/demo_loop.py)."""

from __future__ import annotations

import base64
import os
import re
import signal
import threading
import time

import requests

from devtools import demo_loop
from model.registry import Registry
from service.loop.review import ReviewQueue
from service.loop.traffic import TrafficRing
from tests.conftest import DATA_DIR, png_of, post_png, wait_until
from tests.test_supervision import trainer_pids

TOKEN = "loop-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def metric_sum(url: str, name: str, **labels: str) -> float:
    text = requests.get(f"{url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        named = line.startswith(name + "{") or line.startswith(name + " ")
        if named and all(f'{key}="{value}"' in line for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def send_traffic(url: str, pngs: list[bytes]) -> list[dict]:
    answers = []
    for png in pngs:
        response = post_png(url, png)
        assert response.status_code == 200, response.text
        answers.append(response.json())
    return answers


def review(url: str, path: str = "", method: str = "GET", timeout: float = 30, **kwargs) -> requests.Response:
    return requests.request(method, f"{url}/admin/review{path}", headers=AUTH, timeout=timeout, **kwargs)


def test_unsure_predictions_are_captured_and_reviewed_through_the_routes(start_server, registry_copy,
                                                                         mnist_test) -> None:
    server = start_server(registry_copy.root, trainer_enabled="false", admin_token=TOKEN,
                          review_sample="0", review_max_per_second="100000",
                          traffic_every="2")
    images, labels = (t.numpy() for t in mnist_test)
    pngs = [demo_loop.struck(images[i]) for i in range(30)] + [png_of(images[i]) for i in range(30, 60)]
    answers = send_traffic(server.url, pngs)
    unsure = sum(a["confidence"] < 0.8 for a in answers)
    assert 5 <= unsure < 60
    assert wait_until(lambda: review(server.url).json()["items"] == unsure, 10), review(server.url).json()
    assert metric_sum(server.url, "digits_review_captured_total", reason="low_confidence") == unsure
    # the tap writes what came every quarter second: the last predictions may be one drain behind the captures
    assert wait_until(lambda: metric_sum(server.url, "digits_review_observed_total", version="v0001") == 60, 5)
    assert metric_sum(server.url, "digits_prediction_confidence_count", version="v0001") == 60
    assert wait_until(lambda: len(TrafficRing(Registry(registry_copy.root))) == 30, 5)  # every 2nd; a chunk a second

    a = review(server.url, "/lease", "POST", json={"count": 3, "reviewer": "a"}).json()
    b = review(server.url, "/lease", "POST", json={"count": 200, "reviewer": "b"}).json()
    assert len(a["items"]) == 3 and len(a["items"]) + len(b["items"]) == unsure
    assert not {i["item_id"] for i in a["items"]} & {i["item_id"] for i in b["items"]}
    first = a["items"][0]
    assert first["source"] == "capture" and first["version"] == "v0001" and first["confidence"] < 0.8
    item = f"/items/{first['item_id']}"
    assert review(server.url, f"{item}/label", "POST", json={"token": b["token"], "label": 3}).status_code == 409
    ok = review(server.url, f"{item}/label", "POST", json={"token": a["token"], "label": 3})
    assert ok.status_code == 200 and ok.json()["label"] == 3
    again = review(server.url, f"{item}/label", "POST", json={"token": a["token"], "label": 4})
    assert again.status_code == 409 and again.json()["error"] == "already_labelled"
    for bad in ({"token": a["token"], "label": "3"}, {"token": a["token"], "label": 10}, {"label": 3}):
        response = review(server.url, f"/items/{a['items'][1]['item_id']}/label", "POST", json=bad)
        assert response.status_code == 422 and response.json()["error"], response.text
    assert review(server.url, "/items/20260101000000deadbeef").status_code == 404
    assert review(server.url, "/items/nope").status_code == 422
    assert requests.get(f"{server.url}/admin/review", timeout=10).status_code == 401
    assert review(server.url, f"/items/{a['items'][1]['item_id']}/skip", "POST",
                  json={"token": a["token"]}).status_code == 200
    assert review(server.url, f"/items/{a['items'][2]['item_id']}/discard", "POST",
                  json={"token": a["token"]}).status_code == 204
    assert review(server.url, f"{item}/original").status_code == 404  # not kept by default

    feedback = requests.post(f"{server.url}/feedback", json={"image": base64.b64encode(png_of(images[70])).decode(),
                                                             "label": int(labels[70])}, timeout=10)
    assert feedback.status_code == 201
    c = review(server.url, "/lease", "POST", json={"count": 50, "reviewer": "c"}).json()
    corrections = [i for i in c["items"] if i["source"] == "feedback"]
    assert [i["suggested"] for i in corrections] == [int(labels[70])]

    assert [i["state"]["label"] for i in review(server.url, "/items", params={"status": "labelled"}).json()] == [3]
    job = review(server.url, "/finetune", "POST")
    assert job.status_code == 202, job.text
    record = requests.get(f"{server.url}{job.json()['status_url']}", headers=AUTH, timeout=10).json()
    assert record["source"] == "review" and record["samples"] == 1
    for path, body in (("/admin/review/finetune", None), ("/admin/finetune", {"source": "review"})):
        twice = requests.post(f"{server.url}{path}", json=body, headers=AUTH, timeout=10)
        assert twice.status_code == 422 and twice.json()["error"] == "nothing_reviewed", twice.text
    both = requests.post(f"{server.url}/admin/finetune", headers=AUTH, timeout=10,
                         json={"source": "review", "samples": [{"image": "aGk=", "label": 1}]})
    assert both.status_code == 422 and both.json()["error"] == "samples_with_source", both.text

    plot = requests.get(f"{server.url}/admin/models/v0001/plots/confusion.png", headers=AUTH, timeout=10)
    assert plot.status_code == 200 and plot.content.startswith(b"\x89PNG")
    for path, status in (("v0009/plots/confusion.png", 404), ("v0001/plots/model.onnx", 422)):
        assert requests.get(f"{server.url}/admin/models/{path}", headers=AUTH, timeout=10).status_code == status
    page = requests.get(f"{server.url}/admin", timeout=10)
    assert page.status_code == 200 and 'id="canary"' in page.text and 'id="grid"' in page.text
    paths = requests.get(f"{server.url}/openapi.json", timeout=10).json()["paths"]
    for path in ("/admin/review/lease", "/admin/review/items/{item_id}/label", "/admin/review/finetune"):
        assert path in paths


def test_capture_off_keeps_no_input(start_server, registry_copy, mnist_test) -> None:
    server = start_server(registry_copy.root, trainer_enabled="false", admin_token=TOKEN, review_capture="false")
    images = mnist_test[0].numpy()
    send_traffic(server.url, [demo_loop.struck(images[i]) for i in range(20)])
    assert wait_until(lambda: metric_sum(server.url, "digits_review_observed_total") == 20, 10)
    registry = Registry(registry_copy.root)
    assert review(server.url).json()["items"] == 0 and len(TrafficRing(registry)) == 0
    assert registry.review_item_ids() == []


def test_the_upload_is_kept_only_when_asked(start_server, registry_copy, mnist_test) -> None:
    server = start_server(registry_copy.root, trainer_enabled="false", admin_token=TOKEN,
                          review_sample="1", review_max_per_second="100000",
                          review_keep_original="true")
    png = demo_loop.struck(mnist_test[0].numpy()[0])
    send_traffic(server.url, [png])
    assert wait_until(lambda: review(server.url).json()["items"] == 1, 10)
    [item] = review(server.url, "/items").json()
    assert item["has_original"] and review(server.url, f"/items/{item['item_id']}/original").content == png


def api_server_pid(server) -> int:
    body = requests.get(f"{server.url}/ready", timeout=5).json()
    return next(h["pid"] for h in body["holders"] if h["role"] == "api")


def test_kill9_of_an_api_server_mid_labelling_loses_no_label_and_gives_none_twice(start_server, registry_copy,
                                                                                   mnist_test) -> None:
    server = start_server(registry_copy.root, trainer_enabled="false", admin_token=TOKEN,
                          review_sample="1", review_max_per_second="100000")
    images = mnist_test[0].numpy()
    send_traffic(server.url, [png_of(images[i]) for i in range(120)])
    assert wait_until(lambda: review(server.url).json()["items"] == 120, 15)
    confirmed: dict[str, int] = {}
    refused: list[int] = []
    stop = threading.Event()

    def reviewer(name: str) -> None:
        for _ in range(400):  # bounded
            if stop.is_set():
                return
            try:
                lease = review(server.url, "/lease", "POST", json={"count": 4, "reviewer": name}, timeout=5)
                if lease.status_code != 200:
                    time.sleep(0.1)
                    continue
                for item in lease.json()["items"]:
                    label = int(item["item_id"][-1], 16) % 10
                    answer = review(server.url, f"/items/{item['item_id']}/label", "POST",
                                    json={"token": lease.json()["token"], "label": label}, timeout=5)
                    if answer.status_code == 200:
                        confirmed[item["item_id"]] = label
                    elif answer.status_code == 409:
                        refused.append(answer.status_code)
            except requests.RequestException:
                time.sleep(0.1)  # the API server is being replaced

    threads = [threading.Thread(target=reviewer, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    assert wait_until(lambda: len(confirmed) >= 15, 30)
    victim = api_server_pid(server)
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: _serves_with_new_pid(server, victim), 90)
    assert wait_until(lambda: len(confirmed) >= 60, 60)
    stop.set()
    for thread in threads:
        thread.join(30)
    queue = ReviewQueue(Registry(registry_copy.root))
    stored = {item.item_id: item.state.label for item in queue.labelled_items()}
    assert confirmed.items() <= stored.items()  # every confirmed label is there, as confirmed
    # what a killed request may have written is a label too, and each item has one label: a new one is refused
    for item_id in list(stored)[:10]:
        with_any_token = review(server.url, f"/items/{item_id}/label", "POST", json={"token": "x" * 16, "label": 1})
        assert with_any_token.status_code == 409
    assert len(queue.labelled_items()) == len(stored) and not refused


def _serves_with_new_pid(server, old_pid: int) -> bool:
    try:
        return api_server_pid(server) != old_pid and review(server.url, timeout=5).status_code == 200
    except (requests.RequestException, StopIteration, ValueError):
        return False


def test_kill9_of_the_trainer_mid_job_keeps_the_reviewed_labels(start_server, registry_copy, mnist_test) -> None:
    server = start_server(registry_copy.root, admin_token=TOKEN,
                          review_sample="1", review_max_per_second="100000")
    images = mnist_test[0].numpy()
    send_traffic(server.url, [png_of(images[i]) for i in range(40)])
    assert wait_until(lambda: review(server.url).json()["items"] == 40, 15)
    lease = review(server.url, "/lease", "POST", json={"count": 40}).json()
    for item in lease["items"]:
        review(server.url, f"/items/{item['item_id']}/label", "POST", json={"token": lease["token"], "label": 1})
    job = review(server.url, "/finetune", "POST", json={"epochs": 50}).json()
    status = f"{server.url}/admin/jobs/{job['job_id']}"
    assert wait_until(lambda: requests.get(status, headers=AUTH, timeout=5).json()["state"] == "running", 120)
    os.kill(trainer_pids(server)[-1], signal.SIGKILL)
    assert wait_until(lambda: requests.get(status, headers=AUTH, timeout=5).json()["state"] == "failed", 90)
    assert len(ReviewQueue(Registry(registry_copy.root)).labelled_items()) == 40
    again = review(server.url, "/finetune", "POST", json={"epochs": 1})
    assert again.status_code == 202 and re.search(r"\b40 reviewed", again.json()["message"]), again.text
    requests.delete(f"{server.url}{again.json()['status_url']}", headers=AUTH, timeout=10)


def test_demo_loop_reaches_a_better_version_within_three_minutes(base_registry, tmp_path) -> None:
    """The acceptance: struck digits as traffic -> review queue -> scripted reviewer -> fine-tune on the
    reviewed items -> the gate promotes -> /predict reads the style >= 5 points better, no slice worse."""
    figures = demo_loop.run(tmp_path, DATA_DIR, base_registry.root, log=print)
    assert figures.job_state == "succeeded", figures.message
    assert figures.gain_points >= 5 and not figures.worse_slices, figures.message
    assert figures.seconds <= 180
