"""Soak: minutes of mixed traffic, and every server process's memory over time.

Predictions (multipart PNGs), V2 binary batches of 64, large images (a 2500x2500 photo-sized
PNG), feedback posts, one fine-tune a third of the way in and an activation swap two thirds in,
all from a few bounded client threads against one real server on 127.0.0.1. Every few seconds
it samples the resident memory (RSS) of each process of the server; at the end it prints each
process's series and its slope over the second half of the run (the first half includes
warm-up: caches, lazily built graphs, first large-image decodes).

    python -m loadtest.soak [--minutes 5]     # at most 10 minutes
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import requests
from PIL import Image

from devtools.processes import ROOT
from devtools.serverctl import private_registry, service
from loadtest.v2_bench import v2_binary_body
from model.data import IDX_FILES, raw_dir, read_idx
from model.preprocess import encode_png

TOKEN = "soak-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MB = 1024 * 1024


@dataclass
class Traffic:
    """What every client thread answered, by kind and status."""

    statuses: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, status: int | str) -> None:
        with self.lock:
            self.statuses[(kind, status)] += 1


def large_png() -> bytes:
    """A dark '7' on grey paper with noise, 2500x2500: decoded in the big-image process."""
    rng = np.random.default_rng(0)
    page = rng.normal(190, 12, (2500, 2500)).clip(0, 255).astype(np.uint8)
    page[700:820, 800:1800] = 30
    for row in range(820, 1900):
        column = 1800 - (row - 820) * 0.6
        page[row, int(column) - 60:int(column) + 60] = 30
    buffer = io.BytesIO()
    Image.fromarray(page).save(buffer, format="PNG")
    return buffer.getvalue()


def client(kind: str, send, traffic: Traffic, stop: threading.Event, pause: float) -> None:
    session = requests.Session()
    while not stop.is_set():
        try:
            traffic.record(kind, send(session).status_code)
        except requests.RequestException as exc:
            traffic.record(kind, type(exc).__name__)
        stop.wait(pause)


def logged_pids(log: str) -> dict[int, str]:
    """{pid: role} of the processes the server's log names: API servers and the trainer."""
    roles = {}
    for line in log.splitlines():
        if '"API server ' in line and "started (pid" in line:
            roles[json.loads(line)["pid"]] = "API server"
        elif '"trainer ready' in line:
            roles[json.loads(line)["pid"]] = "trainer"
    return roles


def role_of(process: psutil.Process, roles: dict[int, str]) -> str:
    """Logged roles first; an API server's children decode big images; the rest are LitServe's
    (manager, the inference worker it always starts) or multiprocessing's resource tracker."""
    if process.pid in roles:
        return roles[process.pid]
    if roles.get(process.ppid()) == "API server":
        return "image decoder"
    return "resource tracker" if "resource_tracker" in " ".join(process.cmdline()) else "LitServe process"


def rss_by_process(root: psutil.Process, roles: dict[int, str]) -> dict[int, tuple[str, float]]:
    """{pid: (role, RSS MB)} of the server's main process and every descendant."""
    sizes = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            role = "main" if process.pid == root.pid else role_of(process, roles)
            sizes[process.pid] = (role, process.memory_info().rss / MB)
        except psutil.NoSuchProcess:
            continue
    return sizes


