"""HTTP bodies -> validated 28x28 digits, in the API-server processes.

Everything a client can get wrong is caught here, before the model sees the request, so a
bad request gets its own 4xx and never fails its neighbours in a batch.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ctypes
import multiprocessing
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from model.preprocess import ImageProblem, declared_pixels, prepare_digit
from service.http.bodies import is_json, kind_of, multipart_field, parse_json
from service.http.errors import ClientError
from service.routes.schemas import PredictJSON

INLINE_DECODE_PIXELS = 256 * 256  # decoded on the event loop up to this size (well under a millisecond)
HEAVY_DECODES = 1  # background processes decoding bigger images, per API server
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


PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent dies (Linux)


def _background_decoder(api_server_pid: int) -> None:
    """Each decoder process runs at the lowest priority, and dies with its API server even when
    that is killed outright (its queues would keep it waiting for ever, orphaned)."""
    os.nice(19)
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != api_server_pid:  # it died before prctl took effect
            os._exit(1)


# One per API server, made lazily (after the fork): HEAVY_DECODES processes at nice 19, so big
# decodes neither hold this process's GIL nor take CPU that ordinary requests want.
_heavy_pool: ProcessPoolExecutor | None = None


def heavy_pool() -> ProcessPoolExecutor:
    global _heavy_pool
    if _heavy_pool is None:
        _heavy_pool = ProcessPoolExecutor(HEAVY_DECODES, mp_context=multiprocessing.get_context("spawn"),
                                          initializer=_background_decoder, initargs=(os.getpid(),))
    return _heavy_pool


@contextlib.asynccontextmanager
async def heavy_decoding(app: object) -> AsyncIterator[None]:
    """The API server's lifespan of its decoder processes: stopped with it. (Left to the
    interpreter's exit, a forked API server waits for them for ever: multiprocessing joins its
    children before concurrent.futures tells them to stop.)"""
    global _heavy_pool
    try:
        yield
    finally:
        pool, _heavy_pool = _heavy_pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)


async def digit_from_bytes_async(data: bytes, max_pixels: int) -> np.ndarray:
    """Small images (the common case) are decoded in place: cheaper than a thread hop. Big ones
    (by pixels, not bytes: a 30 KB PNG can declare 25 Mpx) go to a few background-priority
    processes, so they never stall the event loop and only use CPU that ordinary requests leave."""
    try:
        inline = declared_pixels(data) <= INLINE_DECODE_PIXELS
    except ImageProblem:
        inline = True  # not an image: prepare_digit names the problem at once
    if inline:
        return digit_from_bytes(data, max_pixels)
    return await asyncio.get_running_loop().run_in_executor(heavy_pool(), digit_from_bytes, data, max_pixels)
