"""KServe V2 REST routes under /v2, with the binary tensor data extension.

Every route calls ``predictor_of(request.app)`` (the same batching path as /predict) and
answers errors as the spec's ``{"error": "<message>"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable
from typing import Any

import numpy as np
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from service.http.errors import CLIENT_CLOSED_REQUEST, echo
from service.inference import readiness
from service.inference.predictor import predictor_of
from service.settings import Settings, settings_of
from service.v2 import digits, tensors
from service.v2.errors import ProtocolError, bad_request
from service.v2.schemas import (
    ErrorResponse,
    InferenceRequest,
    InferenceResponse,
    LiveResponse,
    ModelMetadata,
    ReadyResponse,
    RequestInput,
    ResponseOutput,
    ServerMetadata,
)

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "bad request: names the problem"},
    404: {"model": ErrorResponse, "description": "unknown model or version"},
}
router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (V2)"], responses=ERRORS)


def protocol_error(_: Request, exc: ProtocolError) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.status_code)


def served_version(request: Request, model_name: str, version: str = "") -> str:
    return digits.served_version(predictor_of(request.app), settings_of(request.app).registry, model_name, version)


def metadata_of(request: Request, model_name: str, version: str = "") -> ModelMetadata:
    served = served_version(request, model_name, version)
    return digits.metadata_for(request.app, served)


def readiness_of(request: Request) -> JSONResponse:
    """200 when /ready says ready; the spec's 4xx (400) with a body saying so when not."""
    ready = readiness.report(request.app)["ready"]
    body = ReadyResponse(ready=ready).model_dump()
    return JSONResponse(body, status_code=200 if ready else 400)


@router.get("", summary="Server metadata")
async def metadata() -> ServerMetadata:
    return digits.server_metadata()


@router.get("/health/live", summary="Liveness")
async def live() -> LiveResponse:
    return LiveResponse(live=True)


@router.get("/health/ready", summary="Readiness (follows /ready)", response_model=ReadyResponse)
async def ready(request: Request) -> JSONResponse:
    return readiness_of(request)


@router.get("/models/{model_name}", summary="Model metadata")
async def model_metadata(request: Request, model_name: str) -> ModelMetadata:
    return metadata_of(request, model_name)


@router.get("/models/{model_name}/versions/{version}", summary="Model metadata of a version")
async def version_metadata(request: Request, model_name: str, version: str) -> ModelMetadata:
    return metadata_of(request, model_name, version)


@router.get("/models/{model_name}/ready", summary="Model readiness", response_model=ReadyResponse)
async def model_ready(request: Request, model_name: str) -> JSONResponse:
    served_version(request, model_name)
    return readiness_of(request)


@router.get("/models/{model_name}/versions/{version}/ready", summary="Model version readiness",
            response_model=ReadyResponse)
async def version_ready(request: Request, model_name: str, version: str) -> JSONResponse:
    served_version(request, model_name, version)
    return readiness_of(request)


@router.get("/models/{model_name}/config", summary="Model configuration (Triton's shape)")
async def model_config(request: Request, model_name: str) -> dict:
    digits.check_model(model_name)
    return digits.model_config(settings_of(request.app))