def slope_mb_per_minute(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) over the second half of the samples."""
    half = samples[len(samples) // 2:]
    if len(half) < 3:
        return float("nan")
    t, mb = np.array(half).T
    return float(np.polyfit(t / 60, mb, 1)[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--sample-seconds", type=float, default=5.0)
    parser.add_argument("--registry", type=Path, default=Path("registry"))
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    args = parser.parse_args()
    minutes = min(args.minutes, 10.0)
    images = read_idx(raw_dir(args.data_dir) / IDX_FILES["test_images"])[:200]
    labels = read_idx(raw_dir(args.data_dir) / IDX_FILES["test_labels"])[:200]
    pngs = [encode_png(image) for image in images]
    v2_body, v2_header = v2_binary_body(pngs[0], 64)
    big = large_png()
    reports = ROOT / "reports"
    reports.mkdir(exist_ok=True)
    registry = private_registry(args.registry, Path(tempfile.mkdtemp(prefix="soak-registry-")))
    traffic, stop = Traffic(), threading.Event()
    with service(8103, reports, registry=str(registry), admin_token=TOKEN, api_servers=2, feedback_rate=50,
                 feedback_burst=50, access_log="false") as server:
        counter = iter(range(10**9))

        def predict(session: requests.Session) -> requests.Response:
            png = pngs[next(counter) % len(pngs)]
            return session.post(f"{server.url}/predict", files={"file": ("d.png", png, "image/png")}, timeout=30)

        def v2_batch(session: requests.Session) -> requests.Response:
            return session.post(f"{server.url}/v2/models/digits/infer", data=v2_body, timeout=30,
                                headers={"Inference-Header-Content-Length": str(v2_header),
                                         "Content-Type": "application/octet-stream"})

        def large(session: requests.Session) -> requests.Response:
            return session.post(f"{server.url}/predict", files={"file": ("big.png", big, "image/png")}, timeout=60)

        def feedback(session: requests.Session) -> requests.Response:
            i = next(counter) % len(pngs)
            return session.post(f"{server.url}/feedback", timeout=30,
                                json={"image": base64.b64encode(pngs[i]).decode(), "label": int(labels[i])})

        kinds = [("predict", predict, 0.0), ("predict", predict, 0.0), ("v2 batch of 64", v2_batch, 0.05),
                 ("large image", large, 1.0), ("feedback", feedback, 0.5)]
        threads = [threading.Thread(target=client, args=(kind, send, traffic, stop, pause), daemon=True)
                   for kind, send, pause in kinds]
        for thread in threads:
            thread.start()
        root = psutil.Process(server.process.pid)
        series: dict[int, list[tuple[float, float]]] = {}
        labels_of: dict[int, str] = {}
        events: list[str] = []
        started = time.monotonic()
        duration = minutes * 60
        finetuned = swapped = False
        try:
            while (elapsed := time.monotonic() - started) < duration:
                for pid, (label, mb) in rss_by_process(root, logged_pids(server.log_tail(10**7))).items():
                    series.setdefault(pid, []).append((elapsed, mb))
                    labels_of[pid] = label
                if not finetuned and elapsed > duration / 3:
                    samples = [{"image": base64.b64encode(pngs[i]).decode(), "label": int(labels[i])}
                               for i in range(100)]
                    response = requests.post(f"{server.url}/admin/finetune", headers=AUTH, timeout=60,
                                             json={"samples": samples, "epochs": 1})
                    events.append(f"{elapsed:5.0f} s  fine-tune submitted: {response.status_code}")
                    finetuned = True
                if not swapped and elapsed > 2 * duration / 3:
                    response = requests.post(f"{server.url}/admin/models/v0001/activate", headers=AUTH, timeout=60)
                    events.append(f"{elapsed:5.0f} s  activate v0001: {response.status_code} {response.json()}")
                    swapped = True
                time.sleep(args.sample_seconds)
        finally:
            stop.set()
            for thread in threads:
                thread.join(90)
    print(f"soak: {minutes:.1f} min of mixed traffic, RSS sampled every {args.sample_seconds:.0f} s")
    for line in events:
        print(" ", line)
    print("answers:", ", ".join(f"{kind} {status}: {count}" for (kind, status), count in sorted(
        traffic.statuses.items(), key=str)))
    print("RSS MB per minute:")
    for pid, samples in sorted(series.items()):
        per_minute = [mb for t, mb in samples if int(t // 60) != int((t - args.sample_seconds) // 60) or t == 0]
        print(f"{pid:>8} {labels_of[pid]:<18}" + " ".join(f"{mb:6.0f}" for mb in per_minute))
    print(f"{'pid':>8} {'process':<18}{'first MB':>10}{'peak MB':>10}{'last MB':>10}{'slope MB/min (2nd half)':>26}")
    for pid, samples in sorted(series.items()):
        mbs = [mb for _, mb in samples]
        print(f"{pid:>8} {labels_of[pid]:<18}{mbs[0]:>10.0f}{max(mbs):>10.0f}{mbs[-1]:>10.0f}"
              f"{slope_mb_per_minute(samples):>26.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
