"""V2 rows of `make bench`: images/s through the Open Inference Protocol (HTTP with binary
tensors, and gRPC) with 1 and 64 images per request, against /predict in the same run.

One asyncio client process drives every row the same way (aiohttp for HTTP, tritonclient's
grpc.aio client for gRPC), with the same number of requests in flight, so the rows compare
the protocols, not the load generators. Every answer is checked (the digit of each image).

    python -m loadtest.v2_bench [--seconds 8] [--concurrency 8]   # starts its own server
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import shutil
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np
import tritonclient.grpc.aio as triton_grpc

from devtools.serverctl import ROOT, private_registry, service
from model.data import IDX_FILES, raw_dir, read_idx
from model.preprocess import encode_png

BATCH_SIZES = (1, 64)


@dataclass
class V2Row:
    route: str
    images_per_request: int
    concurrency: int
    requests_per_s: float
    images_per_s: float
    p50_ms: float
    p99_ms: float
    failed: int


def sample_digit(data_dir: Path) -> tuple[bytes, int]:
    """The first MNIST test digit as a PNG, and its label."""
    images = read_idx(raw_dir(data_dir) / IDX_FILES["test_images"])
    labels = read_idx(raw_dir(data_dir) / IDX_FILES["test_labels"])
    return encode_png(images[0]), int(labels[0])


def v2_binary_body(png: bytes, n: int) -> tuple[bytes, int]:
    """(body, JSON header length) of a V2 request with ``n`` copies of ``png`` as binary BYTES."""
    blob = b"".join(struct.pack("<I", len(png)) + png for _ in range(n))
    header = json.dumps({
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [n], "parameters": {"binary_data_size": len(blob)}}],
        "outputs": [{"name": "digit", "parameters": {"binary_data": True}}],
    }).encode()
    return header + blob, len(header)


async def measure(route: str, n: int, send: Callable[[], Awaitable[bool]], concurrency: int,
                  seconds: float) -> V2Row:
    """``concurrency`` loops calling ``send`` (True: a right answer) for ``seconds``."""
    latencies: list[float] = []
    failed = 0
    deadline = time.monotonic() + seconds

    async def loop() -> None:
        nonlocal failed
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                ok = await send()
            except Exception:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - started)
            else:
                failed += 1

    started = time.monotonic()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    ms = sorted(x * 1e3 for x in latencies) or [float("nan")]
    rps = len(latencies) / elapsed
    return V2Row(route, n, concurrency, rps, rps * n, statistics.median(ms), ms[min(len(ms) - 1, int(len(ms) * 0.99))],
                 failed)


async def measure_all(http_url: str, grpc_address: str, png: bytes, label: int, concurrency: int,
                      seconds: float) -> list[V2Row]:
    """The /predict row, then HTTP-binary and gRPC with 1 and 64 images per request."""
    rows = []
    limits = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=limits, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def predict() -> bool:
            form = aiohttp.FormData()
            form.add_field("file", png, filename="digit.png", content_type="image/png")
            async with session.post(f"{http_url}/predict", data=form) as response:
                return response.status == 200 and (await response.json())["digit"] == label

        rows.append(await measure("/predict", 1, predict, concurrency, seconds))
        for n in BATCH_SIZES:
            body, header_length = v2_binary_body(png, n)
            headers = {"Inference-Header-Content-Length": str(header_length)}

            async def v2_http(body: bytes = body, headers: dict = headers, n: int = n) -> bool:
                async with session.post(f"{http_url}/v2/models/digits/infer", data=body, headers=headers) as response:
                    content = await response.read()
                    length = int(response.headers.get("Inference-Header-Content-Length", len(content)))
                    digits = np.frombuffer(content[length:], dtype="<i8")
                    return response.status == 200 and len(digits) == n and bool((digits == label).all())

            rows.append(await measure("V2 HTTP binary", n, v2_http, concurrency, seconds))

    # one channel (one HTTP/2 connection) per request in flight, as aiohttp keeps one connection
    # per request in flight: the API servers share the port per connection (SO_REUSEPORT)
    clients = [triton_grpc.InferenceServerClient(grpc_address) for _ in range(concurrency)]
    next_client = itertools.cycle(clients)
    try:
        for n in BATCH_SIZES:
            tensor = triton_grpc.InferInput("image", [n], "BYTES")
            tensor.set_data_from_numpy(np.array([png] * n, dtype=object))
            outputs = [triton_grpc.InferRequestedOutput("digit")]

            async def v2_grpc(tensor=tensor, outputs=outputs, n: int = n) -> bool:
                digits = (await next(next_client).infer("digits", [tensor], outputs=outputs)).as_numpy("digit")
                return len(digits) == n and bool((digits == label).all())

            rows.append(await measure("V2 gRPC", n, v2_grpc, concurrency, seconds))
    finally:
        for client in clients:
            await client.close()
    return rows


def v2_rows(http_url: str, grpc_address: str, data_dir: Path, concurrency: int = 8,
            seconds: float = 8.0) -> list[V2Row]:
    """For `make bench`: run against a service that is already up."""
    png, label = sample_digit(data_dir)
    return asyncio.run(measure_all(http_url, grpc_address, png, label, concurrency, seconds))


def print_rows(rows: list[V2Row]) -> None:
    baseline = next(r.images_per_s for r in rows if r.route == "/predict")
    print(f"{'route':<16}{'images/req':>11}{'clients':>8}{'req/s':>9}{'images/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'x /predict':>11}{'failed':>8}")
    for r in rows:
        print(f"{r.route:<16}{r.images_per_request:>11}{r.concurrency:>8}{r.requests_per_s:>9.0f}"
              f"{r.images_per_s:>10.0f}{r.p50_ms:>9.1f}{r.p99_ms:>9.1f}{r.images_per_s / baseline:>11.2f}{r.failed:>8}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="per row")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--registry", type=Path, default=Path("registry"))
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--reports", type=Path, default=ROOT / "reports")
    args = parser.parse_args()
    args.reports.mkdir(parents=True, exist_ok=True)
    registry = private_registry(args.registry, Path(tempfile.mkdtemp(prefix="v2-bench-registry-")))
    print("service (default settings): starting ...", flush=True)
    try:
        with service(8102, args.reports, access_log="false", trainer_enabled="false", registry=str(registry)) as server:
            rows = v2_rows(server.url, server.grpc_address, args.data_dir, args.concurrency, args.seconds)
    finally:
        shutil.rmtree(registry, ignore_errors=True)
    print_rows(rows)
    return 1 if any(r.failed for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
