"""uvicorn's HTTP protocol (httptools) with a deadline for reading each request.

uvicorn times out idle keep-alive connections but not a request that is being read: a client
that connects and sends nothing, or stops halfway through its headers or body, would hold a
connection for ever. Here every request must arrive whole within ``read_timeout`` seconds of
its connection (or of its first byte, on a kept-alive connection), or it gets a 408 JSON
answer and the connection is closed.
"""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def timed_protocol(read_timeout: float) -> type[HttpToolsProtocol]:
    class TimedHttpToolsProtocol(HttpToolsProtocol):
        _read_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._read_deadline is None:
                self._read_deadline = self.loop.call_later(read_timeout, self._too_slow)

        def _disarm(self) -> None:
            if self._read_deadline is not None:
                self._read_deadline.cancel()
                self._read_deadline = None

        def _too_slow(self) -> None:
            self._read_deadline = None
            if self.transport.is_closing():
                return
            if self.cycle is None or not self.cycle.response_started:
                body = json.dumps({"error": "request_timeout", "detail": f"the request was not received whole "
                                   f"within {read_timeout:g} s", "request_id": None}).encode()
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                     b"connection: close\r\ncontent-length: " + str(len(body)).encode()
                                     + b"\r\n\r\n" + body)
            self.transport.close()

    return TimedHttpToolsProtocol
