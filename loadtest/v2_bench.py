"""`make bench`'s V2 section: the Open Inference Protocol, this service against MLServer 1.7.1
and against the compute bound, in one run.

* service: ``python -m service``, default settings (ONNX Runtime in 2 API servers); in the
  binary cases also the same with ``DIGITS_SPLIT_BATCH=0`` (a large batch on one core, as before
  issue 22) and with ``DIGITS_REVIEW_CAPTURE=false`` (what the capture tap costs).
* MLServer 1.7.1 (KServe's Python serving runtime) with the same model.onnx through a custom
  runtime (``loadtest/mlserver_runtime.py``, ONNX Runtime with every core as intra-op threads),
  adaptive batching (max_batch_size 64, max_batch_time 2 ms) and ``parallel_workers: 0``: its
  parallel workers die at start here ("There is no current event loop in thread 'MainThread'"),
  so it serves from one process. It runs from its own venv (``.venv-mlserver``, made by `make
  bench` from ``loadtest/mlserver-requirements.txt``): MLServer pins fastapi<0.116 and
  starlette<0.47, which the service's own pins exclude.
* bound: ONNX Runtime alone on batches of 64, one one-thread session per core, each in its
  own process: what the model can do on this machine with nothing else running.

Cases, all with ``pixels`` UINT8 [n,28,28] (64 different MNIST test digits) and ``probabilities``
out: JSON V2 at 1 and 64 images per request (both servers), V2 with binary tensor data at 64
(the service only: MLServer's REST path has no binary tensor extension) over 1, 4, 16 and 64
keep-alive connections, gRPC at 64 images with 16 calls in flight over 16 channels and over
one. HTTP load is `hey`; gRPC load is a bounded grpc.aio client in this process (ghz needs the
Go module proxy, not reachable here), whose own CPU per request is reported. Every server's
answers are checked (the digits of all 64 images, against ONNX Runtime in this process) before
any load. The runs are interleaved case by case and level by level, best of ``--repeat``, so a
slow spell of a shared machine hits every server alike.

    python -m loadtest.v2_bench [--seconds 5] [--repeat 2]   # starts the service and MLServer
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import resource
import shutil
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil
import requests

import loadtest.hey
from devtools.processes import ROOT, free_port
from devtools.serverctl import ServerProcess, private_registry, running, service
from model.data import IDX_FILES, raw_dir, read_idx
from model.onnx_serving import INPUT_NAME, OUTPUT_NAME, ensure_onnx, ort_session
from model.registry import Registry
from service.v2.protos import grpc_predict_v2_pb2 as pb

BATCH = 64
MLSERVER = ROOT / ".venv-mlserver" / "bin" / "mlserver"
INFER_PATH = "/v2/models/digits/infer"
GRPC_METHOD = "/inference.GRPCInferenceService/ModelInfer"
NO_SPLIT = "service, no split"  # DIGITS_SPLIT_BATCH=0: one core per request, as before issue 22
CAPTURE_OFF = "service, capture off"  # DIGITS_REVIEW_CAPTURE=false: what the capture tap costs (issue 20)


@dataclass
class Row:
    case: str
    server: str
    connections: int  # keep-alive connections or gRPC channels
    in_flight: int  # requests in flight
    images_per_request: int
    rps: float
    images_per_s: float
    p50_ms: float
    p99_ms: float
    failed: int
    server_cores: float = float("nan")  # the server's CPU seconds per second of the run
    level_bound: float = float("nan")  # images/s of the 2-core bound measured in the same level (64-image cases)
    client_cpu_us: float | None = None  # per request, the gRPC client's own CPU (hey's is not counted)


@dataclass(frozen=True)
class Target:
    name: str
    http: str  # base URL
    grpc: str  # host:port
    server: ServerProcess | None = None  # whose processes' CPU is counted

    def cpu_seconds(self) -> float:
        """User + system CPU of the server's processes so far (its main process and every child)."""
        if self.server is None:
            return float("nan")
        total = 0.0
        for process in [psutil.Process(self.server.process.pid), *self.server.descendants()]:
            with contextlib.suppress(psutil.NoSuchProcess):
                times = process.cpu_times()
                total += times.user + times.system
        return total