INFER_DOC = {
    "requestBody": {
        "required": True,
        "description": "JSON, or with the binary tensor data extension: the JSON header "
        "(its length in Inference-Header-Content-Length) followed by the tensors' bytes",
        "content": {
            "application/json": {"schema": InferenceRequest.model_json_schema()},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


INFER, VERSION_INFER = "/models/{model_name}/infer", "/models/{model_name}/versions/{version}/infer"


@router.post(INFER, summary="Classify a batch of digits", openapi_extra=INFER_DOC,
             response_model=InferenceResponse, responses={413: {"model": ErrorResponse}})
async def infer(request: Request, model_name: str) -> Response:
    served_version(request, model_name)
    return await run_inference(request)


@router.post(VERSION_INFER, summary="Classify with a given version",
             openapi_extra=INFER_DOC, response_model=InferenceResponse, responses={413: {"model": ErrorResponse}})
async def infer_version(request: Request, model_name: str, version: str) -> Response:
    served_version(request, model_name, version)
    return await run_inference(request)


def parse_request(header: bytes) -> InferenceRequest:
    try:
        return InferenceRequest.model_validate_json(header)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        raise bad_request(f"invalid inference request: {where + ': ' if where else ''}{first['msg']}") from None


def binary_size(item: RequestInput) -> int | None:
    size = item.parameters.get("binary_data_size")
    if size is None:
        if item.data is None:
            raise bad_request(f"input '{item.name}' has neither data nor parameters.binary_data_size")
        return None
    if item.data is not None:
        raise bad_request(f"input '{item.name}' has both data and parameters.binary_data_size; send one")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise bad_request(f"input '{item.name}': binary_data_size must be a byte count, got {echo(size)}")
    return size


async def input_pixels(item: RequestInput, spec: digits.TensorSpec, batch: int, binary: bytes,
                       settings: Settings) -> np.ndarray:
    size = binary_size(item)
    if size is not None and size != len(binary):
        raise bad_request(f"input '{item.name}': binary_data_size is {size} but {len(binary)} bytes follow "
                          "the JSON header")
    if size is None and binary:
        raise bad_request(f"{len(binary)} bytes follow the JSON header but input '{item.name}' has no "
                          "parameters.binary_data_size")
    if spec is digits.IMAGE:
        images = (tensors.bytes_from_raw(binary, batch, item.name) if size is not None
                  else tensors.bytes_from_base64(item.data, batch, item.name))
        return await digits.pixels_from_images(images, settings.max_pixels)
    count = digits.pixel_count(batch)
    values = (tensors.uint8_from_raw(binary, count, item.name) if size is not None
              else tensors.uint8_from_values(item.data, count, item.name))
    return digits.pixels_from_array(values, batch)


def flag(parameters: dict[str, Any], name: str, default: bool) -> bool:
    value = parameters.get(name, default)
    if not isinstance(value, bool):
        raise bad_request(f"parameter {name} must be true or false, got {echo(value)}")
    return value


def binary_outputs(payload: InferenceRequest, outputs: list[digits.TensorSpec]) -> list[bool]:
    """Per output: binary or JSON (the output's binary_data, else the request's binary_data_output)."""
    default = flag(payload.parameters, "binary_data_output", False)
    parameters = {o.name: o.parameters for o in payload.outputs or []}
    return [flag(parameters.get(out.name, {}), "binary_data", default) for out in outputs]


async def client_gone(request: Request) -> None:
    """Returns when the client has gone away (call once the body is read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_the_client_leaves(request: Request, work: Awaitable[Response]) -> Response:
    """``work``'s answer; if the client goes away first, ``work`` is cancelled (no more decoding
    or predicting for nobody) and the answer is an empty one that nobody reads."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(client_gone(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
    finally:
        gone.cancel()
        task.cancel()  # a no-op once it is done
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return Response(status_code=CLIENT_CLOSED_REQUEST)


INFER_PATH = re.compile(r"/v2/models/(?P<model_name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer")


class InferEndpoint:
    """POST /v2/models/{m}[/versions/{v}]/infer as a plain ASGI endpoint, the way /predict is:
    FastAPI's router, its middleware stack and LitServe's gzip took ~0.5 ms of a 64-image
    request's ~6 at one connection. Same answers and errors as the routes above, which stay for
    the OpenAPI schema; answers are not gzipped (the binary extension is the compact form)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send, match: re.Match[str]) -> None:
        model_name, version = match["model_name"], match["version"] or ""
        scope.setdefault("state", {})["route_path"] = router.prefix + (VERSION_INFER if version else INFER)
        scope["app"], scope["path_params"] = self.app, {k: v for k, v in match.groupdict().items() if v}
        request = Request(scope, receive)
        try:
            served_version(request, model_name, version)
            response = await run_inference(request)
        except ProtocolError as exc:
            response = protocol_error(request, exc)
        except ClientDisconnect:  # it left while its body was read: nobody reads an answer (the access log: 499)
            response = Response(status_code=CLIENT_CLOSED_REQUEST)
        await response(scope, receive, send)


async def run_inference(request: Request) -> Response:
    body = await request.body()
    return await unless_the_client_leaves(request, answer(request, body))


async def answer(request: Request, body: bytes) -> Response:
    settings = settings_of(request.app)
    header, binary = tensors.split_body(body, request.headers.get(tensors.HEADER_LENGTH))
    payload = parse_request(header)
    spec, batch = digits.check_input(
        [digits.TensorSpec(i.name, i.datatype, tuple(i.shape)) for i in payload.inputs], digits.max_batch(settings)
    )
    outputs = digits.check_outputs(None if payload.outputs is None else [o.name for o in payload.outputs])
    binary_flags = binary_outputs(payload, outputs)
    pixels = await input_pixels(payload.inputs[0], spec, batch, binary, settings)
    prediction = await digits.predict(predictor_of(request.app), pixels, request.path_params.get("version", ""))
    tensors_out, blobs = [], []
    for (out, array), as_binary in zip(digits.output_arrays(prediction.probabilities, outputs), binary_flags,
                                       strict=True):
        entry = ResponseOutput(name=out.name, datatype=out.datatype, shape=list(array.shape))
        if as_binary:
            blob = tensors.raw_of(array)
            entry.parameters = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry.data = tensors.json_of(array)
        tensors_out.append(entry)
    body = InferenceResponse(
        model_name=digits.MODEL_NAME, model_version=prediction.model_version, id=payload.id,
        parameters={"runtime": prediction.runtime}, outputs=tensors_out,
    ).model_dump_json(exclude_none=True).encode()
    if not blobs:
        return Response(body, media_type="application/json")
    return Response(b"".join([body, *blobs]), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(body))})
