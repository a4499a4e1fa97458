"""HTTP bodies -> validated 28x28 digits, in the API-server processes.

Everything a client can get wrong is caught here, before the model sees the request, so a
bad request gets its own 4xx and never fails its neighbours in a batch.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re

import numpy as np

from model.preprocess import ImageProblem, declared_pixels, prepare_digit
from service.bodies import is_json, kind_of, multipart_field, parse_json
from service.errors import ClientError
from service.schemas import PredictJSON

INLINE_DECODE_PIXELS = 256 * 256  # decoded on the event loop up to this size (well under a millisecond)
HEAVY_DECODES = 2  # concurrent decodes of bigger images per API server
DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,", re.IGNORECASE)
# base64 as people produce it: line-wrapped (`base64` without -w0), spaces, missing padding,
# standard or url-safe alphabet (not mixed). Nothing else.
WHITESPACE = re.compile(r"[ \t\n\r\f\v]+")
STANDARD_BASE64 = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")
URLSAFE_BASE64 = re.compile(r"^[A-Za-z0-9_-]*={0,2}$")


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
    """Small images (the common case) are decoded in place: cheaper than a thread hop. Big ones
    (by pixels, not bytes: a 30 KB PNG can declare 25 Mpx) go to a thread, a few at a time, so
    they never stall the event loop and cannot pile up."""
    try:
        inline = declared_pixels(data) <= INLINE_DECODE_PIXELS
    except ImageProblem:
        inline = True  # not an image: prepare_digit names the problem at once
    if inline:
        return digit_from_bytes(data, max_pixels)
    async with heavy_decodes():
        return await asyncio.to_thread(digit_from_bytes, data, max_pixels)


_heavy: asyncio.Semaphore | None = None


def heavy_decodes() -> asyncio.Semaphore:
    global _heavy
    if _heavy is None:
        _heavy = asyncio.Semaphore(HEAVY_DECODES)
    return _heavy
