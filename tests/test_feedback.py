"""POST /feedback is bounded, rate-limited per client address, counted in O(1) and guarded by an
optional token; with the admin routes it refuses bad labels and ids with a 4xx JSON naming the field."""

from __future__ import annotations

import base64
import threading
from pathlib import Path

import numpy as np
import pytest
import requests
from requests.adapters import HTTPAdapter

from devtools.serverctl import ServerProcess
from model.registry import Registry
from service.finetune.feedback_store import SAMPLE_BYTES, FeedbackStore
from service.http.errors import ClientError
from service.http.ratelimit import TokenBuckets
from tests.conftest import copy_registry, png_of, service_process, zip_of

ADMIN = {"Authorization": "Bearer admin-token-1"}
FEEDBACK = {"Authorization": "Bearer feedback-token-2"}
BURST, MAX_SAMPLES = 4, 3
BAD_TEXT_LABELS = ["²", "₀", "፪", "٧", "𝟕", "７", "10", "x"]
BAD_JSON_LABELS = [True, 1.0, "7", 10, -1, None]


def digit(seed: int = 0) -> np.ndarray:
    pixels = np.zeros((28, 28), np.uint8)
    pixels[6:22, 12 + seed % 3:16 + seed % 3] = 255  # a bar: enough ink to pass preprocessing
    return pixels


# ------------------------------------------------------------------ the store and the buckets, in process


def test_the_store_counts_from_its_index_not_by_scanning(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "reg")
    store = FeedbackStore(registry, max_samples=100, max_bytes=1 << 20)
    for i in range(3):
        _, usage = store.add(digit(i), i)
    assert usage == (3, 3 * SAMPLE_BYTES)
    (registry.feedback_dir / "stray.safetensors").write_bytes(b"x" * 10)  # a scan would count it
    assert store.usage() == (3, 3 * SAMPLE_BYTES)
    assert FeedbackStore(registry, 100, 1 << 20).usage() == (3, 3 * SAMPLE_BYTES)  # persisted
    registry.feedback_index.unlink()  # an emptied or fresh directory: rebuilt by one scan
    assert store.usage() == (4, 3 * SAMPLE_BYTES + 10)


def test_the_store_refuses_past_its_bounds_and_keeps_what_it_has(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "reg")
    by_count = FeedbackStore(registry, max_samples=2, max_bytes=1 << 20)
    by_count.add(digit(), 1)
    by_count.add(digit(), 2)
    for attempt in (by_count.check_room, lambda: by_count.add(digit(), 3)):
        with pytest.raises(ClientError) as caught:
            attempt()
        assert caught.value.status_code == 507 and caught.value.code == "feedback_full"
    by_bytes = FeedbackStore(registry, max_samples=100, max_bytes=3 * SAMPLE_BYTES - 1)
    with pytest.raises(ClientError):
        by_bytes.add(digit(), 3)
    assert len(registry.feedback_paths()) == 2 and by_count.usage().samples == 2
    assert sorted(by_count.load_all()[1].tolist()) == [1, 2]


def test_concurrent_writers_keep_the_count_exact(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "reg")
    store = FeedbackStore(registry, max_samples=30, max_bytes=1 << 20)
    refused: list[int] = []

    def writer() -> None:
        for _ in range(10):
            try:
                store.add(digit(), 5)
            except ClientError as exc:
                refused.append(exc.status_code)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert store.usage().samples == len(registry.feedback_paths()) == 30
    assert refused == [507] * 10


def test_token_buckets_refill_per_client_and_stay_bounded() -> None:
    now = [0.0]
    buckets = TokenBuckets(rate=2.0, burst=3, max_clients=5, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)
    assert buckets.take("b") == 0.0  # another client has its own bucket
    now[0] += 0.5
    assert buckets.take("a") == 0.0 and buckets.take("a") > 0
    for i in range(20):
        buckets.take(f"client-{i}")
    assert len(buckets) == 5


# ------------------------------------------------------------------ over HTTP


class FromAddress(HTTPAdapter):
    """Connect from a given loopback address (127.0.0.0/8 is all ours), to be another client."""

    def __init__(self, address: str) -> None:
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args, **kwargs) -> None:
        kwargs["source_address"] = (self.address, 0)
        super().init_poolmanager(*args, **kwargs)


def client(n: int) -> requests.Session:
    session = requests.Session()
    session.mount("http://", FromAddress(f"127.0.0.{n}"))
    return session


@pytest.fixture(scope="module")
def server(base_registry, tmp_path_factory) -> ServerProcess:
    root = tmp_path_factory.mktemp("feedback")
    registry = copy_registry(base_registry, root / "registry")
    leftover = registry.staging_dir / "v0002.4242"  # a publisher killed mid-write
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half")
    server = service_process(registry.root, admin_token=ADMIN["Authorization"].split()[1],
                             feedback_token=FEEDBACK["Authorization"].split()[1], feedback_burst=BURST,
                             feedback_rate=0.2, feedback_max_samples=MAX_SAMPLES, trainer_enabled="false")
    server.start(root)
    yield server
    server.stop()