# ------------------------------------------------------------------ request bodies


def mnist_digits(data_dir: Path, n: int = BATCH) -> np.ndarray:
    return read_idx(raw_dir(data_dir) / IDX_FILES["test_images"])[:n].copy()


def json_body(pixels: np.ndarray) -> bytes:
    return json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": list(pixels.shape),
                                   "data": pixels.reshape(-1).tolist()}],
                       "outputs": [{"name": "probabilities"}]}).encode()


def binary_body(pixels: np.ndarray) -> tuple[bytes, int]:
    """(body, JSON header length): the binary tensor data extension, the answer binary too."""
    header = json.dumps({
        "inputs": [{"name": "pixels", "datatype": "UINT8", "shape": list(pixels.shape),
                    "parameters": {"binary_data_size": pixels.size}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    }).encode()
    return header + pixels.tobytes(), len(header)


def v2_binary_body(png: bytes, n: int) -> tuple[bytes, int]:
    """(body, JSON header length) of a V2 request with ``n`` copies of ``png`` as binary BYTES (make soak's)."""
    blob = b"".join(struct.pack("<I", len(png)) + png for _ in range(n))
    header = json.dumps({
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [n], "parameters": {"binary_data_size": len(blob)}}],
        "outputs": [{"name": "digit", "parameters": {"binary_data": True}}],
    }).encode()
    return header + blob, len(header)


def grpc_request(pixels: np.ndarray) -> bytes:
    request = pb.ModelInferRequest(model_name="digits", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="pixels", datatype="UINT8", shape=list(pixels.shape))],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="probabilities")])
    request.raw_input_contents.append(pixels.tobytes())
    return request.SerializeToString()


def grpc_digits(raw: bytes) -> np.ndarray:
    response = pb.ModelInferResponse.FromString(raw)
    index = [o.name for o in response.outputs].index("probabilities")
    if response.raw_output_contents:
        probabilities = np.frombuffer(response.raw_output_contents[index], dtype="<f4")
    else:
        probabilities = np.asarray(response.outputs[index].contents.fp32_contents, dtype=np.float32)
    return probabilities.reshape(-1, 10).argmax(1)


# ------------------------------------------------------------------ answers checked before any load


