"""`make bench`: this service against what a user would write instead, side by side in one run.

Same machine, same load generator (hey), same 28x28 MNIST PNG as multipart, same concurrency
levels, best of ``--repeat`` runs per level:

* floor: FastAPI reading the multipart file and answering a constant, 2 uvicorn workers
  (no FastAPI server doing real work can beat it);
* peer: FastAPI + ONNX Runtime (same model.onnx, one thread per process), the preprocessing
  as it was before the serving-path work, 2 uvicorn workers (loadtest/peer_server.py);
* service: ``python -m service`` with default settings, and the same with ``DIGITS_REVIEW_CAPTURE=false``
  (what the capture tap costs; ``--modes`` picks others), then
  the V2 section (``loadtest/v2_bench.py``): the Open Inference Protocol against MLServer 1.7.1
  and the compute bound.

All servers run at once (idle ones cost nothing) and the runs are interleaved, level by level,
so a machine that slows down for a while (a shared VM does) slows every server alike.

Prints req/s, p50 and p99 with ratios to the peer and the floor, checks the targets, and saves
reports/bench.png and reports/bench.json.

    python -m loadtest.bench [--seconds 10] [--repeat 2] [--modes default,worker]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

import loadtest.hey
from devtools.processes import ROOT
from devtools.serverctl import peer, private_registry, service
from loadtest import v2_bench
from model.data import IDX_FILES, raw_dir, read_idx
from model.preprocess import encode_png
from model.registry import Registry

LEVELS = (1, 4, 16, 64)
BOUNDARY = "benchboundary"
MODES = {  # name -> service settings on top of the defaults
    "default": {},
    "capture-off": {"review_capture": "false"},  # the A/B of the capture tap (issue 20: no measurable cost)
    "worker": {"inference": "worker", "runtime": "onnx"},
    "worker-torch": {"inference": "worker", "runtime": "torch"},
}


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
    head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="digit.png"\r\n'
            "Content-Type: image/png\r\n\r\n").encode()
    path.write_bytes(head + encode_png(image) + f"\r\n--{BOUNDARY}--\r\n".encode())
    return path


def check_answers(servers: dict[str, str], body: Path, data_dir: Path) -> None:
    """Every server but the floor (a constant) answers the benchmark's body with 200 and its right digit."""
    label = int(read_idx(raw_dir(data_dir) / IDX_FILES["test_labels"])[0])
    for name, url in servers.items():
        if name == "floor":
            continue
        answer = requests.post(url, data=body.read_bytes(), timeout=30,
                               headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
        if answer.status_code != 200 or answer.json().get("digit") != label:
            raise RuntimeError(f"{name} answered {answer.status_code} {answer.text[:200]} (expected digit {label})")
        print(f"  {name}: 200 and digit {label}, right", flush=True)


def hey(url: str, body: Path, concurrency: int, seconds: float) -> tuple[float, float, float, int, int]:
    run = loadtest.hey.post(url, body, f"multipart/form-data; boundary={BOUNDARY}", concurrency, seconds)
    return run.rps, run.p50_ms, run.p99_ms, run.ok, run.failed


def run_levels(servers: dict[str, str], body: Path, seconds: float, repeat: int) -> list[Result]:
    """Every level on every server, interleaved (level by level, run by run), so that a machine
    that slows down for a while slows all of them alike."""
    for url in servers.values():
        hey(url, body, 8, 2)  # warm every code path first
    results = []
    for level in LEVELS:
        runs: dict[str, list] = {name: [] for name in servers}
        for _ in range(repeat):
            for name, url in servers.items():
                runs[name].append(hey(url, body, level, seconds))
        for name in servers:
            rps, p50, p99, ok, _ = max(runs[name], key=lambda run: run[0])
            failed = sum(run[4] for run in runs[name])
            results.append(Result(name, level, rps, p50, p99, ok, failed))
            print(f"  {name:<18} c={level:<3} {rps:8.0f} req/s  p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  "
                  f"failed {failed}", flush=True)
    return results


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rps_ax, p99_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r.server for r in results):
        rows = [r for r in results if r.server == name]
        rps_ax.plot([r.concurrency for r in rows], [r.rps for r in rows], marker="o", label=name)
        p99_ax.plot([r.concurrency for r in rows], [r.p99_ms for r in rows], marker="o", label=name)
    rps_ax.set(title="throughput (1 MNIST PNG per request)", xlabel="concurrent clients", ylabel="requests / s",
               xscale="log")
    p99_ax.set(title="p99 latency", xlabel="concurrent clients", ylabel="ms", xscale="log", yscale="log")
    for ax in (rps_ax, p99_ax):
        ax.set_xticks(LEVELS, [str(level) for level in LEVELS])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_table(results: list[Result]) -> None:
    by = {(r.server, r.concurrency): r for r in results}
    print(f"\n{'server':<20}{'clients':>8}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'÷ peer':>8}{'÷ floor':>8}"
          f"{'failed':>8}")
    for r in results:
        peer_r, floor_r = by[("peer", r.concurrency)], by[("floor", r.concurrency)]
        print(f"{r.server:<20}{r.concurrency:>8}{r.rps:>9.0f}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}"
              f"{r.rps / peer_r.rps:>8.2f}{r.rps / floor_r.rps:>8.2f}{r.failed:>8}")
    service_r = {c: by[("service", c)] for c in LEVELS if ("service", c) in by}
    if not service_r:
        return
    checks = [(f"{c} clients: >= 1.5x the peer's req/s with p99 no worse",
               service_r[c].rps >= 1.5 * by[("peer", c)].rps and service_r[c].p99_ms <= by[("peer", c)].p99_ms)
              for c in (16, 64)]
    checks.append(("1 client: p50 within 0.3 ms of the peer's",
                   service_r[1].p50_ms <= by[("peer", 1)].p50_ms + 0.3))
    checks.append(("zero non-200 answers", all(r.failed == 0 for r in service_r.values())))
    for text, met in checks:
        print(f"target {text}: {'met' if met else 'NOT met'}")
    off = {c: by[("service (capture-off)", c)] for c in LEVELS if ("service (capture-off)", c) in by}
    if off:
        print("capture tap (on ÷ off, req/s; p99 on vs off): " + ", ".join(
            f"{c} clients {service_r[c].rps / off[c].rps:.2f} ({service_r[c].p99_ms:.1f} vs {off[c].p99_ms:.1f} ms)"
            for c in off))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="per run and concurrency level")
    parser.add_argument("--repeat", type=int, default=3, help="runs per level; the best counts")
    parser.add_argument("--modes", default="default,capture-off", help=f"service settings to run: {','.join(MODES)}")
    parser.add_argument("--v2-seconds", type=float, default=5.0, help="per V2 run (0: skip the V2 section)")
    parser.add_argument("--v2-repeat", type=int, default=2, help="V2 runs per level; the best counts")
    parser.add_argument("--registry", default="registry")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--reports", type=Path, default=ROOT / "reports")
    args = parser.parse_args()
    if shutil.which("hey") is None:
        print("error: the load generator `hey` is missing; install it with `apt-get install hey`", file=sys.stderr)
        return 2
    args.reports.mkdir(parents=True, exist_ok=True)
    body = multipart_body(args.reports / "bench-body.bin", args.data_dir)
    registry = Registry(private_registry(Path(args.registry), Path(tempfile.mkdtemp(prefix="bench-registry-"))))
    from model.onnx_serving import ensure_onnx

    model_path = ensure_onnx(registry, registry.active_version(), args.data_dir)

    with contextlib.ExitStack() as running:
        print("starting the floor (FastAPI reading the multipart file, answering a constant, 2 workers), the peer "
              "(FastAPI + ONNX Runtime, 2 uvicorn workers) and the service ...", flush=True)
        running.enter_context(peer(8201, model_path, args.reports, null=True))
        running.enter_context(peer(8200, model_path, args.reports))
        servers = {"floor": "http://127.0.0.1:8201/predict", "peer": "http://127.0.0.1:8200/predict"}
        default = None
        for port, mode in enumerate(args.modes.split(","), start=8101):
            server = running.enter_context(service(port, args.reports, trainer_enabled="false",
                                                   registry=str(registry.root), **MODES[mode]))
            servers["service" if mode == "default" else f"service ({mode})"] = f"{server.url}/predict"
            default = server if mode == "default" else default
        check_answers(servers, body, args.data_dir)
        results = run_levels(servers, body, args.seconds, args.repeat)
        print_table(results)
        if default is not None and args.v2_seconds:
            print("\nOpen Inference Protocol (V2): the service against MLServer and the compute bound", flush=True)
            v2_bench.section(default, model_path, args.data_dir, args.reports, args.v2_seconds, args.v2_repeat)

    plot(results, args.reports / "bench.png")
    (args.reports / "bench.json").write_text(json.dumps(
        {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "results": [asdict(r) for r in results]}, indent=2))
    print(f"\nsaved {args.reports / 'bench.png'} and {args.reports / 'bench.json'}")
    shutil.rmtree(registry.root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
