"""Request bodies: multipart or JSON, decided once by Content-Type, every mistake a 4xx JSON."""

from __future__ import annotations

from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException

from service.errors import ClientError, validation_detail

Model = TypeVar("Model", bound=BaseModel)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def parse_json(body: bytes, model: type[Model]) -> Model:
    if not body:
        raise ClientError(422, "empty_body", "the request body is empty; send JSON")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        kinds = {err["type"] for err in exc.errors()}
        code = "malformed_json" if "json_invalid" in kinds else "invalid_fields"
        raise ClientError(422, code, validation_detail(exc.errors(include_input=False))) from None


async def read_form(request: Request, max_part_bytes: int, max_files: int = 1000) -> FormData:
    try:
        return await request.form(
            max_files=max_files, max_fields=max_files * 2 + 16, max_part_size=max_part_bytes
        )
    except MultiPartException as exc:
        detail = f"the multipart body could not be parsed: {exc.message}"
        raise ClientError(422, "malformed_multipart", detail) from None


async def read_body(request: Request, model: type[Model], *, max_part_bytes: int, max_files: int,
                    expected: str) -> FormData | Model:
    """The body as multipart ``FormData`` or as ``model`` parsed from JSON (``*/*+json`` too);
    415 for any other Content-Type, with ``expected`` (what to send instead) in the detail."""
    kind = media_type(request)
    if kind == "multipart/form-data":
        return await read_form(request, max_part_bytes, max_files)
    if kind == "application/json" or kind.endswith("+json"):
        return parse_json(await request.body(), model)
    raise ClientError(415, "unsupported_media_type",
                      f"Content-Type {kind or '(none)'} is not supported; send {expected}")
