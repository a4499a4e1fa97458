"""`make bench`: this service (each runtime) against the naive reference server, side by side.

Same machine, same load generator (hey), same PNG, same concurrency levels, in one run.
Prints req/s, p50 and p99 with ratios to the reference, the batch-size histogram the
service reported, and a 60 s soak at concurrency 64; saves reports/bench.png and bench.json.

    python -m loadtest.bench [--seconds 10] [--runtimes onnx,torch] [--soak 60]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

from loadtest.serverctl import ROOT, reference, service
from model.data import IDX_FILES, raw_dir, read_idx
from model.preprocess import encode_png

LEVELS = (1, 4, 16, 64)
BOUNDARY = "benchboundary"


@dataclass
class Result:
    server: str
    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float
    ok: int
    failed: int


def multipart_body(path: Path, data_dir: Path) -> Path:
    image = read_idx(raw_dir(data_dir) / IDX_FILES["test_images"])[0]
    png = encode_png(image)
    head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="digit.png"\r\n'
            "Content-Type: image/png\r\n\r\n").encode()
    path.write_bytes(head + png + f"\r\n--{BOUNDARY}--\r\n".encode())
    return path


def hey(url: str, body: Path, concurrency: int, seconds: float) -> tuple[float, float, float, int, int]:
    command = ["hey", "-z", f"{seconds}s", "-c", str(concurrency), "-m", "POST", "-t", "30",
               "-T", f"multipart/form-data; boundary={BOUNDARY}", "-D", str(body), url]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout

    def number(pattern: str) -> float:
        match = re.search(pattern, out)
        return float(match.group(1)) if match else float("nan")

    statuses = {int(code): int(n) for code, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)}
    _, _, error_section = out.partition("Error distribution:")
    errors = sum(int(n) for n in re.findall(r"^\s*\[(\d+)\]", error_section, flags=re.MULTILINE))
    ok = statuses.get(200, 0)
    failed = sum(n for code, n in statuses.items() if code != 200) + errors
    return number(r"Requests/sec:\s+([\d.]+)"), number(r"50%+ in ([\d.]+) secs") * 1e3, \
        number(r"99%+ in ([\d.]+) secs") * 1e3, ok, failed


def run_levels(name: str, url: str, body: Path, seconds: float) -> list[Result]:
    hey(url, body, 8, 2)  # warm every code path first
    results = []
    for level in LEVELS:
        rps, p50, p99, ok, failed = hey(url, body, level, seconds)
        results.append(Result(name, level, rps, p50, p99, ok, failed))
        print(f"  {name:<22} c={level:<3} {rps:8.0f} req/s  p50 {p50:6.1f} ms  p99 {p99:6.1f} ms  "
              f"failed {failed}", flush=True)
    return results


def batch_histogram(metrics_text: str) -> dict[str, float]:
    buckets = {}
    for le, value in re.findall(r'digits_batch_size_bucket\{le="([^"]+)"\} ([\d.e+]+)', metrics_text):
        buckets[le] = float(value)
    return buckets


def print_batch_histogram(before: dict[str, float], after: dict[str, float]) -> None:
    previous = 0.0
    print("  batch sizes during the run (from /metrics, digits_batch_size):")
    total = after.get("+Inf", 0) - before.get("+Inf", 0)
    for le, value in after.items():
        cumulative = value - before.get(le, 0.0)
        count = cumulative - previous
        previous = cumulative
        if count:
            print(f"    <= {le:>5}: {count:8.0f} batches ({count / max(total, 1):6.1%})")


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rps_ax, p99_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r.server for r in results):
        rows = [r for r in results if r.server == name]
        rps_ax.plot([r.concurrency for r in rows], [r.rps for r in rows], marker="o", label=name)
        p99_ax.plot([r.concurrency for r in rows], [r.p99_ms for r in rows], marker="o", label=name)
    rps_ax.set(title="throughput", xlabel="concurrent clients", ylabel="requests / s", xscale="log")
    p99_ax.set(title="p99 latency", xlabel="concurrent clients", ylabel="ms", xscale="log", yscale="log")
    for ax in (rps_ax, p99_ax):
        ax.set_xticks(LEVELS, [str(level) for level in LEVELS])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="per concurrency level")
    parser.add_argument("--runtimes", default="onnx,torch")
    parser.add_argument("--soak", type=float, default=60.0, help="seconds at concurrency 64 (0: skip)")
    parser.add_argument("--registry", default="registry")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--reports", type=Path, default=ROOT / "reports")
    args = parser.parse_args()
    if shutil.which("hey") is None:
        print("error: the load generator `hey` is missing; install it with `apt-get install hey`", file=sys.stderr)
        return 2
    args.reports.mkdir(parents=True, exist_ok=True)
    body = multipart_body(args.reports / "bench-body.bin", args.data_dir)
    results: list[Result] = []

    print("reference server (FastAPI, one process, eager torch, one image per request):", flush=True)
    with reference(8100, args.registry, log_path=args.reports / "bench-reference.log"):
        results += run_levels("reference", "http://127.0.0.1:8100/predict", body, args.seconds)

    for runtime in args.runtimes.split(","):
        name = f"service ({runtime})"
        print(f"{name}: starting (torch.compile warm-up takes a minute) ...", flush=True)
        with service(8101, log_path=args.reports / f"bench-{runtime}.log", runtime=runtime, access_log="false",
                     trainer_enabled="false", registry=args.registry):
            before = batch_histogram(requests.get("http://127.0.0.1:8101/metrics", timeout=10).text)
            results += run_levels(name, "http://127.0.0.1:8101/predict", body, args.seconds)
            after = batch_histogram(requests.get("http://127.0.0.1:8101/metrics", timeout=10).text)
            print_batch_histogram(before, after)
            if args.soak and runtime == args.runtimes.split(",")[0]:
                print(f"  soak: {args.soak:.0f} s at concurrency 64 ...", flush=True)
                rps, p50, p99, ok, failed = hey("http://127.0.0.1:8101/predict", body, 64, args.soak)
                print(f"  soak: {ok} answered, {failed} failed, {rps:.0f} req/s, p99 {p99:.1f} ms", flush=True)
                results.append(Result(f"{name} soak", 64, rps, p50, p99, ok, failed))

    baseline = {r.concurrency: r for r in results if r.server == "reference"}
    print(f"\n{'server':<24}{'clients':>8}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'x req/s':>9}{'x p99':>8}"
          f"{'failed':>8}")
    for r in results:
        ref = baseline[r.concurrency]
        print(f"{r.server:<24}{r.concurrency:>8}{r.rps:>9.0f}{r.p50_ms:>9.1f}{r.p99_ms:>9.1f}"
              f"{r.rps / ref.rps:>9.2f}{r.p99_ms / ref.p99_ms:>8.2f}{r.failed:>8}")
    for r in results:
        if r.concurrency == 16 and r.server.startswith("service") and "soak" not in r.server:
            ref = baseline[16]
            met = r.rps >= 1.5 * ref.rps and r.p99_ms <= ref.p99_ms
            print(f"target at 16 clients, {r.server}: {r.rps / ref.rps:.2f}x throughput, p99 "
                  f"{r.p99_ms:.1f} vs {ref.p99_ms:.1f} ms -> {'met' if met else 'NOT met'}")
    plot([r for r in results if "soak" not in r.server], args.reports / "bench.png")
    (args.reports / "bench.json").write_text(json.dumps(
        {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "results": [asdict(r) for r in results]}, indent=2))
    print(f"\nsaved {args.reports / 'bench.png'} and {args.reports / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
