"""Canary rollout over real HTTP: the split on /predict, V2 REST and gRPC, pins, the admin routes
and their errors, a canary that cannot serve, abort and promote under load, a killed holder."""

from __future__ import annotations

import collections
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as triton_grpc

from devtools.serverctl import ServerProcess
from model.onnx_serving import CONTRACT, INPUT_NAME, OUTPUT_NAME
from model.registry import Registry
from tests.conftest import copy_registry, png_of, post_png, service_process, wait_until
from tests.load import Load

TOKEN = "canary-token-7d2e"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REQUESTS = 240  # bounded: enough to see a 25 % split within 4 standard deviations (+-27)


def failing_onnx(path: Path) -> None:
    """A real ONNX model with the service's contract that loads and fails on every input: it
    reshapes 784 pixels into rows of 785."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", [INPUT_NAME], ["x"], to=TensorProto.FLOAT),
         helper.make_node("Reshape", ["x", "shape"], ["rows"]),
         helper.make_node("Softmax", ["rows"], [OUTPUT_NAME], axis=1)],
        "fails", [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["batch", 28, 28])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 10])],
        initializer=[helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 785])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.helper.set_model_props(model, {"contract": CONTRACT})
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def registry(base_registry, tmp_path_factory) -> Registry:
    """v0001 active; v0002 the same weights under another id; v0003 an ONNX model that fails
    when run; v0004 without model.onnx."""
    registry = copy_registry(base_registry, tmp_path_factory.mktemp("canary") / "registry")
    for _ in range(3):
        registry.import_version(registry, "v0001", activate=False)
    registry.add_artifact("v0003", "model.onnx", failing_onnx)
    registry.onnx_path("v0004").unlink()
    return registry


@pytest.fixture(scope="module")
def server(registry, tmp_path_factory) -> ServerProcess:
    server = service_process(registry.root, admin_token=TOKEN, api_servers=2, trainer_enabled="false")
    server.start(tmp_path_factory.mktemp("canary-logs"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def png(mnist_test) -> bytes:
    return png_of(mnist_test[0][0])


@pytest.fixture(autouse=True)
def no_canary_after(server):
    yield
    requests.post(f"{server.url}/admin/canary/abort", headers=AUTH, timeout=10)


def start_canary(server: ServerProcess, version: str, percent: float) -> requests.Response:
    return requests.post(f"{server.url}/admin/models/{version}/canary", json={"percent": percent},
                         headers=AUTH, timeout=10)


def versions_of(server: ServerProcess, png: bytes, count: int, **headers: str) -> collections.Counter:
    """Which version answered each of ``count`` sequential /predict requests (all must be 200)."""
    seen = collections.Counter()
    with requests.Session() as session:
        for _ in range(count):
            response = session.post(f"{server.url}/predict", files={"file": ("d.png", png, "image/png")},
                                    headers=headers, timeout=10)
            assert response.status_code == 200, response.text
            seen[response.json()["model_version"]] += 1
    return seen


def holders_serve_canary(server: ServerProcess, png: bytes, version: str) -> bool:
    """Both API servers have loaded the canary: pinned requests to it answer 200 for a while."""
    def pinned_ok() -> bool:
        return all(post_png(server.url, png, headers={"X-Model-Version": version}).status_code == 200
                   for _ in range(8))

    return bool(wait_until(pinned_ok, 10, interval=0.1))


def test_a_canary_serves_its_share_everywhere_and_pins_work(server, png, mnist_test) -> None:
    started = start_canary(server, "v0002", 25)
    assert started.status_code == 200, started.text
    assert started.json()["canary"]["version"] == "v0002" and started.json()["canary"]["live"] == "v0001"
    assert holders_serve_canary(server, png, "v0002"), server.log_tail()

    seen = versions_of(server, png, REQUESTS)
    assert set(seen) == {"v0001", "v0002"} and abs(seen["v0002"] - REQUESTS / 4) <= 27, seen

    assert versions_of(server, png, 20, **{"X-Model-Version": "v0002"}) == {"v0002": 20}
    assert versions_of(server, png, 20, **{"X-Model-Version": "v0001"}) == {"v0001": 20}
    for pin in ("v0004", "v9", "latest"):
        refused = post_png(server.url, png, headers={"X-Model-Version": pin})
        assert refused.status_code == 422 and refused.json()["error"] == "version_not_served", refused.text

    pixels = np.asarray(mnist_test[0][:3], dtype=np.uint8)  # V2: the protocol's model version pins
    v2 = requests.post(f"{server.url}/v2/models/digits/versions/v0002/infer", timeout=10, json={
        "inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [3, 28, 28], "data": pixels.ravel().tolist()}]})
    assert v2.status_code == 200 and v2.json()["model_version"] == "v0002", v2.text
    unpinned = collections.Counter(
        requests.post(f"{server.url}/v2/models/digits/infer", timeout=10, json={"inputs": [
            {"name": "pixels", "datatype": "UINT8", "shape": [1, 28, 28], "data": pixels[0].ravel().tolist()}]}
        ).json()["model_version"] for _ in range(60))
    assert set(unpinned) == {"v0001", "v0002"}, unpinned
    client = triton_grpc.InferenceServerClient(server.grpc_address)
    try:
        tensor = triton_grpc.InferInput("pixels", [3, 28, 28], "UINT8")
        tensor.set_data_from_numpy(pixels)
        assert client.infer("digits", [tensor], model_version="v0002").get_response().model_version == "v0002"
    finally:
        client.close()

    def canary_status() -> dict:
        return requests.get(f"{server.url}/admin/canary", headers=AUTH, timeout=10).json()

    # the comparison is the capture tap's histogram, written every quarter second: wait for the last drain
    assert wait_until(lambda: canary_status()["canary_stats"]["predictions"] >= seen["v0002"] + 20 + 3
                      and canary_status()["live_stats"]["predictions"] >= seen["v0001"] + 20, 5), canary_status()
    status = canary_status()
    assert status["active"] == "v0001" and status["canary"]["percent"] == 25
    assert status["canary_stats"]["version"] == "v0002"
    assert 0.5 < status["canary_stats"]["mean_confidence"] <= 1
    assert status["holders"] == status["holders_with_canary"] == 2
    assert status["low_confidence_at"] == 0.8  # the bucket edge of DIGITS_REVIEW_THRESHOLD's default
    assert 0 <= status["canary_stats"]["low_confidence_share"] <= 1 and status["canary_stats"]["review_rate"] >= 0
    assert status["canary_stats"]["feedback"] == status["live_stats"]["feedback"] == 0
    for version in ("v0002", "v0002", "v0001"):  # corrections name the answer's version: the feedback rate
        corrected = requests.post(f"{server.url}/feedback", files={"file": ("d.png", png, "image/png")},
                                  data={"label": "7", "model_version": version}, timeout=10)
        assert corrected.status_code == 201, corrected.text
    status = canary_status()
    canary_stats, live_stats = status["canary_stats"], status["live_stats"]
    assert canary_stats["feedback"] == 2 and live_stats["feedback"] == 1
    assert canary_stats["feedback_rate"] == round(2 / canary_stats["predictions"], 4)
    exposition = requests.get(f"{server.url}/metrics", timeout=10).text
    assert 'digits_prediction_confidence_count{version="v0002"}' in exposition


def test_bad_canary_requests_are_4xx_naming_the_problem(server, png) -> None:
    for body in ({"percent": 0}, {"percent": 51}, {"percent": "ten"}, {}, {"percent": 10, "extra": 1}):
        response = requests.post(f"{server.url}/admin/models/v0002/canary", json=body, headers=AUTH, timeout=10)
        assert response.status_code == 422, response.text
        assert response.json()["error"] and ("percent" in response.text or "extra" in response.text), response.text
    cases = [("v0042", 404, "unknown_version"), ("v0001", 409, "already_active"), ("v0004", 409, "not_servable")]
    for version, status, code in cases:
        response = start_canary(server, version, 10)
        assert response.status_code == status and response.json()["error"] == code, response.text
    assert requests.post(f"{server.url}/admin/models/v0002/canary", json={"percent": 10}, timeout=10
                         ).status_code == 401
    for action in ("promote", "abort"):
        response = requests.post(f"{server.url}/admin/canary/{action}", headers=AUTH, timeout=10)
        assert response.status_code == 409 and response.json()["error"] == "no_canary", response.text
    assert requests.get(f"{server.url}/admin/canary", headers=AUTH, timeout=10).json()["canary"] is None
    assert post_png(server.url, png, headers={"X-Model-Version": "v0002"}).status_code == 422  # no canary now
    paths = requests.get(f"{server.url}/openapi.json", timeout=10).json()["paths"]
    assert {"/admin/models/{version}/canary", "/admin/canary", "/admin/canary/promote",
            "/admin/canary/abort"} <= set(paths)
    start = paths["/admin/models/{version}/canary"]["post"]
    assert "CanaryRequest" in str(start["requestBody"]) and {"401", "404", "409", "422"} <= set(start["responses"])
    assert "409" in paths["/admin/canary/promote"]["post"]["responses"]


def test_a_canary_that_fails_serves_nobody_and_fails_no_request(server, png, registry) -> None:
    assert start_canary(server, "v0003", 50).status_code == 200

    def loaded_everywhere() -> bool:  # it loads (it fails only when run), so every holder has it first
        state = requests.get(f"{server.url}/admin/canary", headers=AUTH, timeout=10).json()
        return state["holders_with_canary"] == state["holders"]

    assert wait_until(loaded_everywhere, 15)
    answers = [post_png(server.url, png) for _ in range(120)]  # a connection each: both API servers get some
    assert [r.status_code for r in answers] == [200] * 120, [r.text for r in answers if r.status_code != 200][:3]
    assert {r.json()["model_version"] for r in answers} == {"v0001"}
    assert "failed while serving" in server.log_tail(10**6)

    def canary_holders() -> int:
        return requests.get(f"{server.url}/admin/canary", headers=AUTH, timeout=10).json()["holders_with_canary"]

    assert wait_until(lambda: canary_holders() == 0, 5), canary_holders()  # each holder that failed dropped it
    pinned = post_png(server.url, png, headers={"X-Model-Version": "v0003"})  # a pin is never silently swapped
    assert pinned.status_code == 503 and pinned.json()["error"] == "version_unavailable", pinned.text
    assert pinned.headers["retry-after"] == "1"


def test_abort_under_load_fails_no_request(server, png) -> None:
    assert start_canary(server, "v0002", 50).status_code == 200
    assert holders_serve_canary(server, png, "v0002")
    with Load(server.url, [png], clients=4, max_seconds=30) as load:
        assert wait_until(lambda: {o.version for o in load.outcomes} >= {"v0001", "v0002"}, 10)
        aborted = requests.post(f"{server.url}/admin/canary/abort", headers=AUTH, timeout=10)
        assert aborted.status_code == 200, aborted.text  # 200: every holder of this server has dropped it
        assert aborted.json() == {"aborted": "v0002", "active": "v0001", "converged": True, "behind": []}
        assert versions_of(server, png, 40) == {"v0001": 40}  # at once, however many answers the load takes
        count = len(load.outcomes)
        assert wait_until(lambda: len(load.outcomes) > count + 100, 20)
    assert load.failures() == [], load.failures()[:5]


def test_a_killed_holder_of_the_canary_loses_only_its_requests(server, png) -> None:
    assert start_canary(server, "v0002", 50).status_code == 200
    assert holders_serve_canary(server, png, "v0002")
    holders = {(h["role"], h["index"]): h["pid"] for h in requests.get(f"{server.url}/ready", timeout=5
                                                                          ).json()["holders"]}
    with Load(server.url, [png], clients=4, max_seconds=60) as load:
        assert wait_until(lambda: len(load.outcomes) > 20, 20)
        os.kill(holders[("api", 1)], signal.SIGKILL)
        assert wait_until(lambda: {(h["role"], h["index"]): h["pid"] for h in requests.get(
            f"{server.url}/ready", timeout=5).json()["holders"]}.get(("api", 1), holders[("api", 1)])
            != holders[("api", 1)], 30, interval=0.2)
    assert len(load.failures()) <= 4, load.failures()  # at most what the killed process held
    assert holders_serve_canary(server, png, "v0002")  # the replacement follows the canary too
    assert set(versions_of(server, png, 60)) == {"v0001", "v0002"}


def test_promote_makes_the_canary_live_everywhere(server, png, registry) -> None:
    assert start_canary(server, "v0002", 20).status_code == 200
    assert holders_serve_canary(server, png, "v0002")
    with Load(server.url, [png], clients=2, max_seconds=30) as load:
        assert wait_until(lambda: len(load.outcomes) > 20, 20)
        promoted = requests.post(f"{server.url}/admin/canary/promote", headers=AUTH, timeout=30)
        assert promoted.status_code == 200, promoted.text
        assert promoted.json()["active"] == "v0002" and promoted.json()["previous"] == "v0001"
    assert load.failures() == [], load.failures()[:5]
    assert registry.active_version() == "v0002" and registry.canary() is None
    assert versions_of(server, png, 40) == {"v0002": 40}
    requests.post(f"{server.url}/admin/models/v0001/activate", headers=AUTH, timeout=30)


def test_every_replica_on_the_registry_honours_the_split(server, png, registry, tmp_path) -> None:
    """A second server (a replica) on the same registry follows the canary the first one started."""
    replica = service_process(registry.root, admin_token=TOKEN, api_servers=1, trainer_enabled="false")
    replica.start(tmp_path)
    try:
        assert start_canary(server, "v0002", 30).status_code == 200
        assert holders_serve_canary(replica, png, "v0002"), replica.log_tail()
        seen = versions_of(replica, png, 100)
        assert set(seen) == {"v0001", "v0002"} and abs(seen["v0002"] - 30) <= 19, seen  # 4 sd of Binomial(100, .3)
        assert requests.post(f"{replica.url}/admin/canary/abort", headers=AUTH, timeout=10).status_code == 200
        assert wait_until(lambda: versions_of(server, png, 10) == {"v0001": 10}, 5)
    finally:
        replica.stop()


def test_batching_inference_workers_split_and_pin_too(start_server, registry, png) -> None:
    """With the model in LitServe's inference workers, pins travel on the queue and the split is
    drawn per batch; an abort fails no request there either."""
    server = start_server(registry.root, admin_token=TOKEN, inference="worker", batch_timeout=0.005,
                          trainer_enabled="false")
    assert start_canary(server, "v0002", 50).status_code == 200
    try:
        assert holders_serve_canary(server, png, "v0002"), server.log_tail()
        assert versions_of(server, png, 20, **{"X-Model-Version": "v0001"}) == {"v0001": 20}
        assert set(versions_of(server, png, 60)) == {"v0001", "v0002"}
        with Load(server.url, [png], clients=4, max_seconds=30) as load:
            assert wait_until(lambda: {o.version for o in load.outcomes} >= {"v0001", "v0002"}, 10)
            aborted = requests.post(f"{server.url}/admin/canary/abort", headers=AUTH, timeout=10)
            assert aborted.status_code == 200 and aborted.json()["converged"], aborted.text
            assert versions_of(server, png, 30) == {"v0001": 30}
            count = len(load.outcomes)
            assert wait_until(lambda: len(load.outcomes) > count + 100, 20)
        assert load.failures() == [], load.failures()[:5]
    finally:
        requests.post(f"{server.url}/admin/canary/abort", headers=AUTH, timeout=10)
