"""HTTP bodies -> validated 28x28 digits, in the API-server processes.

Everything a client can get wrong is caught here, before the request joins a batch, so a
bad request gets its own 4xx and never fails its neighbours. Only 784 bytes per request
cross the queue to the inference worker.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import time
from typing import NamedTuple

import numpy as np
from fastapi import Request
from starlette.datastructures import UploadFile

from model.preprocess import ImageProblem, prepare_digit
from service.bodies import media_type, parse_json, read_form
from service.errors import ClientError
from service.schemas import PredictJSON

# Decoding a big photo takes tens of milliseconds: do it off the event loop. Small images
# (the common case) are cheaper to decode in place than to hand to a thread.
INLINE_DECODE_BYTES = 64 * 1024
DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,", re.IGNORECASE)
# base64 as people produce it: line-wrapped (`base64` without -w0), spaces, missing padding,
# standard or url-safe alphabet (not mixed). Nothing else.
WHITESPACE = re.compile(r"[ \t\n\r\f\v]+")
STANDARD_BASE64 = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")
URLSAFE_BASE64 = re.compile(r"^[A-Za-z0-9_-]*={0,2}$")


class DigitInput(NamedTuple):
    """What crosses the queue to the inference worker for one request."""

    pixels: bytes  # uint8 [28,28], white on black
    request_id: str
    enqueued_at: float  # time.monotonic(): system-wide on Linux, so comparable across processes


def decode_base64(text: str, field: str = "image") -> bytes:
    """Standard or url-safe base64, with or without padding, whitespace anywhere (a data URL
    prefix is dropped); 422 naming ``field`` for anything else."""
    text = WHITESPACE.sub("", DATA_URL.sub("", text.strip(), count=1))
    if STANDARD_BASE64.match(text):
        alphabet = None
    elif URLSAFE_BASE64.match(text):
        alphabet = b"-_"
    else:
        raise ClientError(422, "invalid_base64", f"'{field}' holds characters that are not base64")
    text = text.rstrip("=")
    if not text or len(text) % 4 == 1:
        raise ClientError(422, "invalid_base64", f"'{field}' is not valid base64 (empty or truncated)")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=alphabet, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError(422, "invalid_base64", f"'{field}' is not valid base64") from None


async def image_bytes_from_request(request: Request, max_bytes: int) -> bytes:
    """The uploaded image: multipart field ``file`` or JSON ``{"image": base64}``."""
    kind = media_type(request)
    if kind == "multipart/form-data":
        form = await read_form(request, max_bytes, max_files=4)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ClientError(422, "missing_file", "the multipart body needs a 'file' field holding the image")
        return await upload.read()
    if kind == "application/json" or kind.endswith("+json"):
        payload = parse_json(await request.body(), PredictJSON)
        return decode_base64(payload.image)
    raise ClientError(
        415,
        "unsupported_media_type",
        f"Content-Type {kind or '(none)'} is not supported; send multipart/form-data with a 'file' "
        'field, or application/json {"image": "<base64>"}',
    )


def digit_from_bytes(data: bytes, max_pixels: int) -> np.ndarray:
    try:
        return prepare_digit(data, max_pixels)
    except ImageProblem as exc:
        raise ClientError(exc.status_code, exc.code, exc.message) from None


async def digit_from_bytes_async(data: bytes, max_pixels: int) -> np.ndarray:
    if len(data) <= INLINE_DECODE_BYTES:
        return digit_from_bytes(data, max_pixels)
    return await asyncio.to_thread(digit_from_bytes, data, max_pixels)


async def read_digit(request: Request) -> DigitInput:
    """FastAPI dependency of POST /predict: the request's digit, ready to batch."""
    settings = request.app.state.settings
    data = await image_bytes_from_request(request, settings.max_body_bytes)
    pixels = await digit_from_bytes_async(data, settings.max_pixels)
    request_id = request.scope.get("state", {}).get("request_id", "")
    return DigitInput(pixels.tobytes(), request_id, time.monotonic())
