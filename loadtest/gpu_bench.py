"""GPU benchmark (CUDA only): the compiled model's images/s against batch size, and the
service's end-to-end req/s with the torch runtime on the GPU. Bounded to a few minutes.

    bash loadtest/gpu_bench.sh            # or: python -m loadtest.gpu_bench

Uses the active registry version when there is one, else freshly initialized weights
(throughput does not depend on the weights). Prints a table; writes reports/gpu_bench.json.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model.nets import build  # noqa: E402
from service.inference.runtimes import ProbabilityHead  # noqa: E402

BATCHES = (1, 8, 64, 256, 1024, 4096)


def load_net() -> tuple[torch.nn.Module, str]:
    try:
        from model.registry import Registry
        from service.settings import Settings

        model, manifest = Registry(Settings().registry).load_model()
        return model, manifest.version
    except Exception as exc:
        print(f"(no registry version: {exc}; using fresh weights)")
        return build("digitnet").eval(), "untrained"


def bench_model() -> list[dict]:
    net, version = load_net()
    device = torch.device("cuda")
    rows = []
    for mode in ("eager", "compiled"):
        head = ProbabilityHead(net).to(device).eval()
        runner = torch.compile(head, dynamic=False) if mode == "compiled" else head
        for batch in BATCHES:
            pixels = torch.randint(0, 256, (batch, 28, 28), dtype=torch.uint8, device=device)
            with torch.inference_mode():
                for _ in range(3):
                    runner(pixels)
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                repeats = 50
                start.record()
                for _ in range(repeats):
                    runner(pixels)
                end.record()
                torch.cuda.synchronize()
            ms = start.elapsed_time(end) / repeats
            rows.append({"mode": mode, "batch": batch, "ms_per_batch": ms, "images_per_s": batch / ms * 1e3,
                         "version": version})
            print(f"{mode:>9} batch {batch:>5}: {ms:8.3f} ms/batch  {batch / ms * 1e3:12,.0f} images/s", flush=True)
    return rows


def bench_service(seconds: float = 20.0, clients: int = 32) -> dict | None:
    """End-to-end: the real service on the GPU, driven by a bounded threaded HTTP client."""
    try:
        import concurrent.futures

        import requests

        from devtools.serverctl import service
        from model.preprocess import encode_png
    except ImportError as exc:
        print(f"(service benchmark skipped: {exc})")
        return None
    png = encode_png(torch.randint(0, 2, (28, 28), dtype=torch.uint8).mul(255).numpy())
    url = "http://127.0.0.1:8103/predict"
    latencies: list[float] = []
    failures = 0
    import tempfile
    from pathlib import Path

    with service(8103, Path(tempfile.mkdtemp()), device="cuda", runtime="torch", access_log="false",
                 trainer_enabled="false",
                 max_batch_size=64, api_servers=max(2, (os.cpu_count() or 4) // 2)):
        deadline = time.monotonic() + seconds

        def client() -> tuple[list[float], int]:
            session, mine, failed = requests.Session(), [], 0
            while time.monotonic() < deadline and len(mine) < 200_000:
                started = time.perf_counter()
                ok = session.post(url, files={"file": ("d.png", png)}, timeout=30).status_code == 200
                mine.append(time.perf_counter() - started)
                failed += not ok
            return mine, failed

        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            for mine, failed in pool.map(lambda _: client(), range(clients)):
                latencies += mine
                failures += failed
    latencies.sort()
    result = {"clients": clients, "seconds": seconds, "requests": len(latencies), "failed": failures,
              "req_per_s": len(latencies) / seconds, "p50_ms": latencies[len(latencies) // 2] * 1e3,
              "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3}
    print(f"service on CUDA: {result['req_per_s']:,.0f} req/s with {clients} clients, p50 {result['p50_ms']:.1f} ms, "
          f"p99 {result['p99_ms']:.1f} ms, {failures} failed")
    return result


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark runs on a GPU machine (see docs/benchmarks.md)")
        return 2
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "model": bench_model(), "service": bench_service()}
    out = Path(os.environ.get("OUT", ROOT / "reports"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_bench.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
