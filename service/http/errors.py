"""Error bodies: one shape for every error of the service's own routes.

``{"error": code, "detail": message, "request_id": id}``: routes raise ``ClientError``, the
handlers installed by ``install_error_handlers`` turn it (and FastAPI's own errors: 404, 405,
request validation) into that body; pure-ASGI middlewares use ``json_error`` directly.
"""

from __future__ import annotations

import json
import reprlib
from collections.abc import Mapping

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before its answer began
STATUS_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid_request",
    429: "too_many_requests", 500: "internal_error", 503: "unavailable", 504: "timeout",
    507: "insufficient_storage",
}


_ECHO = reprlib.Repr()
_ECHO.maxstring = _ECHO.maxother = 60


def echo(value: object) -> str:
    """``repr(value)`` shortened (strings, numbers, lists, dicts): what an error message may quote
    of a client's input, so that an error never grows with the request."""
    return _ECHO.repr(value)


class ClientError(HTTPException):
    """A 4xx whose JSON body names the problem: ``{"error": code, "detail": message}``."""

    def __init__(self, status_code: int, code: str, detail: str | list,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(status_code=status_code, detail=detail, headers=dict(headers) if headers else None)
        self.code = code


def error_body(code: str, detail: str | list, request_id: str | None) -> dict:
    return {"error": code, "detail": detail, "request_id": request_id}


def json_error(code: str, detail: str, request_id: str | None = None) -> tuple[list, bytes]:
    """Headers and body of an error for a pure-ASGI middleware (which has no Response)."""
    return json_parts(error_body(code, detail, request_id))


def json_parts(payload: dict) -> tuple[list, bytes]:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return headers, body  # the request-context middleware adds X-Request-ID


MAX_LISTED_ERRORS = 10


def validation_detail(errors: list[dict]) -> list[dict]:
    """Pydantic's errors as ``[{loc, msg, type}]``: where, what, which rule (no input echo); the
    first MAX_LISTED_ERRORS of them, then one entry saying how many more there are."""
    def short(part: object) -> object:  # a dict key or extra field's name is the client's
        return part if isinstance(part, int) else echo(str(part)) if len(str(part)) > 60 else part

    listed = [{"loc": [short(part) for part in err.get("loc", [])],
               "msg": err.get("msg", ""), "type": err.get("type", "")} for err in errors[:MAX_LISTED_ERRORS]]
    if len(errors) > MAX_LISTED_ERRORS:
        listed.append({"loc": [], "msg": f"and {len(errors) - MAX_LISTED_ERRORS:,} more errors", "type": "more_errors"})
    return listed


def error_response(request: Request, status: int, code: str, detail: str | list,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    request_id = request.scope.get("state", {}).get("request_id")
    headers = dict(headers or {})
    if status == 401:
        headers.setdefault("WWW-Authenticate", "Bearer")
    return JSONResponse(error_body(code, detail, request_id), status_code=status, headers=headers or None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = getattr(exc, "code", None) or STATUS_CODES.get(exc.status_code, "error")
        return error_response(request, exc.status_code, code, exc.detail, exc.headers)  # 405 keeps its Allow

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        """The client left while its body was read: nobody reads an answer (the access log says 499)."""
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request, 422, "invalid_request", validation_detail(exc.errors()))