def check_answers(target: Target, pixels: np.ndarray, expected: np.ndarray, binary: bool) -> None:
    """The digits of all 64 images over JSON (and binary, and gRPC) equal ONNX Runtime's here."""
    import grpc

    answer = requests.post(target.http + INFER_PATH, data=json_body(pixels),
                           headers={"Content-Type": "application/json"}, timeout=30)
    assert answer.status_code == 200, f"{target.name} JSON: {answer.status_code} {answer.text[:300]}"
    output = next(o for o in answer.json()["outputs"] if o["name"] == "probabilities")
    assert np.array_equal(np.asarray(output["data"]).reshape(-1, 10).argmax(1), expected), f"{target.name} JSON"
    if binary:
        body, length = binary_body(pixels)
        answer = requests.post(target.http + INFER_PATH, data=body, timeout=30, headers={
            "Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(length)})
        assert answer.status_code == 200, f"{target.name} binary: {answer.status_code} {answer.text[:300]}"
        header = int(answer.headers["Inference-Header-Content-Length"])
        got = np.frombuffer(answer.content[header:], dtype="<f4").reshape(-1, 10).argmax(1)
        assert np.array_equal(got, expected), f"{target.name} binary"
    with grpc.insecure_channel(target.grpc) as channel:
        raw = channel.unary_unary(GRPC_METHOD)(grpc_request(pixels), timeout=30)
    assert np.array_equal(grpc_digits(raw), expected), f"{target.name} gRPC"
    print(f"  {target.name}: 200 and the right digits for all {len(pixels)} images (JSON"
          f"{', binary' if binary else ''}, gRPC)", flush=True)


# ------------------------------------------------------------------ load


def hey_row(case: str, target: Target, body: Path, content_type: str, images: int, connections: int,
            seconds: float, headers: dict[str, str] | None = None) -> Row:
    cpu_before, started = target.cpu_seconds(), time.monotonic()
    run = loadtest.hey.post(target.http + INFER_PATH, body, content_type, connections, seconds, headers)
    cores = (target.cpu_seconds() - cpu_before) / (time.monotonic() - started)
    return Row(case, target.name, connections, connections, images, run.rps, run.rps * images, run.p50_ms,
               run.p99_ms, run.failed, server_cores=cores)


async def grpc_load(address: str, request: bytes, expected: np.ndarray, channels: int, in_flight: int,
                    seconds: float) -> tuple[int, int, list[float], float, float]:
    """(answers, failed, latencies in s, elapsed s, this process's CPU s): ``in_flight`` loops over
    ``channels`` HTTP/2 connections, every answer's digits checked."""
    import grpc.aio

    options = [("grpc.max_receive_message_length", 16 << 20)]
    opened = [grpc.aio.insecure_channel(address, options=options) for _ in range(channels)]
    calls = [channel.unary_unary(GRPC_METHOD) for channel in opened]
    latencies: list[float] = []
    failed = 0
    try:
        for call in calls:
            await call(request, timeout=30)  # connected before the clock starts
        deadline = time.monotonic() + seconds

        async def loop(call) -> None:
            nonlocal failed
            while time.monotonic() < deadline:
                started = time.perf_counter()
                try:
                    ok = np.array_equal(grpc_digits(await call(request, timeout=30)), expected)
                except grpc.aio.AioRpcError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - started)
                else:
                    failed += 1

        cpu_before, started = cpu_seconds(), time.monotonic()
        await asyncio.gather(*(loop(calls[i % channels]) for i in range(in_flight)))
        elapsed, cpu = time.monotonic() - started, cpu_seconds() - cpu_before
    finally:
        for channel in opened:
            await channel.close()
    return len(latencies), failed, latencies, elapsed, cpu


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def grpc_row(case: str, target: Target, request: bytes, expected: np.ndarray, channels: int, in_flight: int,
             seconds: float) -> Row:
    server_before, started = target.cpu_seconds(), time.monotonic()
    answers, failed, latencies, elapsed, cpu = asyncio.run(
        grpc_load(target.grpc, request, expected, channels, in_flight, seconds))
    cores = (target.cpu_seconds() - server_before) / (time.monotonic() - started)
    ms = sorted(x * 1e3 for x in latencies) or [float("nan")]
    rps = answers / elapsed
    return Row(case, target.name, channels, in_flight, len(expected), rps, rps * len(expected),
               statistics.median(ms), ms[min(len(ms) - 1, int(len(ms) * 0.99))], failed, server_cores=cores,
               client_cpu_us=cpu / max(1, answers) * 1e6)


def _bound_process(model_path: str, commands) -> None:
    """One one-thread session; for each number of seconds received, batches of 64 for that long, images/s back."""
    session = ort_session(Path(model_path), threads=1)
    pixels = np.random.default_rng(0).integers(0, 256, (BATCH, 28, 28), dtype=np.uint8)
    for _ in range(5):
        session.run([OUTPUT_NAME], {INPUT_NAME: pixels})
    commands.send(0.0)  # loaded
    while (seconds := commands.recv()) > 0:
        done, deadline = 0, time.monotonic() + seconds
        while time.monotonic() < deadline:
            session.run([OUTPUT_NAME], {INPUT_NAME: pixels})
            done += 1
        commands.send(done * BATCH / seconds)


class ComputeBound:
    """ONNX Runtime alone: one one-thread session per core, each in its own process (kept for
    the whole section, so a measurement starts at once), batches of 64, images/s summed."""

    def __init__(self, model_path: Path, processes: int = 2) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipes, self.workers = [], []
        for _ in range(processes):
            mine, theirs = context.Pipe()
            worker = context.Process(target=_bound_process, args=(str(model_path), theirs), daemon=True)
            worker.start()
            self.pipes.append(mine)
            self.workers.append(worker)
        for pipe in self.pipes:
            if not pipe.poll(120):
                raise TimeoutError("the compute-bound processes did not load the model in 120 s")
            pipe.recv()

    def row(self, seconds: float, processes: int | None = None) -> Row:
        pipes = self.pipes[:processes or len(self.pipes)]
        for pipe in pipes:
            pipe.send(seconds)
        total = sum(pipe.recv() for pipe in pipes)
        n = len(pipes)
        return Row("bound", f"ONNX Runtime alone, {n} core{'s' if n > 1 else ''}", n, n, BATCH, total / BATCH,
                   total, float("nan"), float("nan"), 0)

    def close(self) -> None:
        for pipe, worker in zip(self.pipes, self.workers, strict=True):
            pipe.send(0.0)
            worker.join(10)


def crossover(model_path: Path, data_dir: Path, sizes: tuple[int, ...] = (2, 4, 8, 12, 16, 24, 32, 64),
              rounds: int = 5, calls: int = 40) -> list[tuple[int, float, float]]:
    """(batch, us on one thread, us split over two): the API server's session (one thread) alone
    and split by service/inference/cores.py over 2 threads, interleaved, best of ``rounds`` medians."""
    from service.inference.cores import CoreShare
    from service.inference.runtimes import OnnxRuntime

    runtime = OnnxRuntime(model_path, "bench", "bench", threads=1)
    share = CoreShare(Path(tempfile.mkdtemp(prefix="v2-bench-board-")), 0, split_min=2, cores=2)
    pixels = mnist_digits(data_dir, max(sizes))

    def median_us(call, batch: np.ndarray) -> float:
        samples = []
        for _ in range(calls):
            started = time.perf_counter()
            call(batch)
            samples.append(time.perf_counter() - started)
        return statistics.median(samples) * 1e6

    results = []
    for n in sizes:
        batch = pixels[:n]
        single, split = [], []
        for _ in range(rounds):  # interleaved: a slow spell of the machine hits both
            single.append(median_us(runtime.run, batch))
            split.append(median_us(lambda b: share.compute(b, runtime.run), batch))
        results.append((n, min(single), min(split)))
        print(f"  batch {n:>3}: one thread {min(single):8.0f} us, split over 2 {min(split):8.0f} us "
              f"({min(single) / min(split):.2f}x)", flush=True)
    return results


# ------------------------------------------------------------------ MLServer


@contextlib.contextmanager
def mlserver(model_path: Path, log_dir: Path, executable: Path = MLSERVER) -> Iterator[ServerProcess]:
    """MLServer 1.7.1 serving model.onnx as ``digits`` on 127.0.0.1 (settings: see the module doc)."""
    root = Path(tempfile.mkdtemp(prefix="v2-bench-mlserver-"))
    http_port, grpc_port = free_port(), free_port()
    (root / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "http_port": http_port, "grpc_port": grpc_port, "metrics_port": free_port(),
        "parallel_workers": 0, "debug": False}))
    (root / "digits").mkdir()
    (root / "digits" / "model-settings.json").write_text(json.dumps({
        "name": "digits", "implementation": "loadtest.mlserver_runtime.OnnxDigits",
        "max_batch_size": 64, "max_batch_time": 0.002, "parameters": {"uri": str(model_path)}}))
    server = ServerProcess(env={"PYTHONPATH": str(ROOT)}, port=http_port, grpc_port=grpc_port,
                           command=[str(executable), "start", str(root)], ready_path="/v2/health/ready")
    try:
        with running(server, log_dir, timeout=120) as started:
            yield started
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------ the section


