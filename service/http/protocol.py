"""uvicorn's HTTP protocol (httptools) with deadlines for reading each request, a bound on the
connections of each client address, JSON for what the HTTP parser refuses, and one socket
write per small response.

uvicorn times out idle keep-alive connections but not a request that is being read: a client
that connects and sends nothing, or stops halfway through its headers or body, would hold a
connection for ever. Here a new connection must send its first byte within
``first_byte_timeout`` seconds (short: an idle connection costs a slot and nothing else), and
every request must arrive whole within ``read_timeout`` seconds of its first byte, or it gets a
408 JSON answer and the connection is closed.

Each API server holds at most ``max_connections`` connections and, once half of them are
taken, at most ``max_per_client`` from one client address, so that one client cannot take them all. A connection over
either bound is not counted: its request gets a 503 JSON answer (and it is closed), or it is
closed at its first-byte deadline if it sends nothing.

uvicorn writes a response's head and its body separately, two send() calls; on loopback each
costs as much as the receiver's whole TCP processing. :class:`HeadHoldingTransport` holds the
head until the body follows (in the same turn of the event loop, as a plain response's does),
so a small response leaves in one segment: this cut the service's CPU per prediction by ~10 %.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service import metrics
from service.http.errors import error_body, json_parts
from service.settings import Settings

STATUS_LINE_START = b"HTTP/1.1 "


class HeadHoldingTransport:
    """A transport that holds a response head (a write starting with a status line) until the
    next write, a close, or the end of this turn of the event loop, whichever comes first; every
    other write goes straight through. Holding any write that way only delays it, never reorders
    or drops it, so mistaking a body for a head costs nothing but the wait for the next turn."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport, self._loop = transport, loop
        self._held: bytes | None = None
        self.is_closing, self.pause_reading, self.resume_reading = (
            transport.is_closing, transport.pause_reading, transport.resume_reading)

    def write(self, data: bytes) -> None:
        if self._held is not None:
            data, self._held = self._held + data, None
        elif data.startswith(STATUS_LINE_START):
            self._held = data
            self._loop.call_soon(self.flush)
            return
        self._transport.write(data)

    def flush(self) -> None:
        if self._held is not None:
            data, self._held = self._held, None
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:  # everything else is the real transport's
        return getattr(self._transport, name)


class ConnectionBudget:
    """The connections one API server holds: at most ``total``; once half of them are taken, at most
    ``per_client`` from one address. So one address can never crowd the others out, yet a busy but
    harmless client (a script holding its responses, one proxy) is not refused on an idle server."""

    def __init__(self, total: int, per_client: int) -> None:
        self.total, self.per_client = total, per_client
        self.held = 0
        self.by_client: Counter[str] = Counter()  # only addresses holding connections: bounded by total

    def take(self, client: str) -> str | None:
        """None when the connection is admitted (``release`` it when it closes), else why not."""
        if self.held >= self.total:
            return f"the server holds its {self.total:,} connections (DIGITS_MAX_CONNECTIONS); retry shortly"
        if self.by_client[client] >= self.per_client and self.held >= self.total // 2:
            return (f"your address holds {self.by_client[client]:,} connections to this server, more than "
                    f"DIGITS_MAX_CONNECTIONS_PER_CLIENT={self.per_client:,} while it is busy; reuse them or close some")
        self.held += 1
        self.by_client[client] += 1
        return None

    def release(self, client: str) -> None:
        self.held -= 1
        self.by_client[client] -= 1
        if not self.by_client[client]:
            del self.by_client[client]


def refusal(detail: str) -> ASGIApp:
    """The answer to a request on a connection over the bounds: 503 JSON, then the connection closes."""
    headers, body = json_parts(error_body("unavailable", detail, None))
    headers += [(b"retry-after", b"1"), (b"connection", b"close")]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def timed_protocol(settings: Settings) -> type[HttpToolsProtocol]:
    """The protocol class for uvicorn's ``http`` option; one budget per process that uses it."""
    read_timeout = settings.read_timeout
    first_byte_timeout = min(settings.first_byte_timeout, read_timeout)
    budget = ConnectionBudget(settings.max_connections, settings.max_connections_per_client)

    class TimedHttpToolsProtocol(HttpToolsProtocol):
        _read_deadline: asyncio.TimerHandle | None = None
        _awaiting_first_byte = True
        _refused: str | None = None
        _address = ""

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(HeadHoldingTransport(transport, self.loop))  # type: ignore[arg-type]
            self._address = self.client[0] if self.client else ""
            self._refused = budget.take(self._address)
            if self._refused is not None:
                metrics.connections_refused.inc()
            self._arm(first_byte_timeout)

        def data_received(self, data: bytes) -> None:
            if self._awaiting_first_byte:  # from now on, the request has read_timeout to arrive whole
                self._awaiting_first_byte = False
                self._disarm()
                self._arm(read_timeout)
            super().data_received(data)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm(read_timeout)

        def on_headers_complete(self) -> None:
            if self._refused is not None:
                self.app = refusal(self._refused)  # this connection's app only
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._refused is None:
                budget.release(self._address)
            super().connection_lost(exc)

        def _arm(self, seconds: float) -> None:
            if self._read_deadline is None:
                self._read_deadline = self.loop.call_later(seconds, self._too_slow)

        def _disarm(self) -> None:
            if self._read_deadline is not None:
                self._read_deadline.cancel()
                self._read_deadline = None

        def _too_slow(self) -> None:
            self._read_deadline = None
            if self.transport.is_closing():
                return
            if self._awaiting_first_byte:
                self._answer_and_close(b"408 Request Timeout", "request_timeout",
                                       f"no request arrived within {first_byte_timeout:g} s of connecting")
            elif self.cycle is None or not self.cycle.response_started:
                self._answer_and_close(b"408 Request Timeout", "request_timeout",
                                       f"the request was not received whole within {read_timeout:g} s")
            else:
                self.transport.close()

        def send_400_response(self, msg: str) -> None:
            """What the HTTP parser refuses (bad header bytes, a broken request line): JSON too."""
            self._answer_and_close(b"400 Bad Request", "bad_request", f"the HTTP request could not be parsed: {msg}")

        def _answer_and_close(self, status: bytes, code: str, detail: str) -> None:
            headers, body = json_parts(error_body(code, detail, None))
            head = b"".join(name + b": " + value + b"\r\n" for name, value in [*headers, (b"connection", b"close")])
            self.transport.write(b"HTTP/1.1 " + status + b"\r\n" + head + b"\r\n" + body)
            self.transport.close()

    return TimedHttpToolsProtocol