def post_feedback(session: requests.Session, server: ServerProcess, label: object = 3, *, json: bool = False,
                  headers: dict | None = None, model_version: str | None = None) -> requests.Response:
    png = png_of(digit())
    headers = FEEDBACK if headers is None else headers
    named = {} if model_version is None else {"model_version": model_version}
    if json:
        body = {"image": base64.b64encode(png).decode(), "label": label, **named}
        return session.post(f"{server.url}/feedback", json=body, headers=headers, timeout=30)
    return session.post(f"{server.url}/feedback", files={"file": ("d.png", png, "image/png")},
                        data={"label": str(label), **named}, headers=headers, timeout=30)


def assert_error(response: requests.Response, status: int, code: str, mentions: str = "") -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code and body["request_id"], body
    assert mentions in str(body["detail"]), body
    return body


def test_a_killed_publishers_staging_leftover_is_gone_after_start(server: ServerProcess) -> None:
    assert list((server.registry / "staging").iterdir()) == []


def test_feedback_needs_the_token_when_one_is_set(server: ServerProcess) -> None:
    session = client(10)
    assert_error(post_feedback(session, server, headers={}), 401, "missing_token", "feedback token")
    response = post_feedback(session, server, headers={"Authorization": "Bearer nope"})
    assert_error(response, 401, "invalid_token")
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert post_feedback(session, server).status_code in (201, 507)  # 507 when the bound test ran first


def test_feedback_is_rate_limited_per_client_address(server: ServerProcess) -> None:
    first, second = client(20), client(21)
    statuses = [post_feedback(first, server, label="x").status_code for _ in range(BURST)]
    assert statuses == [422] * BURST  # refused, but each costs a token: bad requests are not free
    limited = post_feedback(first, server, label="x")
    assert_error(limited, 429, "rate_limited", "retry in")
    assert 1 <= int(limited.headers["Retry-After"]) <= 5  # 0.2 tokens per second
    assert post_feedback(second, server, label="x").status_code == 422  # another address, its own bucket


def test_a_correction_names_the_version_it_corrects_and_counts_for_it(server: ServerProcess) -> None:
    for n, version in enumerate(("v0042", "v1", "latest", "../v0001")):  # a metric label: only real versions
        assert_error(post_feedback(client(25 + n), server, model_version=version), 422, "unknown_version", "v")
    body = assert_error(post_feedback(client(29), server, json=True, model_version="latest"), 422, "invalid_fields")
    assert [error["loc"] for error in body["detail"]] == [["model_version"]]
    stored = post_feedback(client(90), server, model_version="v0001", json=True)  # one: the bound test needs room
    assert stored.status_code == 201 and stored.json()["model_version"] == "v0001", stored.text
    exposition = requests.get(f"{server.url}/metrics", timeout=10).text
    assert 'digits_feedback_corrections_total{version="v0001"} 1.0' in exposition, exposition[-2000:]


def test_feedback_store_is_bounded_with_507(server: ServerProcess) -> None:
    responses = [post_feedback(client(30 + i), server, label=i) for i in range(MAX_SAMPLES + 1)]
    accepted = [r.json()["feedback_samples"] for r in responses if r.status_code == 201]
    assert accepted == sorted(accepted) and accepted[-1] == MAX_SAMPLES
    assert_error(responses[-1], 507, "feedback_full", "DIGITS_FEEDBACK_MAX_SAMPLES")
    assert len(list((server.registry / "feedback").glob("*.safetensors"))) == MAX_SAMPLES


@pytest.mark.parametrize("label", BAD_TEXT_LABELS)
def test_a_multipart_feedback_label_must_be_an_ascii_digit(server: ServerProcess, label: str) -> None:
    response = post_feedback(client(40 + BAD_TEXT_LABELS.index(label)), server, label=label)
    assert_error(response, 422, "invalid_label", "label must be one of the digits 0-9")


@pytest.mark.parametrize("label", BAD_JSON_LABELS)
def test_a_json_feedback_label_must_be_an_integer_0_to_9(server: ServerProcess, label: object) -> None:
    response = post_feedback(client(60 + BAD_JSON_LABELS.index(label)), server, label=label, json=True)
    body = assert_error(response, 422, "invalid_fields")
    assert [error["loc"] for error in body["detail"]] == [["label"]]


