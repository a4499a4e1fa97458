"""Pure-ASGI middlewares (cheap per request): request id, metrics and access log; body size cap."""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.errors import json_error

access_log = logging.getLogger("digits.access")
VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


class RequestContextMiddleware:
    """Gives every request an id (a client's valid ``X-Request-ID`` is echoed), counts it by
    route and status, times it, and writes one structured log line."""

    def __init__(self, app: ASGIApp, access_log_enabled: bool = True) -> None:
        self.app = app
        self.access_log_enabled = access_log_enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = header(scope, b"x-request-id")
        request_id = sent if sent and VALID_REQUEST_ID.match(sent) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status_holder = [500]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder[0] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route_path = (scope.get("state", {}).get("route_path") or getattr(scope.get("route"), "path", None)
                          or "unmatched")
            metrics.http_requests.labels(route_path, scope["method"], str(status_holder[0])).inc()
            metrics.http_latency.labels(route_path).observe(elapsed)
            if self.access_log_enabled:
                access_log.info(
                    "request",
                    extra={
                        "request_id": request_id,
                        "method": scope["method"],
                        "path": scope["path"],
                        "status": status_holder[0],
                        "duration_ms": round(elapsed * 1e3, 2),
                    },
                )


class BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """413 with a JSON body for bodies over the limit: by Content-Length before reading, and
    by counting for chunked uploads. Admin uploads (archives) get their own, larger limit."""

    def __init__(self, app: ASGIApp, max_bytes: int, admin_max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.admin_max_bytes = admin_max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.admin_max_bytes if scope["path"].startswith("/admin/") else self.max_bytes
        request_id = scope.get("state", {}).get("request_id")
        declared = header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._reject(send, limit, int(declared), request_id)
            return
        received = 0
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not response_started:
                await self._reject(send, limit, received, request_id)

    @staticmethod
    async def _reject(send: Send, limit: int, size: int, request_id: str | None) -> None:
        headers, body = json_error(
            413, "payload_too_large", f"the request body is {size:,}+ bytes; the limit is {limit:,}", request_id
        )
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