def measure(targets: list[Target], model_path: Path, data_dir: Path, work_dir: Path, seconds: float,
            repeat: int) -> list[Row]:
    """Every case on every target, interleaved level by level and run by run; best of ``repeat``."""
    pixels = mnist_digits(data_dir)
    session = ort_session(model_path, threads=1)
    expected = session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0].argmax(1)
    for target in targets:
        check_answers(target, pixels, expected, binary=target.name.startswith("service"))
    json_1, json_64 = work_dir / "v2-json-1.json", work_dir / "v2-json-64.json"
    json_1.write_bytes(json_body(pixels[:1]))
    json_64.write_bytes(json_body(pixels))
    body, header_length = binary_body(pixels)
    binary_64 = work_dir / "v2-binary-64.bin"
    binary_64.write_bytes(body)
    binary_headers = {"Inference-Header-Content-Length": str(header_length)}
    request = grpc_request(pixels)
    services = [t for t in targets if t.name.startswith("service")]

    levels = []  # (label, [one run per target: a function returning a Row])
    peers = [t for t in targets if t.name not in (NO_SPLIT, CAPTURE_OFF)]  # the A/B servers: binary cases only
    for connections in (1, 16):
        levels.append([lambda t=t, c=connections: hey_row("JSON, 1 image", t, json_1, "application/json", 1, c,
                                                          seconds) for t in peers])
        levels.append([lambda t=t, c=connections: hey_row("JSON, 64 images", t, json_64, "application/json",
                                                          BATCH, c, seconds) for t in peers])
    bound = ComputeBound(model_path)
    # the 64-image cases measure the bound in their own level too: their targets are fractions of it
    for connections in (1, 4, 16, 64):
        levels.append([*(lambda t=t, c=connections: hey_row("binary, 64 images", t, binary_64,
                                                            "application/octet-stream", BATCH, c, seconds,
                                                            binary_headers) for t in services),
                       lambda: bound.row(seconds)])
    for channels in (16, 1):
        levels.append([*(lambda t=t, ch=channels: grpc_row("gRPC, 64 images", t, request, expected, ch, 16, seconds)
                         for t in targets if t.name != CAPTURE_OFF), lambda: bound.row(seconds)])
    levels.append([lambda p=p: bound.row(seconds, p) for p in (2, 1)])

    for target in targets:  # warm every server's JSON and gRPC paths first
        hey_row("warm-up", target, json_64, "application/json", BATCH, 8, 2)
        grpc_row("warm-up", target, request, expected, 4, 8, 2)
    rows = []
    for runs in levels:
        best: list[Row | None] = [None] * len(runs)
        failed = [0] * len(runs)
        for _ in range(repeat):
            for i, run in enumerate(runs):
                row = run()
                failed[i] += row.failed
                if best[i] is None or row.images_per_s > best[i].images_per_s:
                    best[i] = row
        if best[-1].case == "bound" and best[0].case != "bound":  # the level's own bound run, last
            level_bound = best.pop().images_per_s
            failed.pop()
            for row in best:
                row.level_bound = level_bound
        for row, fails in zip(best, failed, strict=True):
            row.failed = fails
            rows.append(row)
            print_row(row)
    bound.close()
    return rows


