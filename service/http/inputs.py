"""Image bytes -> validated 28x28 digits, in the API-server processes (the bytes come from
:mod:`service.http.bodies`).

Everything a client can get wrong is caught here, before the model sees the request, so a
bad request gets its own 4xx and never fails its neighbours in a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from model.preprocess import ImageProblem, declared_pixels, prepare_digit
from service.http.errors import ClientError

INLINE_DECODE_PIXELS = 256 * 256  # decoded on the event loop up to this size (well under a millisecond)
HEAVY_DECODES = 1  # background processes decoding bigger images, per API server


def digit_from_bytes(data: bytes, max_pixels: int, what: str = "") -> np.ndarray:
    """``prepare_digit``, with its problems as the client errors they are (``what`` names the
    input in the detail, for requests that carry several)."""
    try:
        return prepare_digit(data, max_pixels)
    except ImageProblem as exc:
        raise ClientError(exc.status_code, exc.code, f"{what}: {exc.message}" if what else exc.message) from None


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
