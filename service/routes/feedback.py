"""POST /feedback: a user's correction (image, true label), stored for a later fine-tune.

Public, so guarded: a per-client rate limit (429), a bounded store (507), and a bearer token
when DIGITS_FEEDBACK_TOKEN is set (401).
"""

from __future__ import annotations

import asyncio
import math
from functools import cache

from fastapi import APIRouter, Depends, Request

from service.http.auth import require_feedback_token
from service.http.bodies import Form, decode_base64, read_body
from service.http.errors import ClientError
from service.http.inputs import digit_from_bytes_async
from service.http.labels import parse_label
from service.http.ratelimit import TokenBuckets
from service.routes.schemas import ErrorBody, FeedbackResponse, LabelledImageJSON, inline_schema
from service.routes.stores import FeedbackStoreDep, SettingsDep


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
                                 "label": {"type": "string", "pattern": "^[0-9]$", "description": "the true digit"}}}

MAX_PARTS = 8  # file and label, and a few a client may add
router = APIRouter(tags=["feedback"], dependencies=[Depends(rate_limit), Depends(require_feedback_token)])


async def labelled_image(request: Request) -> tuple[bytes, int]:
    """(image bytes, label) from multipart ``file`` + ``label`` or JSON ``{image, label}``."""
    body = await read_body(request, LabelledImageJSON, max_parts=MAX_PARTS,
                           expected="multipart/form-data (file, label) or application/json {image, label}")
    if not isinstance(body, Form):
        return decode_base64(body.image), body.label
    upload, label = body.file("file"), body.field("label")
    if upload is None:
        raise ClientError(422, "missing_file", "the multipart body needs a 'file' field holding the image")
    if label is None:
        raise ClientError(422, "missing_label", "the multipart body needs a 'label' field (0-9)")
    return upload.data, parse_label(label)


@router.post(
    "/feedback", status_code=201, response_model=FeedbackResponse,
    summary="Correct a prediction: store an image with its true label for fine-tuning",
    openapi_extra={"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": MULTIPART_FORM},
        "application/json": {"schema": inline_schema(LabelledImageJSON)}}}},
    responses={401: {"model": ErrorBody, "description": "DIGITS_FEEDBACK_TOKEN is set and the token is wrong"},
               413: {"model": ErrorBody, "description": "body or image dimensions over the limit"},
               415: {"model": ErrorBody, "description": "not a supported image or content type"},
               422: {"model": ErrorBody, "description": "bad label, corrupt image, bad JSON or base64"},
               429: {"model": ErrorBody, "description": "rate limit of this client address; see Retry-After"},
               507: {"model": ErrorBody, "description": "the feedback store is full"}},
)
async def post_feedback(request: Request, settings: SettingsDep, store: FeedbackStoreDep) -> FeedbackResponse:
    data, label = await labelled_image(request)
    store.check_room()  # before the costly part: decoding the image
    pixels = await digit_from_bytes_async(data, settings.max_pixels)
    sample_id, usage = await asyncio.to_thread(store.add, pixels, label)  # waits on a file lock
    return FeedbackResponse(stored=sample_id, label=label, feedback_samples=usage.samples)

