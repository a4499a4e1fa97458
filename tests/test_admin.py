"""Admin fine-tuning over real HTTP with real training: auth, uploads, gate, hot swap, rollback,
feedback, restarts."""

from __future__ import annotations

import base64
import io
import tarfile
import threading
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from devtools.serverctl import ServerProcess
from tests.conftest import (
    copy_registry,
    png_of,
    post_png,
    serves_everywhere,
    service_process,
    wait_until,
    zip_of,
)

TOKEN = "test-admin-token-5f1c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def rotated(images: torch.Tensor) -> torch.Tensor:
    """The shifted domain: digits turned 90 degrees, which the base model mostly gets wrong."""
    return torch.rot90(images, 1, (1, 2))


@pytest.fixture(scope="module")
def admin_server(base_registry, tmp_path_factory) -> ServerProcess:
    root = tmp_path_factory.mktemp("admin")
    registry = copy_registry(base_registry, root / "registry")
    server = service_process(registry.root, admin_token=TOKEN, api_servers=2)
    server.start(root)
    yield server
    server.stop()


def job_done(server: ServerProcess, job_id: str, timeout: float = 300) -> dict:
    def finished() -> dict | None:
        record = requests.get(f"{server.url}/admin/jobs/{job_id}", headers=AUTH, timeout=10).json()
        return record if record["state"] in ("succeeded", "rejected", "failed", "cancelled") else None

    record = wait_until(finished, timeout, interval=0.5)
    assert record, f"job {job_id} did not finish in {timeout} s:\n{server.log_tail()}"
    return record


def accuracy_over_http(server: ServerProcess, images: torch.Tensor, labels: torch.Tensor) -> float:
    correct = 0
    for image, label in zip(images, labels, strict=True):
        response = post_png(server.url, png_of(image))
        assert response.status_code == 200
        correct += response.json()["digit"] == int(label)
    return correct / len(labels)


def stored_state(registry: Path) -> tuple[list[str], list[str]]:
    jobs = sorted(p.name for p in (registry / "jobs").iterdir())
    return jobs, sorted(p.name for p in (registry / "samples").iterdir())


# ------------------------------------------------------------------ access


def test_admin_disabled_without_a_token(start_server, registry_copy) -> None:
    server = start_server(registry_copy.root, trainer_enabled="false")
    response = requests.get(f"{server.url}/admin/models", headers=AUTH, timeout=10)
    assert response.status_code == 403 and "DIGITS_ADMIN_TOKEN" in response.json()["detail"]


def test_missing_or_wrong_token_is_401_and_predict_stays_open(admin_server: ServerProcess, mnist_test) -> None:
    assert requests.get(f"{admin_server.url}/admin/models", timeout=10).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert requests.get(f"{admin_server.url}/admin/models", headers=wrong, timeout=10).status_code == 401
    assert requests.post(f"{admin_server.url}/admin/finetune", headers=wrong, json={}, timeout=10).status_code == 401
    models = requests.get(f"{admin_server.url}/admin/models", headers=AUTH, timeout=10).json()
    assert [m["version"] for m in models] == ["v0001"] and models[0]["active"]
    assert post_png(admin_server.url, png_of(mnist_test[0][0])).status_code == 200
    assert TOKEN not in admin_server.log()


# ------------------------------------------------------------------ bad uploads store nothing