def test_admin_labels_follow_the_same_rule(server: ServerProcess) -> None:
    png = png_of(digit())
    url = f"{server.url}/admin/finetune"
    files = [("files", ("a.png", png)), ("files", ("b.png", png)), ("labels", (None, "7,٧"))]
    assert_error(requests.post(url, headers=ADMIN, files=files, timeout=30), 422, "invalid_label", "labels[1]")
    for folder in ("²", "７", "٧"):
        archive = zip_of({f"{folder}/a.png": png, "1/b.png": png})
        response = requests.post(url, headers=ADMIN, files={"archive": ("d.zip", archive)}, timeout=30)
        assert_error(response, 422, "invalid_label", f"{folder}/a.png")
    for label in (True, 7.0, "7"):
        sample = {"image": base64.b64encode(png).decode(), "label": label}
        body = assert_error(requests.post(url, headers=ADMIN, json={"samples": [sample]}, timeout=30),
                            422, "invalid_fields")
        assert [error["loc"] for error in body["detail"]] == [["samples", 0, "label"]]


def test_ids_are_checked_against_their_format(server: ServerProcess) -> None:
    jobs, models = f"{server.url}/admin/jobs", f"{server.url}/admin/models"
    for url in (f"{jobs}/{'a' * 300}", f"{jobs}/{'1' * 300}", f"{jobs}/nosuchjob", f"{jobs}/2026010112000٧a1b2c3d4"):
        assert_error(requests.get(url, headers=ADMIN, timeout=10), 422, "invalid_request", "job_id")
    for version in ("v" + "1" * 300, "v1", "v00٠1", "latest"):
        response = requests.post(f"{models}/{version}/activate", headers=ADMIN, timeout=10)
        assert_error(response, 422, "invalid_request", "version")
    assert_error(requests.get(f"{jobs}/20260101120000a1b2c3d4", headers=ADMIN, timeout=10), 404, "unknown_job")
    assert_error(requests.post(f"{models}/v0099/activate", headers=ADMIN, timeout=10), 404, "unknown_version")


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("GET", "/feedback", "POST"), ("DELETE", "/admin/models", "GET"), ("POST", "/health", "GET"),
])
def test_405_says_what_is_allowed(server: ServerProcess, method: str, path: str, allowed: str) -> None:
    response = requests.request(method, f"{server.url}{path}", headers=ADMIN, timeout=10)
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["Allow"] == allowed


def test_openapi_documents_admin_bodies_security_and_errors(server: ServerProcess) -> None:
    document = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    schemes = document["components"]["securitySchemes"]
    assert schemes["AdminToken"]["scheme"] == schemes["FeedbackToken"]["scheme"] == "bearer"
    admin_operations = [(path, op) for path, item in document["paths"].items() if path.startswith("/admin/")
                        for op in item.values()]
    assert len(admin_operations) == 20  # 6 of fine-tunes and versions, 1 plots, 9 of the review queue, 4 canary
    for path, operation in admin_operations:
        assert operation["security"] == [{"AdminToken": []}], path
        assert {"401", "403"} <= set(operation["responses"]), path
    finetune = document["paths"]["/admin/finetune"]["post"]
    content = finetune["requestBody"]["content"]
    assert {"archive", "files", "labels", "epochs"} <= set(content["multipart/form-data"]["schema"]["properties"])
    sample = content["application/json"]["schema"]["properties"]["samples"]["anyOf"][0]["items"]
    assert sample["properties"]["label"]["type"] == "integer" and "$ref" not in str(content)
    assert {"413", "415", "422", "429"} <= set(finetune["responses"])
    for path, method in (("/admin/jobs/{job_id}", "get"), ("/admin/jobs/{job_id}", "delete"),
                         ("/admin/models/{version}/activate", "post")):
        assert "404" in document["paths"][path][method]["responses"]
    assert {"202", "409"} <= set(document["paths"]["/admin/jobs/{job_id}"]["delete"]["responses"])
    assert "202" in document["paths"]["/admin/models/{version}/activate"]["post"]["responses"]
    label = document["paths"]["/admin/review/items/{item_id}/label"]["post"]
    assert {"404", "409", "422"} <= set(label["responses"]) and "requestBody" in label
    assert {"422", "429"} <= set(document["paths"]["/admin/review/finetune"]["post"]["responses"])
    feedback = document["paths"]["/feedback"]["post"]
    assert {"401", "413", "429", "507"} <= set(feedback["responses"])
    assert feedback["security"] == [{"FeedbackToken": []}]


def test_predict_takes_base64_as_people_produce_it(server: ServerProcess) -> None:
    png = png_of(digit())
    for encoded in (base64.encodebytes(png).decode(), base64.urlsafe_b64encode(png).decode().rstrip("=")):
        response = requests.post(f"{server.url}/predict", json={"image": encoded}, timeout=30)
        assert response.status_code == 200, response.text
    assert_error(requests.post(f"{server.url}/predict", json={"image": "QUJD*"}, timeout=30), 422, "invalid_base64")
