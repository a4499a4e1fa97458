"""Connections a hostile or naive client makes: slow or stalled requests time out with a 408,
and a body over the limit gets its 413 even from clients that send everything before reading."""

from __future__ import annotations

import contextlib
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from devtools.serverctl import ServerProcess
from tests.conftest import copy_registry, service_process, wait_until


@pytest.fixture(scope="module")
def server(base_registry, tmp_path_factory) -> ServerProcess:
    root = tmp_path_factory.mktemp("connections")
    registry = copy_registry(base_registry, root / "registry")
    proc = service_process(registry.root, read_timeout=1.0, max_body_bytes=1024 * 1024, trainer_enabled="false")
    proc.start(root)
    yield proc
    proc.stop()


def answer_of(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("sent", [b"", b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Le",
                                  b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                  b"Content-Length: 100\r\n\r\n{\"image\": "],
                         ids=["nothing", "partial_headers", "partial_body"])
def test_a_stalled_request_times_out(server: ServerProcess, sent: bytes) -> None:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(sent)
        reply = answer_of(sock)
    assert time.monotonic() - started < 4.0  # closed after the 1 s read timeout, not held open
    if not sent.endswith(b"\r\n\r\n{\"image\": "):  # before the app has the request: a 408 JSON
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and json.loads(body)["error"] == "request_timeout"


@pytest.mark.parametrize("sent", [b"GET /health HTTP/1.1\r\nHost: x\r\nX-Bad\x01: y\r\n\r\n",
                                  b"GET /he alth HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"],
                         ids=["control_byte_in_a_header", "space_in_the_path", "tls_hello"])
def test_what_the_http_parser_refuses_gets_a_json_400(server: ServerProcess, sent: bytes) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(sent)
        reply = answer_of(sock)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head.lower(), reply
    assert json.loads(body)["error"] == "bad_request"


def test_urllib_sending_the_whole_body_first_gets_the_413(server: ServerProcess) -> None:
    request = urllib.request.Request(f"{server.url}/predict", data=b"0" * (3 * 1024 * 1024),
                                     headers={"Content-Type": "application/json"}, method="POST")
    for _ in range(5):
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=30)
        assert caught.value.code == 413 and json.loads(caught.value.read())["error"] == "payload_too_large"


def test_the_server_keeps_serving_after_slow_clients(server: ServerProcess) -> None:
    import requests

    assert requests.get(f"{server.url}/health", timeout=5).status_code == 200


# ------------------------------------------------------------------ bounds per client address

PER_CLIENT, TOTAL = 4, 12


@pytest.fixture(scope="module")
def bounded(base_registry, tmp_path_factory) -> ServerProcess:
    root = tmp_path_factory.mktemp("bounded")
    registry = copy_registry(base_registry, root / "registry")
    proc = service_process(registry.root, max_connections=TOTAL, max_connections_per_client=PER_CLIENT,
                           first_byte_timeout=0.5, read_timeout=8, trainer_enabled="false")
    proc.start(root)
    yield proc
    proc.stop()


def connect_from(server: ServerProcess, address: str, first: bytes = b"G") -> socket.socket:
    """A connection from another loopback address (all of 127/8 is this machine), holding
    ``first`` sent: past the first-byte deadline, stalled in its request."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5, source_address=(address, 0))
    sock.sendall(first)
    return sock


def health_from(server: ServerProcess, address: str) -> tuple[int, bytes, bytes]:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5, source_address=(address, 0)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        head, _, body = answer_of(sock).partition(b"\r\n\r\n")
    return int(head.split()[1]), head.lower(), body


@contextlib.contextmanager
def holding(server: ServerProcess, addresses: list[str]) -> Iterator[list[socket.socket]]:
    """A stalled connection from each of ``addresses`` (more may be added to the list); on exit
    all are closed, and waited for until the server has let every address in again, so that no
    test sees the connections of the one before."""
    held = [connect_from(server, address) for address in addresses]
    try:
        yield held
    finally:
        for sock in held:
            sock.close()
        for address in {"127.0.0.1", *addresses}:
            assert wait_until(lambda a=address: health_from(server, a)[0] == 200, 5, interval=0.05), address


def test_one_address_cannot_take_every_connection(bounded: ServerProcess) -> None:
    with holding(bounded, ["127.0.0.2"] * (3 * TOTAL)):  # three times the server's cap
        # once the server has taken them in, the greedy address is over its bound ...
        assert wait_until(lambda: health_from(bounded, "127.0.0.2")[0] == 503, 5, interval=0.05)
        status, head, body = health_from(bounded, "127.0.0.2")  # ... and is told so in JSON
        assert status == 503 and b"content-type: application/json" in head and b"retry-after: 1" in head
        assert json.loads(body)["error"] == "unavailable"
        assert "DIGITS_MAX_CONNECTIONS_PER_CLIENT" in json.loads(body)["detail"]
        # it holds at most half of the cap (TOTAL // 2), so everyone else still gets in
        assert [health_from(bounded, "127.0.0.1")[0] for _ in range(20)] == [200] * 20


def test_an_idle_server_lets_one_address_hold_more_than_its_share(bounded: ServerProcess) -> None:
    with holding(bounded, ["127.0.0.6"] * (TOTAL // 2 - 1)) as held:  # more than PER_CLIENT
        assert health_from(bounded, "127.0.0.6")[0] == 200  # e.g. a script holding its responses
        held += [connect_from(bounded, "127.0.0.6") for _ in range(2)]  # now half the cap is taken
        assert wait_until(lambda: health_from(bounded, "127.0.0.6")[0] == 503, 5, interval=0.05)
        assert health_from(bounded, "127.0.0.1")[0] == 200


def test_over_the_server_cap_the_answer_is_a_json_503(bounded: ServerProcess) -> None:
    addresses = [f"127.0.0.{3 + i}" for i in range(TOTAL // PER_CLIENT)]
    with holding(bounded, [address for address in addresses for _ in range(PER_CLIENT)]):
        assert wait_until(lambda: health_from(bounded, "127.0.0.1")[0] == 503, 5, interval=0.05)
        status, head, body = health_from(bounded, "127.0.0.1")
        assert status == 503 and b"content-type: application/json" in head, (head, body)
        assert "DIGITS_MAX_CONNECTIONS" in json.loads(body)["detail"]


def test_a_silent_connection_goes_long_before_a_slow_body(bounded: ServerProcess) -> None:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", bounded.port)) as sock:
        head, _, body = answer_of(sock).partition(b"\r\n\r\n")
    assert time.monotonic() - started < 2.5  # DIGITS_FIRST_BYTE_TIMEOUT=0.5, not DIGITS_READ_TIMEOUT=8
    assert head.startswith(b"HTTP/1.1 408") and json.loads(body)["error"] == "request_timeout"
    with socket.create_connection(("127.0.0.1", bounded.port)) as sock:  # a slow body has its 8 s
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: 13\r\n\r\n{\"image\"")
        time.sleep(2.0)
        sock.sendall(b": \"\"}")
        head = answer_of(sock).partition(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 422"), head
