"""The Open Inference Protocol (KServe V2) through the real clients: tritonclient's HTTP and gRPC
clients against a real server, answers compared with /predict, every bad case, a hot swap."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from model.preprocess import prepare_digit
from model.registry import Registry
from service.v2 import tensors
from service.v2.errors import MAX_MESSAGE_CHARS, ProtocolError
from tests.conftest import (
    ROOT,
    ServerProcess,
    access_line,
    copy_registry,
    large_png,
    png_of,
    post_png,
    service_process,
    still_running,
    wait_until,
)

BATCH = 64
CAP = 16 * 4  # DIGITS_MAX_BATCH_SIZE (default 16) x 4
PROTOS = Path("service/v2/protos")


# ------------------------------------------------------------------ the generated stubs


def test_committed_stubs_are_what_the_proto_generates(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", f"--python_out={out}", f"--pyi_out={out}",
         f"--grpc_python_out={out}", str(PROTOS / "grpc_predict_v2.proto")],
        cwd=ROOT, check=True,
    )
    generated = sorted(p.name for p in (out / PROTOS).iterdir())
    assert generated == ["grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2.pyi", "grpc_predict_v2_pb2_grpc.py"]
    for name in generated:
        assert (out / PROTOS / name).read_text() == (ROOT / PROTOS / name).read_text(), f"{name}: run make protos"


# ------------------------------------------------------------------ tensor wire forms (pure)


def test_binary_bytes_elements_as_tritonclient_writes_them() -> None:
    elements = [b"\x89PNG first", b"", b"third"]
    raw = serialize_byte_tensor(np.array(elements, dtype=object)).item()
    assert tensors.bytes_from_raw(raw, 3, "image") == elements
    for broken, words in ((raw[:-1], "declares 5 bytes"), (raw[:2], "ends inside the length"), (raw + raw, "holds 6")):
        with pytest.raises(ProtocolError, match=words):
            tensors.bytes_from_raw(broken, 3, "image")


def test_json_header_and_binary_part_split() -> None:
    assert tensors.split_body(b'{"a": 1}xyz', "8") == (b'{"a": 1}', b"xyz")
    assert tensors.split_body(b'{"a": 1}', None) == (b'{"a": 1}', b"")
    for bad in ("-1", "eight", "99", "\u00b2", "1\u00b3", "\u00b9"):  # ² ³ ¹: str.isdigit() says yes, int() no
        with pytest.raises(ProtocolError):
            tensors.split_body(b"{}", bad)


def test_an_error_message_never_grows_with_the_request() -> None:
    assert len(ProtocolError(400, "x" * 1_000_000).message) <= MAX_MESSAGE_CHARS


def test_uint8_values_flat_or_nested_and_checked() -> None:
    nested = np.arange(8).reshape(2, 4).tolist()
    assert tensors.uint8_from_values(nested, 8, "pixels").tolist() == list(range(8))
    for bad, words in (([[1, 2], [3]], "ragged"), ([1, 2, 256, 0], "0 to 255"), ([True] * 4, "integers")):
        with pytest.raises(ProtocolError, match=words):
            tensors.uint8_from_values(bad, 4, "pixels")
    assert tensors.raw_of(np.array([1.5], np.float32)) == np.array([1.5], "<f4").tobytes()


# ------------------------------------------------------------------ a real server


@pytest.fixture(scope="module")
def registry(base_registry, tmp_path_factory) -> Registry:
    """v0001 active, and v0002 (the same model) published but not active."""
    registry = copy_registry(base_registry, tmp_path_factory.mktemp("v2") / "registry")
    registry.import_version(registry, "v0001", activate=False)
    return registry


@pytest.fixture(scope="module")
def server(registry: Registry) -> ServerProcess:
    """Two API servers: both bind the gRPC port."""
    proc = service_process(registry.root, api_servers=2, trainer_enabled=False)
    proc.start(registry.root.parent)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def http_client(server: ServerProcess) -> triton_http.InferenceServerClient:
    client = triton_http.InferenceServerClient(f"127.0.0.1:{server.port}", concurrency=4)
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc_client(server: ServerProcess) -> triton_grpc.InferenceServerClient:
    client = triton_grpc.InferenceServerClient(server.grpc_address)
    yield client
    client.close()


@pytest.fixture(scope="module")
def digits_batch(mnist_test) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """64 MNIST test PNGs, the 28x28 digits /predict makes of them, and their labels."""
    images, labels = mnist_test
    pngs = [png_of(images[i]) for i in range(BATCH)]
    return pngs, np.stack([prepare_digit(png) for png in pngs]), labels[:BATCH].numpy()


@pytest.fixture(scope="module")
def predict_answers(server: ServerProcess, digits_batch) -> list[dict]:
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda png: post_png(server.url, png), digits_batch[0]))
    assert all(r.status_code == 200 for r in responses)
    return [r.json() for r in responses]


def assert_same_as_predict(probabilities: np.ndarray, digit: np.ndarray, answers: list[dict]) -> None:
    """Identical to /predict at the precision /predict reports (6 decimals)."""
    assert probabilities.dtype == np.float32 and probabilities.shape == (len(answers), 10)
    assert digit.dtype == np.int64 and digit.tolist() == [a["digit"] for a in answers]
    rounded = [[round(float(p), 6) for p in row] for row in probabilities]
    assert rounded == [a["probabilities"] for a in answers]


def http_image_input(pngs: list[bytes], binary: bool) -> triton_http.InferInput:
    tensor = triton_http.InferInput("image", [len(pngs)], "BYTES")
    elements = pngs if binary else [base64.b64encode(png) for png in pngs]
    tensor.set_data_from_numpy(np.array(elements, dtype=object), binary_data=binary)
    return tensor


def http_pixels_input(pixels: np.ndarray, binary: bool) -> triton_http.InferInput:
    tensor = triton_http.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    return tensor


def http_outputs(binary: bool) -> list[triton_http.InferRequestedOutput]:
    return [triton_http.InferRequestedOutput(name, binary_data=binary) for name in ("probabilities", "digit")]


def grpc_input(name: str, data: np.ndarray) -> triton_grpc.InferInput:
    datatype = "BYTES" if name == "image" else "UINT8"
    tensor = triton_grpc.InferInput(name, list(data.shape), datatype)
    tensor.set_data_from_numpy(data)
    return tensor


def test_health_metadata_and_config(server, http_client, grpc_client) -> None:
    assert http_client.is_server_live() and http_client.is_server_ready()
    assert http_client.is_model_ready("digits") and http_client.is_model_ready("digits", "v0001")
    assert grpc_client.is_server_live() and grpc_client.is_server_ready() and grpc_client.is_model_ready("digits")
    assert requests.get(f"{server.url}/ready", timeout=5).status_code == 200
    assert requests.get(f"{server.url}/v2/health/live", timeout=5).json() == {"live": True}  # as the spec and gRPC
    assert requests.get(f"{server.url}/v2/health/ready", timeout=5).json() == {"ready": True}
    meta = http_client.get_server_metadata()
    assert meta["name"] == "digit-service" and "binary_tensor_data" in meta["extensions"]
    assert "binary_tensor_data" in grpc_client.get_server_metadata(as_json=True)["extensions"]
    tensors = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                          {"name": "pixels", "datatype": "UINT8", "shape": [-1, 28, 28]}],
               "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
                           {"name": "digit", "datatype": "INT64", "shape": [-1]}]}
    model = http_client.get_model_metadata("digits")
    assert model["versions"] == ["v0001"] and {k: model[k] for k in tensors} == tensors
    assert http_client.get_model_metadata("digits", "v0001") == model
    grpc_model = grpc_client.get_model_metadata("digits", as_json=True)  # int64 fields come as strings in JSON
    assert grpc_model["versions"] == ["v0001"]
    assert [[int(d) for d in t["shape"]] for t in grpc_model["inputs"]] == [[-1], [-1, 28, 28]]
    assert [t["name"] for t in grpc_model["outputs"]] == ["probabilities", "digit"]
    config = http_client.get_model_config("digits")
    assert config["max_batch_size"] == CAP and "dynamic_batching" in config
    assert [i["name"] for i in config["input"]] == ["image", "pixels"]
    assert [o["name"] for o in config["output"]] == ["probabilities", "digit"]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_http_answers_equal_predict(http_client, digits_batch, predict_answers, binary: bool) -> None:
    pngs, pixels, labels = digits_batch
    for tensor in (http_image_input(pngs, binary), http_pixels_input(pixels, binary)):
        result = http_client.infer("digits", [tensor], outputs=http_outputs(binary))
        assert_same_as_predict(result.as_numpy("probabilities"), result.as_numpy("digit"), predict_answers)
        response = result.get_response()
        assert response["model_version"] == "v0001" and response["parameters"]["runtime"] == "onnxruntime"
        assert all(("data" in o) != binary for o in response["outputs"])
    single = http_client.infer("digits", [http_image_input(pngs[:1], binary)], outputs=http_outputs(binary))
    assert_same_as_predict(single.as_numpy("probabilities"), single.as_numpy("digit"), predict_answers[:1])
    assert (np.array([a["digit"] for a in predict_answers]) == labels).mean() > 0.95


def test_http_defaults_selection_and_version_path(http_client, digits_batch, predict_answers) -> None:
    pngs, pixels, _ = digits_batch
    # tritonclient asks for every output in binary when none is named (binary_data_output)
    result = http_client.infer("digits", [http_pixels_input(pixels[:2], True)], request_id="req-7")
    assert result.get_response()["id"] == "req-7"
    assert_same_as_predict(result.as_numpy("probabilities"), result.as_numpy("digit"), predict_answers[:2])
    only_digit = http_client.infer("digits", [http_image_input(pngs[:3], True)],
                                   outputs=[triton_http.InferRequestedOutput("digit", binary_data=False)])
    assert [o["name"] for o in only_digit.get_response()["outputs"]] == ["digit"]
    assert only_digit.as_numpy("digit").tolist() == [a["digit"] for a in predict_answers[:3]]
    versioned = http_client.infer("digits", [http_image_input(pngs[:1], True)], model_version="v0001")
    assert versioned.get_response()["model_version"] == "v0001"


def test_grpc_answers_equal_predict(server, grpc_client, digits_batch, predict_answers) -> None:
    pngs, pixels, _ = digits_batch
    for tensor in (grpc_input("image", np.array(pngs, dtype=object)), grpc_input("pixels", pixels)):
        result = grpc_client.infer("digits", [tensor])
        assert_same_as_predict(result.as_numpy("probabilities"), result.as_numpy("digit"), predict_answers)
        assert result.get_response().model_version == "v0001"
    single = grpc_client.infer("digits", [grpc_input("image", np.array(pngs[:1], dtype=object))],
                               outputs=[triton_grpc.InferRequestedOutput("digit")], model_version="v0001")
    assert single.as_numpy("digit").tolist() == [predict_answers[0]["digit"]]
    assert single.as_numpy("probabilities") is None

    # typed contents instead of raw_input_contents, through tritonclient's own generated stub
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for name, contents in (("image", service_pb2.InferTensorContents(bytes_contents=pngs)),
                               ("pixels", service_pb2.InferTensorContents(uint_contents=pixels.reshape(-1).tolist()))):
            shape = [BATCH] if name == "image" else [BATCH, 28, 28]
            datatype = "BYTES" if name == "image" else "UINT8"
            request = service_pb2.ModelInferRequest(model_name="digits", inputs=[
                service_pb2.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape,
                                                               contents=contents)])
            response = stub.ModelInfer(request, timeout=30)
            assert [o.name for o in response.outputs] == ["probabilities", "digit"]
            probabilities = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(BATCH, 10)
            digit = np.frombuffer(response.raw_output_contents[1], dtype="<i8")
            assert_same_as_predict(probabilities, digit, predict_answers)


def test_infer_skips_fastapi_but_answers_and_counts_the_same(server, digits_batch) -> None:
    """V2 infer goes from the edge straight to its endpoint (service/v2/rest.py: InferEndpoint), as /predict
    does: LitServe's gzip middleware, inside FastAPI, never sees it; metrics keep the routes' names."""
    _, pixels, _ = digits_batch
    body = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [16, 28, 28],
                        "data": pixels[:16].reshape(-1).tolist()}]}  # a JSON answer well over gzip's 1000 bytes
    for path in ("/v2/models/digits/infer", "/v2/models/digits/versions/v0001/infer"):
        answer = requests.post(server.url + path, json=body, headers={"Accept-Encoding": "gzip"}, timeout=30)
        assert answer.status_code == 200 and answer.json()["model_version"] == "v0001", answer.text
        assert "content-encoding" not in answer.headers and len(answer.content) > 1000
    unknown = requests.post(server.url + "/v2/models/nope/infer", json=body, timeout=30)
    assert unknown.status_code == 404 and "nope" in unknown.json()["error"], unknown.text
    exposition = requests.get(f"{server.url}/metrics", timeout=10).text
    for route in ("/v2/models/{model_name}/infer", "/v2/models/{model_name}/versions/{version}/infer"):
        assert f'digits_http_requests_total{{method="POST",route="{route}",status="200"}}' in exposition, route


def split_batches(server: ServerProcess, threads: int) -> float:
    """digits_split_batches_total{threads=...} summed over the API servers."""
    pattern = rf'^digits_split_batches_total{{threads="{threads}"}} ([0-9.e+]+)$'
    found = re.findall(pattern, requests.get(f"{server.url}/metrics", timeout=10).text, flags=re.MULTILINE)
    return sum(float(value) for value in found)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: nothing to split a batch over")
def test_a_large_batch_from_one_connection_runs_on_two_threads(server, http_client, digits_batch) -> None:
    """The other API server idle: a 64-image batch is split over two threads (service/inference/cores.py,
    as its metric says) and answers exactly as batches of 8, which run on one thread."""
    _, pixels, _ = digits_batch
    before = split_batches(server, 2)
    whole = None
    for _ in range(5):  # the other API server counts as busy for 20 ms after it last computed
        whole = http_client.infer("digits", [http_pixels_input(pixels, True)]).as_numpy("probabilities")
        if split_batches(server, 2) > before:
            break
        time.sleep(0.05)
    assert split_batches(server, 2) > before
    in_eights = [http_client.infer("digits", [http_pixels_input(pixels[i:i + 8], True)]).as_numpy("probabilities")
                 for i in range(0, BATCH, 8)]
    assert np.array_equal(whole, np.concatenate(in_eights))


def test_through_the_inference_worker_too(start_server, registry_copy, digits_batch) -> None:
    """inference=worker (the CUDA path): V2 requests join the workers' batches and still equal /predict."""
    pngs = digits_batch[0]
    server = start_server(registry_copy.root, inference="worker", trainer_enabled=False)
    http = triton_http.InferenceServerClient(f"127.0.0.1:{server.port}")
    assert http.get_model_metadata("digits")["versions"] == ["v0001"]  # before any answer: ACTIVE
    answers = [post_png(server.url, png).json() for png in pngs]
    result = http.infer("digits", [http_image_input(pngs, True)])
    assert_same_as_predict(result.as_numpy("probabilities"), result.as_numpy("digit"), answers)
    http.close()
    with triton_grpc.InferenceServerClient(server.grpc_address) as client:
        result = client.infer("digits", [grpc_input("image", np.array(pngs, dtype=object))])
    assert_same_as_predict(result.as_numpy("probabilities"), result.as_numpy("digit"), answers)


