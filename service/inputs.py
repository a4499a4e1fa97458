"""HTTP bodies -> validated 28x28 digits, in the API-server processes.

Everything a client can get wrong is caught here, before the model sees the request, so a
bad request gets its own 4xx and never fails its neighbours in a batch.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re

import numpy as np
from fastapi import HTTPException, Request
from multipart.exceptions import MultipartParseError
from multipart.multipart import MultipartParser, parse_options_header
from PIL import Image
from pydantic import BaseModel, ValidationError
from starlette.formparsers import MultiPartException

from model.preprocess import ImageProblem, prepare_digit
from service.schemas import PredictJSON

INLINE_DECODE_PIXELS = 256 * 256  # decoded on the event loop up to this size (well under a millisecond)
HEAVY_DECODES = 2  # concurrent decodes of bigger images per API server
DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,", re.IGNORECASE)


class ClientError(HTTPException):
    """A 4xx whose JSON body names the problem: ``{"error": code, "detail": message}``."""

    def __init__(self, status_code: int, code: str, detail: str | list) -> None:
        super().__init__(status_code=status_code, detail=detail)
        self.code = code


def validation_detail(exc: ValidationError) -> list[dict]:
    return [
        {"loc": list(err["loc"]), "msg": err["msg"], "type": err["type"]}
        for err in exc.errors(include_url=False, include_context=False, include_input=False)
    ]


def parse_json(body: bytes, model: type[BaseModel]) -> BaseModel:
    if not body:
        raise ClientError(422, "empty_body", "the request body is empty; send JSON")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        kinds = {err["type"] for err in exc.errors()}
        code = "malformed_json" if "json_invalid" in kinds else "invalid_fields"
        raise ClientError(422, code, validation_detail(exc)) from None


def decode_base64(text: str, field: str = "image") -> bytes:
    text = DATA_URL.sub("", text.strip(), count=1)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError(422, "invalid_base64", f"'{field}' is not valid base64") from None


async def read_form(request: Request, max_part_bytes: int, max_files: int = 1000):
    try:
        return await request.form(
            max_files=max_files, max_fields=max_files * 2 + 16, max_part_size=max_part_bytes
        )
    except MultiPartException as exc:
        detail = f"the multipart body could not be parsed: {exc.message}"
        raise ClientError(422, "malformed_multipart", detail) from None


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def multipart_field(body: bytes, content_type: str, field: str) -> bytes | None:
    """The bytes of one field of an in-memory multipart body (python-multipart's low-level
    parser: no temporary files, no UploadFile objects); None when the field is absent."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ClientError(422, "malformed_multipart", "the multipart Content-Type has no boundary")
    found: dict[str, bytes] = {}
    chunks: list[bytes] = []
    header_name: list[bytes] = []
    header_value: list[bytes] = []
    current: list[str | None] = [None]

    def on_header_end() -> None:
        if b"".join(header_name).lower() == b"content-disposition":
            _, options = parse_options_header(b"".join(header_value))
            name = options.get(b"name")
            current[0] = name.decode("latin-1") if name is not None else None
        header_name.clear()
        header_value.clear()

    def on_part_end() -> None:
        if current[0] is not None and current[0] not in found:
            found[current[0]] = b"".join(chunks)
        chunks.clear()
        current[0] = None

    parser = MultipartParser(boundary, {
        "on_part_data": lambda data, start, end: chunks.append(data[start:end]),
        "on_part_end": on_part_end,
        "on_header_field": lambda data, start, end: header_name.append(data[start:end]),
        "on_header_value": lambda data, start, end: header_value.append(data[start:end]),
        "on_header_end": on_header_end,
    })
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise ClientError(422, "malformed_multipart", f"the multipart body could not be parsed: {exc}") from None
    return found.get(field)


def image_bytes(content_type: str, body: bytes) -> bytes:
    """The uploaded image of a /predict body: multipart field ``file`` or JSON ``{"image": base64}``."""
    kind = content_type.split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        data = multipart_field(body, content_type, "file")
        if data is None:
            raise ClientError(422, "missing_file", "the multipart body needs a 'file' field holding the image")
        return data
    if kind == "application/json" or kind.endswith("+json"):
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


def declared_pixels(data: bytes) -> int:
    """width * height from the image header alone (0 when unreadable: prepare_digit then
    names the problem)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Exception:
        return 0
    return width * height


async def digit_from_bytes_async(data: bytes, max_pixels: int) -> np.ndarray:
    """Small images (the common case) are decoded in place: cheaper than a thread hop. Big ones
    (by pixels, not bytes: a 30 KB PNG can declare 25 Mpx) go to a thread, a few at a time, so
    they never stall the event loop and cannot pile up."""
    if declared_pixels(data) <= INLINE_DECODE_PIXELS:
        return digit_from_bytes(data, max_pixels)
    async with heavy_decodes():
        return await asyncio.to_thread(digit_from_bytes, data, max_pixels)


_heavy: asyncio.Semaphore | None = None


def heavy_decodes() -> asyncio.Semaphore:
    global _heavy
    if _heavy is None:
        _heavy = asyncio.Semaphore(HEAVY_DECODES)
    return _heavy