def tar_of(members: dict[str, bytes], symlink: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            archive.addfile(info)
    return buffer.getvalue()


def hidden_files_tar(image: bytes, count: int) -> bytes:
    """A tar.gz of one image, then ``count`` hidden empty files (one header, repeated: quick to make)."""
    info = tarfile.TarInfo("1/a.png")
    info.size = len(image)
    gzip = zlib.compressobj(1, zlib.DEFLATED, 31)
    parts = [gzip.compress(info.tobuf(tarfile.USTAR_FORMAT) + image + b"\0" * (-len(image) % 512))]
    hidden = tarfile.TarInfo("1/.hidden").tobuf(tarfile.USTAR_FORMAT) * 1000
    parts += [gzip.compress(hidden) for _ in range(count // 1000)]
    return b"".join([*parts, gzip.compress(b"\0" * 1024), gzip.flush()])


def zip_bomb() -> bytes:
    """One member that inflates to 300 MB from a few hundred kB."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        with archive.open("3/bomb.png", "w", force_zip64=True) as member:
            chunk = b"\0" * (1 << 20)
            for _ in range(300):
                member.write(chunk)
    return buffer.getvalue()


def bad_uploads(digit_png: bytes) -> dict[str, tuple[dict, int]]:
    blank = png_of(np.zeros((28, 28), np.uint8))
    encoded = base64.b64encode(digit_png).decode()
    return {
        "label_out_of_range": (dict(json={"samples": [{"image": encoded, "label": 10}]}), 422),
        "undecodable_image": (dict(json={"samples": [{"image": encoded, "label": 1},
                                                     {"image": base64.b64encode(b"junk").decode(), "label": 2}]}), 415),
        "blank_image": (dict(json={"samples": [{"image": encoded, "label": 1},
                                               {"image": base64.b64encode(blank).decode(), "label": 2}]}), 422),
        "no_samples": (dict(json={"samples": []}), 422),
        "bad_option": (dict(json={"samples": [{"image": encoded, "label": 1}], "epochs": 10_000}), 422),
        "files_labels_mismatch": (dict(files=[("files", ("a.png", digit_png)), ("files", ("b.png", digit_png)),
                                              ("labels", (None, "1"))]), 422),
        "zip_path_traversal": (dict(files={"archive": ("d.zip", zip_of({"../../3/evil.png": digit_png}))}), 422),
        "tar_absolute_path": (dict(files={"archive": ("d.tar.gz", tar_of({"/tmp/3/evil.png": digit_png}))}), 422),
        "zip_not_digit_folder": (dict(files={"archive": ("d.zip", zip_of({"cats/a.png": digit_png}))}), 422),
        "zip_bomb": (dict(files={"archive": ("bomb.zip", zip_bomb())}), 413),
        "too_many_members": (dict(files={"archive": ("many.zip", zip_of({f"1/{i}.png": digit_png
                                                                            for i in range(12)}))}), 413),
        # every entry counts against the member cap, skipped ones too
        "hidden_files_count": (dict(files={"archive": ("h.tar.gz", tar_of({"1/a.png": digit_png,
                                                                          **{f"1/.h{i}": b"" for i in range(10)}}))}),
                               413),
        "folders_count": (dict(files={"archive": ("f.zip", zip_of({"1/a.png": digit_png,
                                                                   **{f"d{i}/": b"" for i in range(10)}}))}), 413),
        "resource_forks_count": (dict(files={"archive": ("m.zip", zip_of({"1/a.png": digit_png, **{
            f"__MACOSX/1/._{i}.png": b"" for i in range(10)}}))}), 413),
        "many_hidden_files": (dict(files={"archive": ("many.tar.gz", hidden_files_tar(digit_png, 100_000))}),
                                   413),
        "not_an_archive": (dict(files={"archive": ("d.rar", b"Rar!\x1a\x07\x00 not really")}), 415),
        "wrong_content_type": (dict(data=b"x", headers={"Content-Type": "text/plain"}), 415),
        "feedback_source_without_feedback": (dict(json={"source": "feedback"}), 422),
    }


def test_every_bad_upload_is_refused_and_nothing_is_stored(start_server, registry_copy, mnist_test) -> None:
    server = start_server(registry_copy.root, admin_token=TOKEN, finetune_max_samples=10,
                          finetune_max_archive_bytes=50 * 1024 * 1024, trainer_enabled="false")
    digit = png_of(mnist_test[0][0])
    for case, (kwargs, status) in bad_uploads(digit).items():
        headers = {**AUTH, **kwargs.pop("headers", {})}
        started = time.monotonic()
        response = requests.post(f"{server.url}/admin/finetune", headers=headers, timeout=60, **kwargs)
        print(f"{case}: {response.status_code} in {time.monotonic() - started:.2f} s")
        assert response.status_code == status, (case, response.status_code, response.text)
        assert response.json()["detail"], case
    detail = requests.post(f"{server.url}/admin/finetune", headers=AUTH, timeout=60,
                           **bad_uploads(digit)["undecodable_image"][0]).json()["detail"]
    assert "sample 1" in detail  # names the first bad sample
    links = tar_of({"1/a.png": digit}, symlink="2/link.png")  # the link is ignored, the rest is fine
    response = requests.post(f"{server.url}/admin/finetune", headers=AUTH, timeout=60,
                             files={"archive": ("ok.tar.gz", links)})
    assert response.status_code == 202
    record = requests.get(f"{server.url}/admin/jobs/{response.json()['job_id']}", headers=AUTH, timeout=10).json()
    assert record["samples"] == 1 and record["state"] == "queued"
    files_and_labels = [("files", ("a.png", digit)), ("files", ("b.png", digit)), ("labels", (None, "7,7"))]
    response = requests.post(f"{server.url}/admin/finetune", headers=AUTH, timeout=60, files=files_and_labels,
                             data={"epochs": "2"})
    assert response.status_code == 202 and response.json()["queued_behind"] == 1
    record = requests.get(f"{server.url}/admin/jobs/{response.json()['job_id']}", headers=AUTH, timeout=10).json()
    assert record["samples"] == 2 and record["options"]["epochs"] == 2
    jobs, samples = stored_state(registry_copy.root)
    assert len(jobs) == 2 and len(samples) == 2  # only the two good uploads


def test_health_stays_prompt_while_an_archive_is_read(start_server, registry_copy, mnist_test) -> None:
    """An archive is read off the event loop: a keep-alive /health client is answered meanwhile."""
    server = start_server(registry_copy.root, admin_token=TOKEN, finetune_max_samples=50_000, trainer_enabled="false")
    archive = hidden_files_tar(png_of(mnist_test[0][0]), 40_000)  # under the cap: read whole, accepted
    outcome: list[requests.Response] = []
    upload = threading.Thread(target=lambda: outcome.append(requests.post(
        f"{server.url}/admin/finetune", headers=AUTH, timeout=120, files={"archive": ("a.tar.gz", archive)})))
    latencies = []
    with requests.Session() as session:  # one connection, so one API server, the one reading
        assert session.get(f"{server.url}/health", timeout=5).status_code == 200
        started = time.monotonic()
        upload.start()
        while upload.is_alive() and time.monotonic() - started < 120:
            sent = time.monotonic()
            assert session.get(f"{server.url}/health", timeout=30).status_code == 200
            latencies.append(time.monotonic() - sent)
            time.sleep(0.02)
        upload.join(5)
        took = time.monotonic() - started
    print(f"upload {took:.2f} s; /health: {len(latencies)} answers, slowest {max(latencies):.3f} s")
    assert outcome[0].status_code == 202, outcome[0].text
    assert took > 1.0, "the archive was read too fast for this test to tell anything"
    assert max(latencies) < min(1.0, took / 3), latencies  # read on the loop, the slowest is about `took`


# ------------------------------------------------------------------ the real thing


def test_domain_shift_finetune_under_load_hot_swaps_without_a_failed_request(
    admin_server: ServerProcess, mnist_train, mnist_test
) -> None:
    train_images, train_labels = mnist_train
    test_images, test_labels = mnist_test
    shifted_eval = rotated(test_images[:300]), test_labels[:300]
    before = accuracy_over_http(admin_server, *shifted_eval)

    upload = {f"{int(label)}/{i}.png": png_of(image)
              for i, (image, label) in enumerate(zip(rotated(train_images[-400:]), train_labels[-400:], strict=True))}
    stop = threading.Event()
    outcomes: list[tuple[int, str]] = []

    def load() -> None:
        i, deadline = 0, time.monotonic() + 600  # bounded in time (and so in count), not cut short by a slow job
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                response = post_png(admin_server.url, png_of(test_images[i % 100]), timeout=30)
                outcomes.append((response.status_code, response.json().get("model_version", "")))
            except requests.RequestException as exc:
                outcomes.append((0, repr(exc)))
            i += 1

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        # Learning 90-degree turns costs the tall and 8x8 slices a few points (the gate would refuse it):
        # a deliberate trade here, which the record reports.
        response = requests.post(f"{admin_server.url}/admin/finetune", headers=AUTH, timeout=60,
                                 files={"archive": ("rotated.zip", zip_of(upload))}, data={"guard_slices": "false"})
        assert response.status_code == 202, response.text
        accepted = response.json()
        assert accepted["status_url"] == f"/admin/jobs/{accepted['job_id']}"
        record = job_done(admin_server, accepted["job_id"])
        assert serves_everywhere(admin_server.url, "v0002", 2.0), record  # every holder, within 2 s of promotion
        assert wait_until(lambda: len(outcomes) > 20 and {v for _, v in outcomes[-20:]} == {"v0002"}, 10.0,
                          interval=0.05), (record, outcomes[-20:])
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)

    assert record["state"] == "succeeded", record
    assert record["produced_version"] == "v0002" and record["parent_version"] == "v0001"
    assert record["progress"]["epoch"] == record["options"]["epochs"]
    drop = record["metrics_before"]["mnist_test_accuracy"] - record["metrics_after"]["mnist_test_accuracy"]
    assert drop <= 0.005, record
    assert record["metrics_after"]["holdout_worse_p_value"] >= record["options"]["holdout_alpha"]

    failures = [o for o in outcomes if o[0] != 200]
    assert failures == [] and len(outcomes) > 50
    versions = [v for _, v in outcomes]
    assert versions[0] == "v0001" and "v0002" in versions
    latest = [post_png(admin_server.url, png_of(test_images[i])).json()["model_version"] for i in range(10)]
    assert set(latest) == {"v0002"}

    after = accuracy_over_http(admin_server, *shifted_eval)
    assert after - before >= 0.20, (before, after)
    metrics = requests.get(f"{admin_server.url}/metrics", timeout=10).text
    assert 'digits_model_info{runtime="onnxruntime",version="v0002"} 1.0' in metrics
    models = requests.get(f"{admin_server.url}/admin/models", headers=AUTH, timeout=10).json()
    assert [(m["version"], m["active"]) for m in models] == [("v0001", False), ("v0002", True)]
    assert models[1]["job_id"] == accepted["job_id"] and models[1]["parent"] == "v0001"
    # every slice was measured, the record says how, and the new version's manifest has its slice table
    assert record["metrics_after"]["guard_slices"] is False and "mnist_png" in record["metrics_after"]["slices"]
    assert models[1]["metrics"]["slices"] == {name: {"accuracy": row["after"], "n": row["n"]}
                                              for name, row in record["metrics_after"]["slices"].items()}


def test_rollback_and_roll_forward(admin_server: ServerProcess, mnist_test) -> None:
    models = requests.get(f"{admin_server.url}/admin/models", headers=AUTH, timeout=10).json()
    if len(models) < 2:
        pytest.skip("needs the promoted version of the domain-shift test")
    png = png_of(mnist_test[0][0])
    for version in ("v0001", "v0002"):
        response = requests.post(f"{admin_server.url}/admin/models/{version}/activate", headers=AUTH, timeout=30)
        assert response.status_code == 200, response.text
        assert response.json()["active"] == version and response.json()["converged"] is True
        assert response.json()["behind"] == []
        # the answer comes once every holder serves the version: no waiting after it
        ready = requests.get(f"{admin_server.url}/ready", timeout=10).json()
        assert ready["converged"] and ready["active_version"] == ready["model_version"] == version, ready
        assert ready["serving_versions"] == [version] and len(ready["holders"]) == 2
        assert {holder["model_version"] for holder in ready["holders"]} == {version}
        answers = {post_png(admin_server.url, png).json()["model_version"] for _ in range(20)}
        assert answers == {version}
        metadata = requests.get(f"{admin_server.url}/v2/models/digits", timeout=10).json()
        assert metadata["versions"] == [version]
        metrics = requests.get(f"{admin_server.url}/metrics", timeout=10).text
        assert f'digits_active_version_info{{version="{version}"}} 1.0' in metrics
        assert f'digits_model_holders_serving{{version="{version}"}} 2.0' in metrics
        assert "digits_model_versions_converged 1.0" in metrics
    missing = requests.post(f"{admin_server.url}/admin/models/v0099/activate", headers=AUTH, timeout=10)
    assert missing.status_code == 404


def test_gated_rejection_keeps_the_live_model(admin_server: ServerProcess, mnist_test) -> None:
    active_before = requests.get(f"{admin_server.url}/ready", timeout=10).json()["active_version"]
    assert serves_everywhere(admin_server.url, active_before)
    models_before = requests.get(f"{admin_server.url}/admin/models", headers=AUTH, timeout=10).json()
    rng = np.random.default_rng(0)
    images, _ = mnist_test
    samples = [{"image": base64.b64encode(png_of(images[i])).decode(), "label": int(rng.integers(0, 10))}
               for i in range(60)]  # wrong labels: learning them hurts MNIST accuracy
    response = requests.post(f"{admin_server.url}/admin/finetune", headers=AUTH, timeout=60,
                              json={"samples": samples, "learning_rate": 0.01, "epochs": 10, "replay_ratio": 0})
    assert response.status_code == 202
    record = job_done(admin_server, response.json()["job_id"])
    assert record["state"] == "rejected", record
    assert "rejected" in record["message"] and record["produced_version"] is None
    assert record["metrics_after"]["mnist_test_accuracy"] is not None
    # nothing was published or activated: the same versions, the same one active and served
    models_after = requests.get(f"{admin_server.url}/admin/models", headers=AUTH, timeout=10).json()
    assert models_after == models_before and record["job_id"] not in [m["job_id"] for m in models_after]
    assert requests.get(f"{admin_server.url}/ready", timeout=10).json()["model_version"] == active_before
    assert post_png(admin_server.url, png_of(images[0])).json()["model_version"] == active_before
    jobs = requests.get(f"{admin_server.url}/admin/jobs", headers=AUTH, timeout=10).json()
    assert record["job_id"] in [job["job_id"] for job in jobs]


def test_feedback_is_stored_and_trains(admin_server: ServerProcess, mnist_test) -> None:
    images, labels = mnist_test
    for i in range(3):
        response = requests.post(f"{admin_server.url}/feedback", timeout=10,
                                 files={"file": ("f.png", png_of(images[i]))}, data={"label": str(int(labels[i]))})
        assert response.status_code == 201 and response.json()["label"] == int(labels[i])
    response = requests.post(f"{admin_server.url}/feedback", timeout=10,
                             json={"image": base64.b64encode(png_of(images[3])).decode(), "label": int(labels[3])})
    assert response.json()["feedback_samples"] == 4
    bad = requests.post(f"{admin_server.url}/feedback", timeout=10, files={"file": ("f.png", png_of(images[0]))},
                        data={"label": "12"})
    assert bad.status_code == 422
    response = requests.post(f"{admin_server.url}/admin/finetune", headers=AUTH, timeout=30,
                             json={"source": "feedback", "epochs": 1})
    assert response.status_code == 202
    record = requests.get(f"{admin_server.url}{response.json()['status_url']}", headers=AUTH, timeout=10).json()
    assert record["samples"] == 4 and record["source"] == "feedback"
    record = job_done(admin_server, record["job_id"])
    # four correct labels train, but one held-out image is no evidence: the gate's minimum keeps the live model
    assert record["state"] == "rejected" and "too little evidence: 1 held-out samples" in record["message"], record
    assert record["metrics_after"]["min_holdout_samples"] == 20 and record["produced_version"] is None


def test_restart_marks_the_interrupted_job_failed_and_keeps_the_queue(start_server, registry_copy,
                                                                     mnist_test) -> None:
    images, labels = mnist_test
    samples = [{"image": base64.b64encode(png_of(images[i])).decode(), "label": int(labels[i])} for i in range(200)]
    server = start_server(registry_copy.root, admin_token=TOKEN)
    long_job = requests.post(f"{server.url}/admin/finetune", headers=AUTH, timeout=60,
                             json={"samples": samples, "epochs": 50}).json()
    short_job = requests.post(f"{server.url}/admin/finetune", headers=AUTH, timeout=60,
                              json={"samples": samples[:20], "epochs": 1}).json()
    assert short_job["queued_behind"] == 1 and "queued behind" in short_job["message"]
    assert wait_until(lambda: requests.get(f"{server.url}/admin/jobs/{long_job['job_id']}", headers=AUTH,
                                           timeout=10).json()["state"] == "running", 120)
    server.kill_group()  # a crash: every process at once

    restarted = start_server(registry_copy.root, admin_token=TOKEN)
    record = job_done(restarted, long_job["job_id"], timeout=60)
    assert record["state"] == "failed" and "interrupted" in record["message"]
    assert job_done(restarted, short_job["job_id"])["state"] in ("succeeded", "rejected")
    unknown = requests.get(f"{restarted.url}/admin/jobs/20260101120000a1b2c3d4", headers=AUTH, timeout=10)
    assert unknown.status_code == 404


def test_an_activation_the_holders_cannot_follow_answers_202_and_ready_tells(start_server, registry_copy,
                                                                             mnist_test) -> None:
    broken = registry_copy.import_version(registry_copy, "v0001", activate=False).version
    for path in registry_copy.version_dir(broken).iterdir():
        if path.name != "manifest.json":
            path.write_bytes(b"not a model")  # no holder can load it (nor re-export its ONNX)
    server = start_server(registry_copy.root, admin_token=TOKEN, trainer_enabled="false", api_servers=2,
                          activate_wait_seconds=1)
    response = requests.post(f"{server.url}/admin/models/{broken}/activate", headers=AUTH, timeout=30)
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["active"] == broken and body["converged"] is False and body["waited_seconds"] >= 1
    assert sorted(body["behind"]) == ["api 0", "api 1"]
    ready = requests.get(f"{server.url}/ready", timeout=10)
    assert ready.status_code == 200  # still serving, the previous version
    ready = ready.json()
    assert ready["active_version"] == broken and ready["serving_versions"] == ["v0001"]
    assert ready["converged"] is False and ready["model_version"] is None
    assert "digits_model_versions_converged 0.0" in requests.get(f"{server.url}/metrics", timeout=10).text
    assert post_png(server.url, png_of(mnist_test[0][0])).json()["model_version"] == "v0001"
    back = requests.post(f"{server.url}/admin/models/v0001/activate", headers=AUTH, timeout=30)
    assert back.status_code == 200 and back.json()["converged"] and back.json()["previous"] == broken


def json_upload(images: torch.Tensor, labels: torch.Tensor, count: int, **options: object) -> dict:
    return {"samples": [{"image": base64.b64encode(png_of(images[i])).decode(), "label": int(labels[i])}
                        for i in range(count)], **options}


def test_the_job_queue_is_bounded_exact_and_cancellable(start_server, registry_copy, mnist_test) -> None:
    server = start_server(registry_copy.root, admin_token=TOKEN, trainer_enabled="false", api_servers=2,
                          finetune_max_queued=3)
    upload = json_upload(*mnist_test, 20, epochs=1)
    barrier = threading.Barrier(5)

    def submit(_: int) -> requests.Response:
        barrier.wait(10)
        return requests.post(f"{server.url}/admin/finetune", headers=AUTH, json=upload, timeout=60)

    with ThreadPoolExecutor(5) as pool:
        responses = list(pool.map(submit, range(5)))
    accepted = [r.json() for r in responses if r.status_code == 202]
    refused = [r for r in responses if r.status_code != 202]
    assert sorted(a["queued_behind"] for a in accepted) == [0, 1, 2]  # exact: no two jobs share a place
    assert [r.status_code for r in refused] == [429, 429]
    assert all(r.json()["error"] == "queue_full" and int(r.headers["Retry-After"]) > 0 for r in refused)

    first = min(accepted, key=lambda a: a["queued_behind"])["job_id"]
    cancelled = requests.delete(f"{server.url}/admin/jobs/{first}", headers=AUTH, timeout=10)
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert requests.get(f"{server.url}/admin/jobs/{first}", headers=AUTH, timeout=10).json()["state"] == "cancelled"
    assert not (registry_copy.root / "samples" / f"{first}.safetensors").exists()
    again = requests.delete(f"{server.url}/admin/jobs/{first}", headers=AUTH, timeout=10)
    assert again.status_code == 409 and again.json()["error"] == "job_finished"
    unknown = requests.delete(f"{server.url}/admin/jobs/20260101120000a1b2c3d4", headers=AUTH, timeout=10)
    assert unknown.status_code == 404
    # the freed place is taken by the next submission, behind the two still queued
    response = requests.post(f"{server.url}/admin/finetune", headers=AUTH, json=upload, timeout=60)
    assert response.status_code == 202 and response.json()["queued_behind"] == 2


def test_a_running_job_cancelled_stops_and_publishes_nothing(start_server, registry_copy, mnist_test) -> None:
    server = start_server(registry_copy.root, admin_token=TOKEN)
    long_job = requests.post(f"{server.url}/admin/finetune", headers=AUTH, timeout=60,
                             json=json_upload(*mnist_test, 200, epochs=50)).json()
    next_job = requests.post(f"{server.url}/admin/finetune", headers=AUTH, timeout=60,
                             json=json_upload(*mnist_test, 20, epochs=1)).json()
    status = f"{server.url}/admin/jobs/{long_job['job_id']}"
    assert wait_until(lambda: requests.get(status, headers=AUTH, timeout=10).json()["progress"].get("epoch"), 120)
    response = requests.delete(status, headers=AUTH, timeout=10)
    assert response.status_code == 202 and response.json()["state"] == "running"
    assert "cancelling" in response.json()["message"]
    following = requests.get(status, headers=AUTH, timeout=10).json()  # whoever follows the job sees it too
    assert following["state"] == "cancelled" or "cancelling" in following["message"], following
    record = job_done(server, long_job["job_id"], timeout=60)
    assert record["state"] == "cancelled" and record["produced_version"] is None, record
    assert record["progress"]["epoch"] < 50
    assert job_done(server, next_job["job_id"])["state"] in ("succeeded", "rejected")  # the queue goes on
    models = requests.get(f"{server.url}/admin/models", headers=AUTH, timeout=10).json()
    assert all(m["job_id"] != long_job["job_id"] for m in models)