def print_row(row: Row) -> None:
    cpu = f"  server {row.server_cores:.2f} cores"
    cpu += f"  {row.images_per_s / row.level_bound:.0%} of the bound" if row.level_bound == row.level_bound else ""
    cpu += f"  client CPU {row.client_cpu_us:.0f} us/req" if row.client_cpu_us is not None else ""
    print(f"  {row.case:<18} {row.server:<28} conn {row.connections:<3} in flight {row.in_flight:<3} "
          f"{row.rps:8.0f} req/s {row.images_per_s:8.0f} images/s  p50 {row.p50_ms:6.1f} ms  p99 {row.p99_ms:6.1f} ms"
          f"  failed {row.failed}{cpu}", flush=True)


def find(rows: list[Row], case: str, server: str, connections: int) -> Row | None:
    return next((r for r in rows if r.case == case and r.server == server and r.connections == connections), None)


def of_bound(row: Row, rows: list[Row]) -> float:
    """images/s as a fraction of the 2-core bound: the one measured in the row's own level where
    there is one (64-image cases), else the section's."""
    bound = row.level_bound if row.level_bound == row.level_bound else \
        find(rows, "bound", "ONNX Runtime alone, 2 cores", 2).images_per_s
    return row.images_per_s / bound


def print_summary(rows: list[Row]) -> None:
    print(f"\n{'case':<20}{'server':<30}{'conn':>5}{'in flight':>10}{'req/s':>9}{'images/s':>10}{'p50 ms':>8}"
          f"{'p99 ms':>8}{'÷ bound':>8}{'÷ MLServer':>11}{'cores':>6}{'failed':>7}{'client us/req':>14}")
    for r in rows:
        peer = find(rows, r.case, "MLServer 1.7.1", r.connections) if r.server == "service" else None
        ratio = f"{r.images_per_s / peer.images_per_s:.2f}" if peer else ""
        cpu = f"{r.client_cpu_us:.0f}" if r.client_cpu_us is not None else ""
        print(f"{r.case:<20}{r.server:<30}{r.connections:>5}{r.in_flight:>10}{r.rps:>9.0f}{r.images_per_s:>10.0f}"
              f"{r.p50_ms:>8.1f}{r.p99_ms:>8.1f}{of_bound(r, rows):>8.2f}{ratio:>11}"
              f"{r.server_cores:>6.2f}{r.failed:>7}{cpu:>14}")
    checks = []
    for connections in (1, 16):
        row = find(rows, "binary, 64 images", "service", connections)
        checks.append((f"binary 64 images at {connections} connection(s) >= 70 % of the 2-core bound measured "
                       f"beside it ({of_bound(row, rows):.0%})", of_bound(row, rows) >= 0.7))
    one, many = find(rows, "gRPC, 64 images", "service", 1), find(rows, "gRPC, 64 images", "service", 16)
    checks.append((f"one gRPC channel, 16 calls >= 80 % of 16 channels ({one.images_per_s / many.images_per_s:.0%})",
                   one.images_per_s >= 0.8 * many.images_per_s))
    four, sixty_four = find(rows, "binary, 64 images", "service", 4), find(rows, "binary, 64 images", "service", 64)
    checks.append((f"4 keep-alive connections >= 80 % of 64 ({four.images_per_s / sixty_four.images_per_s:.0%})",
                   four.images_per_s >= 0.8 * sixty_four.images_per_s))
    checks.append(("zero failed requests", all(r.failed == 0 for r in rows)))
    for text, met in checks:
        print(f"target {text}: {'met' if met else 'NOT met'}")
    pairs = [(find(rows, "binary, 64 images", "service", c), find(rows, "binary, 64 images", CAPTURE_OFF, c))
             for c in (1, 4, 16, 64)]
    if all(off for _, off in pairs):
        print("capture tap, binary 64 (on ÷ off, images/s): " + ", ".join(
            f"{on.connections} conn {on.images_per_s / off.images_per_s:.2f}" for on, off in pairs))


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bound = find(rows, "bound", "ONNX Runtime alone, 2 cores", 2)
    shown = [r for r in rows if r.case != "bound"]
    labels = [f"{r.case} · {r.server} · {r.connections} {'channels' if r.case.startswith('gRPC') else 'conn'}"
              for r in shown]
    colours = [{"service": "tab:blue", NO_SPLIT: "tab:grey", CAPTURE_OFF: "tab:green"}.get(r.server, "tab:orange")
               for r in shown]
    fig, ax = plt.subplots(figsize=(12, 0.32 * len(shown) + 1.5))
    ax.barh(range(len(shown)), [r.images_per_s for r in shown], color=colours)
    ax.axvline(bound.images_per_s, color="black", linestyle="--", label="bound: ONNX Runtime alone, 2 cores")
    beside = [(i, r.level_bound) for i, r in enumerate(shown) if r.level_bound == r.level_bound]
    ax.scatter([b for _, b in beside], [i for i, _ in beside], marker="|", s=200, color="black",
               label="the bound measured beside it")
    ax.set_yticks(range(len(shown)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="images / s",
           title="Open Inference Protocol: service (blue; grey: without splitting; green: capture off) "
                 "vs MLServer 1.7.1 (orange)")
    ax.legend(loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def section(service_server: ServerProcess, model_path: Path, data_dir: Path, reports: Path, seconds: float,
            repeat: int, mlserver_executable: Path = MLSERVER) -> list[Row]:
    """The V2 section against a service that is already up (default settings, the trainer off).
    Started here: the same service with DIGITS_SPLIT_BATCH=0 (a large batch on one core, as before
    issue 22), and MLServer (skipped, saying so, when its venv is missing)."""
    with contextlib.ExitStack() as stack:
        print("  starting the service with DIGITS_SPLIT_BATCH=0, and with DIGITS_REVIEW_CAPTURE=false ...", flush=True)
        no_split = stack.enter_context(service(free_port(), reports, trainer_enabled="false", split_batch=0,
                                               registry=str(service_server.registry)))
        no_capture = stack.enter_context(service(free_port(), reports, trainer_enabled="false",
                                                 review_capture="false", registry=str(service_server.registry)))
        targets = [Target("service", service_server.url, service_server.grpc_address, service_server),
                   Target(NO_SPLIT, no_split.url, no_split.grpc_address, no_split),
                   Target(CAPTURE_OFF, no_capture.url, no_capture.grpc_address, no_capture)]
        if mlserver_executable.exists():
            print("  starting MLServer 1.7.1 (custom ONNX Runtime runtime, adaptive batching 64 / 2 ms, "
                  "parallel_workers 0) ...", flush=True)
            peer = stack.enter_context(mlserver(model_path, reports, mlserver_executable))
            targets.append(Target("MLServer 1.7.1", peer.url, peer.grpc_address, peer))
        else:
            print(f"  {mlserver_executable} is missing: no MLServer rows (`make bench` makes its venv)", flush=True)
        rows = measure(targets, model_path, data_dir, reports, seconds, repeat)
    print_summary(rows)
    plot(rows, reports / "bench-v2.png")
    (reports / "bench-v2.json").write_text(json.dumps(
        {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": [asdict(r) for r in rows]}, indent=2))
    print(f"saved {reports / 'bench-v2.png'} and {reports / 'bench-v2.json'}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="per run")
    parser.add_argument("--repeat", type=int, default=2, help="runs per level; the best counts")
    parser.add_argument("--registry", type=Path, default=Path("registry"))
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--reports", type=Path, default=ROOT / "reports")
    parser.add_argument("--mlserver", type=Path, default=MLSERVER, help="MLServer's executable")
    parser.add_argument("--crossover", action="store_true",
                        help="only the batch size from which splitting over 2 threads pays (in this process)")
    args = parser.parse_args()
    if args.crossover:
        registry = Registry(args.registry)
        crossover(ensure_onnx(registry, registry.active_version(), args.data_dir), args.data_dir)
        return 0
    if shutil.which("hey") is None:
        print("error: the load generator `hey` is missing; install it with `apt-get install hey`", file=sys.stderr)
        return 2
    args.reports.mkdir(parents=True, exist_ok=True)
    registry = Registry(private_registry(args.registry, Path(tempfile.mkdtemp(prefix="v2-bench-registry-"))))
    try:
        model_path = ensure_onnx(registry, registry.active_version(), args.data_dir)
        print("service (default settings): starting ...", flush=True)
        with service(free_port(), args.reports, trainer_enabled="false", registry=str(registry.root)) as server:
            rows = section(server, model_path, args.data_dir, args.reports, args.seconds, args.repeat, args.mlserver)
    finally:
        shutil.rmtree(registry.root, ignore_errors=True)
    return 1 if any(r.failed for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
