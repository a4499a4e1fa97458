"""The response-head holding transport (service.http.protocol): a small response leaves in one
write, and holding never reorders, drops or strands a write."""

from __future__ import annotations

import asyncio

from service.http.protocol import HeadHoldingTransport

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"


class RecordingTransport:
    """The part of a transport HeadHoldingTransport uses, recording every write it passes on."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 8000) if name == "sockname" else default


def run_in_loop(scenario) -> RecordingTransport:
    async def main() -> RecordingTransport:
        real = RecordingTransport()
        await scenario(HeadHoldingTransport(real, asyncio.get_running_loop()), real)
        return real

    return asyncio.run(main())


def test_head_and_body_leave_in_one_write() -> None:
    async def scenario(transport: HeadHoldingTransport, real: RecordingTransport) -> None:
        transport.write(HEAD)
        assert real.writes == []  # held
        transport.write(b"{}")
        assert real.writes == [HEAD + b"{}"]
        transport.write(b"more")  # not a head: straight through
        assert real.writes == [HEAD + b"{}", b"more"]

    run_in_loop(scenario)


def test_a_head_alone_goes_out_at_the_end_of_the_turn() -> None:
    async def scenario(transport: HeadHoldingTransport, real: RecordingTransport) -> None:
        transport.write(HEAD)  # a streaming response: its body comes later
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert real.writes == [HEAD]
        transport.write(b"{}")
        assert real.writes == [HEAD, b"{}"]

    run_in_loop(scenario)


def test_close_sends_what_is_held_first() -> None:
    async def scenario(transport: HeadHoldingTransport, real: RecordingTransport) -> None:
        transport.write(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        transport.close()
        assert real.writes == [b"HTTP/1.1 408 Request Timeout\r\n\r\n"] and real.closed

    run_in_loop(scenario)


def test_everything_else_is_the_real_transports() -> None:
    async def scenario(transport: HeadHoldingTransport, real: RecordingTransport) -> None:
        assert transport.get_extra_info("sockname") == ("127.0.0.1", 8000)
        assert not transport.is_closing()
        transport.close()
        assert transport.is_closing()

    run_in_loop(scenario)
