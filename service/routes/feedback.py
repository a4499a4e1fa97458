"""POST /feedback: a user's correction (image, true label), stored for a later fine-tune.

Public, so guarded: a per-client rate limit (429), a bounded store (507), and a bearer token
when DIGITS_FEEDBACK_TOKEN is set (401).
"""

from __future__ import annotations

import asyncio
import math
from functools import cache
from typing import NamedTuple

from fastapi import APIRouter, Depends, Request

from model.registry import VERSION_PATTERN, Registry
from service import metrics
from service.http.auth import require_feedback_token
from service.http.bodies import Form, decode_base64, read_body
from service.http.errors import ClientError, echo
from service.http.inputs import digit_from_bytes_async
from service.http.labels import parse_label
from service.http.ratelimit import TokenBuckets
from service.routes.schemas import ErrorBody, FeedbackJSON, FeedbackResponse, inline_schema
from service.routes.stores import FeedbackStoreDep, RegistryDep, SettingsDep


@cache
def client_buckets(rate: float, burst: int) -> TokenBuckets:
    return TokenBuckets(rate, burst)  # one table per API-server process


def rate_limit(request: Request, settings: SettingsDep) -> None:
    client = request.client.host if request.client else "unknown"
    wait = client_buckets(settings.feedback_rate, settings.feedback_burst).take(client)
    if wait:
        raise ClientError(429, "rate_limited",
                          f"too many feedback posts from {client}: {settings.feedback_burst} at once, then "
                          f"{settings.feedback_rate:g} per second; retry in {wait:.1f} s",
                          headers={"Retry-After": str(math.ceil(wait))})


MULTIPART_FORM = {"type": "object", "required": ["file", "label"],
                  "properties": {"file": {"type": "string", "format": "binary"},
                                 "label": {"type": "string", "pattern": "^[0-9]$", "description": "the true digit"},
                                 "model_version": {"type": "string", "pattern": VERSION_PATTERN.pattern,
                                                   "description": "the version this corrects (optional)"}}}

MAX_PARTS = 8  # file and label, and a few a client may add
router = APIRouter(tags=["feedback"], dependencies=[Depends(rate_limit), Depends(require_feedback_token)])


class Correction(NamedTuple):
    image: bytes
    label: int
    model_version: str | None  # the version whose answer this corrects, when the client says


async def correction(request: Request) -> Correction:
    """From multipart ``file`` + ``label`` [+ ``model_version``] or JSON ``{image, label[, model_version]}``."""
    body = await read_body(request, FeedbackJSON, max_parts=MAX_PARTS,
                           expected="multipart/form-data (file, label) or application/json {image, label}")
    if not isinstance(body, Form):
        return Correction(decode_base64(body.image), body.label, body.model_version)
    upload, label = body.file("file"), body.field("label")
    if upload is None:
        raise ClientError(422, "missing_file", "the multipart body needs a 'file' field holding the image")
    if label is None:
        raise ClientError(422, "missing_label", "the multipart body needs a 'label' field (0-9)")
    return Correction(upload.data, parse_label(label), body.field("model_version"))


def check_corrected_version(version: str | None, registry: Registry) -> None:
    """A named version must exist: it becomes a metric label, so a made-up one would grow the metrics."""
    if version is not None and not registry.exists(version):
        raise ClientError(422, "unknown_version", f"model_version {echo(version)} names no version of this "
                                                  "registry; send the model_version of the answer you correct")


@router.post(
    "/feedback", status_code=201, response_model=FeedbackResponse,
    summary="Correct a prediction: store an image with its true label for fine-tuning",
    openapi_extra={"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": MULTIPART_FORM},
        "application/json": {"schema": inline_schema(FeedbackJSON)}}}},
    responses={401: {"model": ErrorBody, "description": "DIGITS_FEEDBACK_TOKEN is set and the token is wrong"},
               413: {"model": ErrorBody, "description": "body or image dimensions over the limit"},
               415: {"model": ErrorBody, "description": "not a supported image or content type"},
               422: {"model": ErrorBody,
                     "description": "bad label, corrupt image, bad JSON or base64, or a model_version that is not one"},
               429: {"model": ErrorBody, "description": "rate limit of this client address; see Retry-After"},
               507: {"model": ErrorBody, "description": "the feedback store is full"}},
)
async def post_feedback(request: Request, settings: SettingsDep, store: FeedbackStoreDep,
                        registry: RegistryDep) -> FeedbackResponse:
    sent = await correction(request)
    check_corrected_version(sent.model_version, registry)
    store.check_room()  # before the costly part: decoding the image
    pixels = await digit_from_bytes_async(sent.image, settings.max_pixels)
    sample_id, usage = await asyncio.to_thread(store.add, pixels, sent.label)  # waits on a file lock
    if sent.model_version is not None:
        metrics.feedback_corrections.labels(sent.model_version).inc()
    return FeedbackResponse(stored=sample_id, label=sent.label, model_version=sent.model_version,
                            feedback_samples=usage.samples)

