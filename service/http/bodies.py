"""Request bodies -> the bytes and fields they carry: multipart or JSON, decided once by Content-Type,
base64 as people write it; every mistake a 4xx JSON. (Turning image bytes into digits is
:mod:`service.http.inputs`.)"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.types import Receive

from service.http.errors import ClientError, validation_detail

Model = TypeVar("Model", bound=BaseModel)
MAX_PREDICT_PARTS = 16  # a /predict body carries one image; a few more fields are tolerated
DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,", re.IGNORECASE)
# base64 as people produce it: line-wrapped (`base64` without -w0), spaces, missing padding,
# standard or url-safe alphabet (not mixed). Nothing else.
WHITESPACE = re.compile(r"[ \t\n\r\f\v]+")
STANDARD_BASE64 = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")
URLSAFE_BASE64 = re.compile(r"^[A-Za-z0-9_-]*={0,2}$")


def byte_count(text: str) -> int | None:
    """A header's byte count (Content-Length and the like): ASCII digits only, None otherwise
    (``str.isdigit()`` also accepts ``²`` and other digits that ``int()`` refuses)."""
    text = text.strip()
    return int(text) if text.isascii() and text.isdigit() else None


def kind_of(content_type: str) -> str:
    """``multipart/form-data; boundary=x`` -> ``multipart/form-data``."""
    return content_type.split(";")[0].strip().lower()


def media_type(request: Request) -> str:
    return kind_of(request.headers.get("content-type", ""))


def is_json(kind: str) -> bool:
    return kind == "application/json" or kind.endswith("+json")


def parse_json(body: bytes, model: type[Model]) -> Model:
    if not body:
        raise ClientError(422, "empty_body", "the request body is empty; send JSON")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        kinds = {err["type"] for err in exc.errors()}
        code = "malformed_json" if "json_invalid" in kinds else "invalid_fields"
        raise ClientError(422, code, validation_detail(exc.errors(include_input=False))) from None


@dataclass(frozen=True)
class Part:
    """One part of a multipart body: a field (``filename`` None) or a file."""

    name: str
    filename: str | None
    data: bytes


class Form:
    """A multipart body's parts, in order, by the two questions routes ask of them."""

    def __init__(self, parts: list[Part]) -> None:
        self.parts = parts

    def files(self, name: str) -> list[Part]:
        return [part for part in self.parts if part.name == name and part.filename is not None]

    def file(self, name: str) -> Part | None:
        return next(iter(self.files(name)), None)

    def fields(self, name: str) -> list[str]:
        return [part.data.decode("utf-8", errors="replace") for part in self.parts
                if part.name == name and part.filename is None]

    def field(self, name: str) -> str | None:
        return next(iter(self.fields(name)), None)


def multipart_parts(body: bytes, content_type: str, max_parts: int) -> list[Part]:
    """The parts of an in-memory multipart body (python-multipart's low-level parser: no
    temporary files; the body's size is already bounded), at most ``max_parts`` of them (413)."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ClientError(422, "malformed_multipart", "the multipart Content-Type has no boundary")
    parts: list[Part] = []
    chunks: list[bytes] = []
    header_name: list[bytes] = []
    header_value: list[bytes] = []
    disposition: dict[bytes, bytes] = {}

    def on_header_end() -> None:
        if b"".join(header_name).lower() == b"content-disposition":
            disposition.update(parse_options_header(b"".join(header_value))[1])
        header_name.clear()
        header_value.clear()

    def on_part_end() -> None:
        name, filename = disposition.get(b"name"), disposition.get(b"filename")
        if name is not None:
            if len(parts) == max_parts:
                raise ClientError(413, "too_many_parts", f"the multipart body has more than {max_parts:,} parts")
            parts.append(Part(name.decode("utf-8", errors="replace"),
                              filename.decode("utf-8", errors="replace") if filename is not None else None,
                              b"".join(chunks)))
        chunks.clear()
        disposition.clear()

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
    return parts


def multipart_field(body: bytes, content_type: str, field: str) -> bytes | None:
    """The bytes of the first part named ``field`` (a file or not); None when there is none."""
    return next((part.data for part in multipart_parts(body, content_type, MAX_PREDICT_PARTS) if part.name == field),
                None)


async def read_body(request: Request, model: type[Model], *, max_parts: int, expected: str) -> Form | Model:
    """The body as a multipart :class:`Form` or as ``model`` parsed from JSON (``*/*+json`` too);
    415 for any other Content-Type, with ``expected`` (what to send instead) in the detail."""
    kind = media_type(request)
    if kind == "multipart/form-data":
        return Form(multipart_parts(await request.body(), request.headers.get("content-type", ""), max_parts))
    if is_json(kind):
        return parse_json(await request.body(), model)
    raise unsupported(kind, expected)


def unsupported(kind: str, expected: str) -> ClientError:
    """The 415 for a Content-Type the route does not take; ``expected`` says what to send instead."""
    return ClientError(415, "unsupported_media_type",
                       f"Content-Type {kind or '(none)'} is not supported; send {expected}")


async def receive_body(receive: Receive) -> bytes:
    """The whole body of a plain ASGI request (the /predict shortcut, past Starlette's ``Request``)."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionResetError("the client went away")
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


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
