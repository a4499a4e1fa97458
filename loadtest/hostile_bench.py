"""Big images must not stall the server: /health latency and /predict throughput, alone and
while two clients keep sending a 5000x5000 PNG (about 30 KB: the header, not the bytes, says
it is big). Prints the figures side by side.

    python -m loadtest.hostile_bench [--seconds 8] [--repeat 3]
"""

from __future__ import annotations

import argparse
import io
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from devtools.processes import ROOT
from devtools.serverctl import private_registry, service
from loadtest.bench import BOUNDARY, multipart_body


def huge_png() -> bytes:
    image = np.full((5000, 5000), 255, np.uint8)
    image[1500:3500, 2300:2700] = 0  # a "1"
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def hey(args: list[str]) -> str:
    return subprocess.run(["hey", *args], capture_output=True, text=True, check=True).stdout


def measure(url: str, body: Path, seconds: float) -> tuple[float, float]:
    """(/predict req/s at 8 clients, then /health p99 ms at 2 clients), one after the other."""
    out = hey(["-z", f"{seconds}s", "-c", "8", "-m", "POST", "-T", f"multipart/form-data; boundary={BOUNDARY}",
               "-D", str(body), f"{url}/predict"])
    health = hey(["-z", f"{seconds}s", "-c", "2", f"{url}/health"])
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = float(re.search(r"99%+ in ([\d.]+) secs", health).group(1)) * 1e3
    return rps, p99


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--repeat", type=int, default=3, help="alone / with senders rounds; the best counts")
    parser.add_argument("--registry", type=Path, default=Path("registry"))
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    args = parser.parse_args()
    reports = ROOT / "reports"
    reports.mkdir(exist_ok=True)
    body = multipart_body(reports / "bench-body.bin", args.data_dir)
    big = huge_png()
    registry = private_registry(args.registry, Path(tempfile.mkdtemp(prefix="hostile-registry-")))
    with service(8102, reports, trainer_enabled="false", registry=str(registry)) as server:
        sending, stop, statuses = threading.Event(), threading.Event(), []

        def sender() -> None:
            session = requests.Session()
            while not stop.is_set():
                if sending.wait(0.2):
                    statuses.append(session.post(f"{server.url}/predict", files={"file": ("big.png", big)},
                                                 timeout=60).status_code)

        senders = [threading.Thread(target=sender) for _ in range(2)]
        for thread in senders:
            thread.start()
        quiet, loaded = [], []
        try:
            for _ in range(args.repeat):  # interleaved, so a slow spell of the machine hits both alike
                sending.clear()
                time.sleep(1)  # a big image in flight finishes
                quiet.append(measure(server.url, body, args.seconds))
                sending.set()
                time.sleep(1)
                loaded.append(measure(server.url, body, args.seconds))
                print(f"  alone {quiet[-1][0]:.0f} req/s, /health p99 {quiet[-1][1]:.1f} ms; with senders "
                      f"{loaded[-1][0]:.0f} req/s, /health p99 {loaded[-1][1]:.1f} ms", flush=True)
        finally:
            stop.set()
            for thread in senders:
                thread.join(60)
    quiet_rps, loaded_rps = max(rps for rps, _ in quiet), max(rps for rps, _ in loaded)
    quiet_p99, loaded_p99 = min(p99 for _, p99 in quiet), min(p99 for _, p99 in loaded)
    print(f"big PNG: {len(big):,} bytes declaring 5000x5000; answers while measuring: "
          f"{ {s: statuses.count(s) for s in set(statuses)} }")
    print(f"{'':<26}{'/predict req/s':>16}{'/health p99 ms':>16}")
    print(f"{'alone':<26}{quiet_rps:>16.0f}{quiet_p99:>16.1f}")
    print(f"{'with 2 big-image senders':<26}{loaded_rps:>16.0f}{loaded_p99:>16.1f}")
    print(f"/predict keeps {loaded_rps / quiet_rps:.0%} of its throughput (target >= 80 %); "
          f"/health p99 {loaded_p99:.1f} ms (target < 10 ms); best of {args.repeat} interleaved runs each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
