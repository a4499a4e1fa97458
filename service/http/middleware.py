"""Pure-ASGI middlewares (cheap per request): request id, metrics and access log; body size cap."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.http.bodies import byte_count
from service.http.errors import CLIENT_CLOSED_REQUEST, json_error, json_parts

access_log = logging.getLogger("digits.access")
VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


class RequestContextMiddleware:
    """Gives every request an id (a client's valid ``X-Request-ID`` is echoed), counts it by
    route and status, times it, and writes one structured log line. A client that went away
    before its answer started (mid-body, or while it was being worked on) counts as 499, not as
    whatever the app then tried to answer: a client cannot inflate the 5xx rate."""

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
        response_started = False

        async def receive_noting_disconnect() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect" and not response_started:
                status_holder[0] = CLIENT_CLOSED_REQUEST
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start" and status_holder[0] != CLIENT_CLOSED_REQUEST:
                response_started = True
                status_holder[0] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive_noting_disconnect, send_with_id)
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


DRAIN_MAX_BYTES = 64 * 1024 * 1024
DRAIN_SECONDS = 5.0


async def drain(receive: Receive, expected: int) -> None:
    """Read and drop (a bounded amount of) the rest of a refused body before answering: a client
    that sends its whole body before reading (urllib and many simple clients) then sees the 413
    instead of a connection reset."""
    budget = min(expected, DRAIN_MAX_BYTES)
    deadline = time.monotonic() + DRAIN_SECONDS
    read = 0
    while read < budget and time.monotonic() < deadline:
        try:
            message = await asyncio.wait_for(receive(), max(0.01, deadline - time.monotonic()))
        except TimeoutError:
            return
        if message["type"] != "http.request":
            return
        read += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


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
        size = None if declared is None else byte_count(declared)
        if size is not None and size > limit:
            await drain(receive, size)
            await self._reject(send, limit, size, request_id, scope["path"])
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
                await drain(receive, DRAIN_MAX_BYTES)
                await self._reject(send, limit, received, request_id, scope["path"])

    @staticmethod
    async def _reject(send: Send, limit: int, size: int, request_id: str | None, path: str) -> None:
        detail = f"the request body is {size:,}+ bytes; the limit is {limit:,}"
        if path.startswith("/v2/"):  # the Open Inference Protocol's error shape
            headers, body = json_parts({"error": detail})
        else:
            headers, body = json_error("payload_too_large", detail, request_id)
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