# ------------------------------------------------------------------ bad requests

NOISE_PNG = png_of(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))


def v2_json(inputs: list[dict], **extra) -> dict:
    return dict(json={"inputs": inputs, **extra})


def pixels_json(n: int = 1, **overrides) -> dict:
    return {"name": "pixels", "datatype": "UINT8", "shape": [n, 28, 28], "data": [0] * (n * 784), **overrides}


def image_json(pngs: list[bytes]) -> dict:
    return {"name": "image", "datatype": "BYTES", "shape": [len(pngs)],
            "data": [base64.b64encode(p).decode() for p in pngs]}


def binary_body(header: dict, blob: bytes) -> dict:
    text = json.dumps(header).encode()
    return dict(data=text + blob, headers={"Inference-Header-Content-Length": str(len(text))})


def bad_http_cases(png: bytes) -> dict[str, tuple[str, dict, int, str]]:
    """name -> (path, request kwargs, status, words the error must contain)."""
    infer = "/v2/models/digits/infer"
    seven = image_json([png])
    return {
        "wrong_datatype": (infer, v2_json([pixels_json(datatype="FP32")]), 400, "must be UINT8"),
        "wrong_shape": (infer, v2_json([pixels_json(shape=[1, 28])]), 400, "shape [n,28,28]"),
        "image_shape": (infer, v2_json([{**seven, "shape": [1, 1]}]), 400, "shape [n]"),
        "data_size_vs_shape": (infer, v2_json([pixels_json(data=[0] * 700)]), 400, "784 elements"),
        "pixel_out_of_range": (infer, v2_json([pixels_json(data=[300] * 784)]), 400, "0 to 255"),
        "float_pixels": (infer, v2_json([pixels_json(data=[0.5] * 784)]), 400, "integers"),
        "unknown_input": (infer, v2_json([{**seven, "name": "picture"}]), 400, "unknown input 'picture'"),
        "both_inputs": (infer, v2_json([seven, pixels_json()]), 400, "one input"),
        "no_input": (infer, v2_json([]), 400, "no input"),
        "unknown_output": (infer, v2_json([seven], outputs=[{"name": "logits"}]), 400, "unknown output 'logits'"),
        "undecodable_image_names_index": (
            infer, v2_json([image_json([png, png, b"not an image at all"])]), 400, "element 2"),
        "corrupt_image": (infer, v2_json([image_json([NOISE_PNG[: len(NOISE_PNG) // 2]])]), 400, "element 0"),
        "bad_base64": (infer, v2_json([{**seven, "data": ["!!not base64!!"]}]), 400, "base64"),
        "over_the_batch_cap": (infer, v2_json([pixels_json(CAP + 1)]), 400, f"at most {CAP}"),
        "malformed_json": (infer, dict(data=b'{"inputs": [', headers={"Content-Type": "application/json"}),
                           400, "invalid inference request"),
        "missing_data": (infer, v2_json([{k: v for k, v in seven.items() if k != "data"}]), 400, "neither data"),
        "binary_size_mismatch": (infer, binary_body(
            {"inputs": [{**pixels_json(), "data": None, "parameters": {"binary_data_size": 784}}]}, b"\0" * 100),
            400, "binary_data_size is 784"),
        "binary_without_binary_data_size": (infer, binary_body({"inputs": [seven]}, b"\0" * 10), 400,
                                            "no parameters.binary_data_size"),
        "header_length_past_the_body": (infer, dict(data=b"{}", headers={"Inference-Header-Content-Length": "99"}),
                                        400, "Inference-Header-Content-Length"),
        "header_length_superscript": (infer, dict(data=b"{}", headers={"Inference-Header-Content-Length": "\u00b2"}),
                                      400, "Inference-Header-Content-Length"),  # sent as the latin-1 byte 0xb2
        "truncated_binary_bytes": (infer, binary_body(
            {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 6}}]},
            b"\x10\0\0\0ab"), 400, "declares 16 bytes"),
        "body_over_the_limit": (infer, dict(data=b"0" * (5 * 1024 * 1024 + 10),
                                            headers={"Content-Type": "application/json"}), 413, "limit"),
        "unknown_model": ("/v2/models/letters/infer", v2_json([seven]), 404, "unknown model 'letters'"),
        "unknown_version": ("/v2/models/digits/versions/v0042/infer", v2_json([seven]), 404, "no version 'v0042'"),
        "known_version_not_served": ("/v2/models/digits/versions/v0002/infer", v2_json([seven]), 400, "not served"),
        "unknown_model_metadata": ("/v2/models/letters", None, 404, "unknown model"),
        "not_served_version_metadata": ("/v2/models/digits/versions/v0002", None, 400, "not served"),
        "unknown_version_ready": ("/v2/models/digits/versions/v0042/ready", None, 404, "no version"),
        "unknown_v2_route": ("/v2/models/digits/explain", None, 404, "Not Found"),
        "wrong_method": ("/v2/models/digits/infer", None, 405, "Method Not Allowed"),
    }


def test_http_bad_requests_get_the_spec_error(server, digits_batch) -> None:
    png = digits_batch[0][0]
    for name, (path, kwargs, status, words) in bad_http_cases(png).items():
        if kwargs is None:
            response = requests.get(server.url + path, timeout=30)
        else:
            response = requests.post(server.url + path, timeout=30, **kwargs)
        assert response.status_code == status, (name, response.status_code, response.text)
        body = response.json()
        assert list(body) == ["error"] and words in body["error"], (name, body)
    # a good request right after every bad one: the server is unharmed
    good = requests.post(f"{server.url}/v2/models/digits/infer", timeout=30, **v2_json([image_json([png])]))
    assert good.status_code == 200 and good.json()["outputs"][1]["data"] == [7]


def test_tritonclient_http_reports_the_error(http_client, digits_batch) -> None:
    with pytest.raises(InferenceServerException) as caught:
        http_client.infer("digits", [http_pixels_input(np.zeros((CAP + 1, 28, 28), np.uint8), True)])
    assert caught.value.status() == "400" and f"at most {CAP}" in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        http_client.infer("digits", [http_image_input(digits_batch[0][:1], True)], model_version="v0002")
    assert caught.value.status() == "400" and "not served" in caught.value.message()


def test_grpc_bad_requests_get_status_codes(server, grpc_client, digits_batch) -> None:
    png = digits_batch[0][0]
    image = np.array([png], dtype=object)
    blank = np.zeros((1, 28, 28), np.uint8)
    cases = {
        "wrong_datatype": (dict(inputs=[triton_grpc.InferInput("pixels", [1, 28, 28], "FP32")
                                        .set_data_from_numpy(np.zeros((1, 28, 28), np.float32))]),
                           "INVALID_ARGUMENT", "must be UINT8"),
        "wrong_shape": (dict(inputs=[grpc_input("pixels", np.zeros((1, 28, 27), np.uint8))]),
                        "INVALID_ARGUMENT", "shape [n,28,28]"),
        "unknown_input": (dict(inputs=[triton_grpc.InferInput("picture", [1], "BYTES").set_data_from_numpy(image)]),
                          "INVALID_ARGUMENT", "unknown input"),
        "both_inputs": (dict(inputs=[grpc_input("image", image), grpc_input("pixels", blank)]),
                        "INVALID_ARGUMENT", "one input"),
        "unknown_output": (dict(inputs=[grpc_input("image", image)],
                                outputs=[triton_grpc.InferRequestedOutput("logits")]),
                           "INVALID_ARGUMENT", "unknown output"),
        "undecodable_image": (dict(inputs=[grpc_input("image", np.array([png, b"garbage"], dtype=object))]),
                              "INVALID_ARGUMENT", "element 1"),
        "over_the_batch_cap": (dict(inputs=[grpc_input("pixels", np.zeros((CAP + 1, 28, 28), np.uint8))]),
                               "INVALID_ARGUMENT", f"at most {CAP}"),
        "unknown_version": (dict(inputs=[grpc_input("image", image)], model_version="v0042"),
                            "NOT_FOUND", "no version"),
        "not_served_version": (dict(inputs=[grpc_input("image", image)], model_version="v0002"),
                               "INVALID_ARGUMENT", "not served"),
        "message_over_the_limit": (dict(inputs=[grpc_input("image", np.array([b"0" * (5 * 1024 * 1024 + 10)],
                                                                             dtype=object))]),
                                   "RESOURCE_EXHAUSTED", ""),
    }
    for name, (kwargs, code, words) in cases.items():
        with pytest.raises(InferenceServerException) as caught:
            grpc_client.infer(kwargs.pop("model_name", "digits"), **kwargs)
        assert caught.value.status() == f"StatusCode.{code}", (name, caught.value)
        assert words in caught.value.message(), (name, caught.value.message())
    with pytest.raises(InferenceServerException) as caught:
        grpc_client.infer("letters", [grpc_input("image", image)])
    assert caught.value.status() == "StatusCode.NOT_FOUND"
    assert grpc_client.infer("digits", [grpc_input("image", image)]).as_numpy("digit").tolist() == [7]


def test_errors_stay_small_however_big_the_request(server) -> None:
    tiny = {"name": "pixels", "datatype": "UINT8", "shape": [1, 28, 28], "data": [0]}
    response = requests.post(f"{server.url}/v2/models/digits/infer", timeout=60, json={"inputs": [tiny] * 60_000})
    assert response.status_code == 400 and "not 60,000" in response.json()["error"], response.text[:500]
    assert len(response.content) <= MAX_MESSAGE_CHARS + 100, len(response.content)
    named = requests.post(f"{server.url}/v2/models/digits/infer", timeout=60,
                          json={"inputs": [{**tiny, "name": "x" * 100_000}]})
    assert named.status_code == 400 and "unknown input" in named.json()["error"]
    assert len(named.content) < 1000, len(named.content)
    # over gRPC the client refuses a status message over 8 KiB: it must see INVALID_ARGUMENT, not "Stream removed"
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        tensor = service_pb2.ModelInferRequest.InferInputTensor(name="pixels", datatype="UINT8", shape=[1, 28, 28])
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(service_pb2.ModelInferRequest(model_name="digits", inputs=[tensor] * 2000), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
    assert "not 2,000" in caught.value.details()


MALFORMED_PROTOBUF = {
    "truncated_varint": b"\x08",
    "length_past_the_end": b"\x0a\x7fdigits",
    "invalid_wire_type": b"\x0f\x01",
    "end_group_without_start": b"\x0c",
    "invalid_utf8_model_name": b"\x0a\x02\xff\xfe",
    "nested_input_truncated": b"\x2a\x05\x0a\x0apix",
    "junk": b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
}


def test_malformed_protobuf_gets_invalid_argument(server) -> None:
    cases = [("ModelInfer", name) for name in MALFORMED_PROTOBUF] + [("ServerLive", "junk"), ("ModelReady", "junk")]
    with grpc.insecure_channel(server.grpc_address) as channel:
        for method, name in cases:
            call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")  # bytes in, bytes out
            with pytest.raises(grpc.RpcError) as caught:
                call(MALFORMED_PROTOBUF[name], timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, name, caught.value)
            assert "not a valid protobuf message" in caught.value.details(), (method, name)
        live = channel.unary_unary("/inference.GRPCInferenceService/ServerLive")(b"", timeout=10)
        assert service_pb2.ServerLiveResponse.FromString(live).live  # a well-formed call still works


def test_an_abandoned_request_stops_its_work(server, digits_batch) -> None:
    """A client that leaves: its request is cancelled (no more decodes) and counted as 499."""
    header = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [16],
                          "parameters": {"binary_data_size": 0}}]}
    blob = serialize_byte_tensor(np.array([large_png(digits_batch[1][0])] * 16, dtype=object)).item()
    header["inputs"][0]["parameters"]["binary_data_size"] = len(blob)
    text = json.dumps(header).encode()
    head = (f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nInference-Header-Content-Length: {len(text)}\r\n"
            f"Content-Length: {len(text) + len(blob)}\r\n").encode()
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:  # the whole request, answered
        sock.sendall(head + b"X-Request-ID: waited-for\r\nConnection: close\r\n\r\n" + text + blob)
        sock.settimeout(120)
        assert sock.recv(100).startswith(b"HTTP/1.1 200")
    whole = time.monotonic() - started
    with socket.create_connection(("127.0.0.1", server.port)) as sock:  # the same, abandoned
        sock.sendall(head + b"X-Request-ID: abandoned\r\n\r\n" + text + blob)
        time.sleep(min(0.5, whole / 4))
    line = wait_until(lambda: access_line(server, "abandoned"), 120)
    print(f"16 large images: {whole:.2f} s answered; abandoned: {line}")
    assert line["status"] == 499, line
    assert line["duration_ms"] < whole * 1e3 / 2, (line, whole)


# ------------------------------------------------------------------ hot swap and shutdown


def test_hot_swap_shows_in_model_version_within_two_seconds(server, registry, http_client, digits_batch) -> None:
    pngs = digits_batch[0][:4]
    seen: list[tuple[float, str, str]] = []  # (monotonic time, transport, model_version)
    stop = threading.Event()

    def stream() -> None:
        # tritonclient's HTTP client runs on gevent: it must live in the thread that uses it
        http_client = triton_http.InferenceServerClient(f"127.0.0.1:{server.port}")
        grpc_client = triton_grpc.InferenceServerClient(server.grpc_address)
        deadline = time.monotonic() + 20
        while not stop.is_set() and time.monotonic() < deadline:
            http = http_client.infer("digits", [http_image_input(pngs, True)])
            seen.append((time.monotonic(), "http", http.get_response()["model_version"]))
            rpc = grpc_client.infer("digits", [grpc_input("image", np.array(pngs, dtype=object))])
            seen.append((time.monotonic(), "grpc", rpc.get_response().model_version))
        http_client.close()
        grpc_client.close()

    streamer = threading.Thread(target=stream)
    streamer.start()
    try:
        assert wait_until(lambda: len(seen) >= 4, 30, interval=0.05)
        activated = time.monotonic()
        registry.activate("v0002")
        assert wait_until(lambda: {v for t, _, v in seen if t > activated + 2.0}, 10, interval=0.05)
    finally:
        stop.set()
        streamer.join(30)
    late = {(transport, version) for t, transport, version in seen if t > activated + 2.0}
    assert late == {("http", "v0002"), ("grpc", "v0002")}, late
    assert {v for t, _, v in seen if t < activated} == {"v0001"}
    assert http_client.get_model_metadata("digits")["versions"] == ["v0002"]
    registry.activate("v0001")


def test_grpc_port_in_use_stops_the_server(registry_copy, tmp_path) -> None:
    """Like an HTTP port in use: the server does not run half-working without gRPC."""
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        proc = service_process(registry_copy.root, trainer_enabled=False)
        proc.grpc_port = blocker.getsockname()[1]
        try:
            proc.start(tmp_path, wait_ready=0)
            assert wait_until(lambda: proc.process.poll() is not None, 90), "server still running"
            assert f"cannot serve gRPC on port {proc.grpc_port}" in proc.log_path.read_text()
        finally:
            proc.stop()


def test_sigterm_stops_grpc_with_everything_else(server) -> None:
    """Last in this module: stops the module's server."""
    processes = server.descendants()
    assert len(processes) >= 3  # API servers, inference worker, ...
    server.stop(signal.SIGTERM)
    assert server.process.returncode == 0, server.log_tail()
    assert still_running(processes) == []
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", server.grpc_port)) != 0, "the gRPC port still accepts connections"
