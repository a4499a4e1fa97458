"""POST /predict: an image in, the digit, its probabilities, the model version and runtime out.

The hot path, kept lean on purpose: a plain ASGI endpoint that the edge of every API server
calls directly (service.server.edge), past FastAPI's routing, dependency injection and
middleware stack. The body is parsed in memory and the answer encoded with orjson in one step.
It is also mounted as a route (so other methods get 405) and described in /docs.
"""

from __future__ import annotations

import base64
import logging
from urllib.parse import parse_qs

import numpy as np
import orjson
from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from model.preprocess import encode_png
from model.registry import open_registry
from service.http.bodies import decode_base64, is_json, kind_of, multipart_field, parse_json, receive_body, unsupported
from service.http.errors import ClientError, echo, json_error
from service.http.inputs import digit_from_bytes_async
from service.http.middleware import header
from service.inference.predictor import predictor_of
from service.loop.canary import PIN_HEADER, check_pin
from service.loop.capture import ORIGINAL
from service.routes.schemas import ErrorBody, PredictJSON, PredictResponse
from service.settings import settings_of

log = logging.getLogger("digits.predict")
PATH = "/predict"
PIN_HEADER_BYTES = PIN_HEADER.lower().encode()
TRUE, FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


def answer(probabilities: np.ndarray, model_version: str, runtime: str, request_id: str,
           pixels: np.ndarray | None = None) -> bytes:
    """The JSON body of one prediction (the PredictResponse shape)."""
    rounded = np.round(probabilities.astype(np.float64), 6)
    digit = int(rounded.argmax())
    body = {"digit": digit, "confidence": float(rounded[digit]), "probabilities": rounded.tolist(),
            "model_version": model_version, "runtime": runtime, "request_id": request_id}
    if pixels is not None:
        body["input_png"] = base64.b64encode(encode_png(pixels)).decode("ascii")
    return orjson.dumps(body)


def wants_explanation(query_string: bytes) -> bool:
    values = parse_qs(query_string.decode("latin-1"), keep_blank_values=True).get("explain", ["false"])
    value = values[-1].strip().lower()
    if value not in TRUE | FALSE:
        raise ClientError(422, "invalid_query", f"explain must be true or false, got {echo(value)}")
    return value in TRUE


def image_bytes(content_type: str, body: bytes) -> bytes:
    """The uploaded image of a /predict body: multipart field ``file`` or JSON ``{"image": base64}``."""
    kind = kind_of(content_type)
    if kind == "multipart/form-data":
        data = multipart_field(body, content_type, "file")
        if data is None:
            raise ClientError(422, "missing_file", "the multipart body needs a 'file' field holding the image")
        return data
    if is_json(kind):
        return decode_base64(parse_json(body, PredictJSON).image)
    raise unsupported(kind, """multipart/form-data with a 'file' field, or application/json {"image": "<base64>"}""")


class PredictEndpoint:
    """The ASGI endpoint of POST /predict."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope.setdefault("state", {})
        state["route_path"] = PATH
        request_id = state.get("request_id", "")
        try:
            explain = wants_explanation(scope.get("query_string", b""))
            data = image_bytes(header(scope, b"content-type") or "", await receive_body(receive))
            pixels = await digit_from_bytes_async(data, settings_of(self.app).max_pixels)
            pinned = header(scope, PIN_HEADER_BYTES)  # rare: the registry is read only for a pinned request
            pin = check_pin(open_registry(settings_of(self.app).registry), pinned) if pinned else None
            ORIGINAL.set(data)  # for the capture tap, which keeps it only with DIGITS_REVIEW_KEEP_ORIGINAL
            prediction = await predictor_of(self.app).predict(pixels[None], pin)
            status = 200
            body = answer(prediction.probabilities[0], prediction.model_version, prediction.runtime, request_id,
                          pixels if explain else None)
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        except ClientError as exc:
            status = exc.status_code
            headers, body = json_error(exc.code, exc.detail, request_id)
            headers += [(name.lower().encode(), value.encode()) for name, value in (exc.headers or {}).items()]
        except ConnectionResetError:
            return
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def document(app: FastAPI) -> None:
    """Describe POST /predict in the OpenAPI schema (it is a plain ASGI route, unseen by FastAPI)."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = generate()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (PredictResponse, ErrorBody, PredictJSON):
            components[model.__name__] = model.model_json_schema(ref_template="#/components/schemas/{model}")

        def ref(name: str) -> dict:
            return {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}

        schema["paths"][PATH] = {"post": {
            "tags": ["predict"],
            "summary": "Classify a handwritten digit",
            "description": "Send an image (PNG, JPEG, BMP, GIF, WebP, TIFF; photo, scan, canvas drawing or MNIST "
                           "sample) as multipart field `file`, or as JSON `{\"image\": \"<base64 or data URL>\"}`.",
            "parameters": [{"name": "explain", "in": "query", "required": False, "schema": {"type": "boolean"},
                            "description": "add `input_png`: the 28x28 digit the model was given"},
                           {"name": "X-Model-Version", "in": "header", "required": False,
                            "schema": {"type": "string"}, "description": "pin the active or the canary "
                            "version (debugging); without it a canary serves its share of requests"}],
            "requestBody": {"required": True, "content": {
                "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
                    "file": {"type": "string", "format": "binary"}}}},
                "application/json": {"schema": {"$ref": "#/components/schemas/PredictJSON"}}}},
            "responses": {
                "200": {"description": "the digit", **ref("PredictResponse")},
                "413": {"description": "body or image dimensions over the limit", **ref("ErrorBody")},
                "415": {"description": "not a supported image or content type", **ref("ErrorBody")},
                "422": {"description": "corrupt image, no ink, bad JSON or base64; a pinned version that is not "
                                       "served", **ref("ErrorBody")},
                "503": {"description": "the model is not ready, or its worker died, or the pinned version is not "
                                       "loaded yet: retry", **ref("ErrorBody")},
            },
        }}
        return schema

    app.openapi = openapi
