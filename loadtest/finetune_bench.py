"""`make bench-finetune`: what a fine-tune costs, and what it does to serving latency.

Starts the service with default settings, measures /predict p99 idle, then submits a
500-sample fine-tune (rotated MNIST digits, default options) and measures p99 while it
runs. Prints the fine-tune's wall time (target <= 60 s on 2 cores) and the p99 ratio
(target <= 3x idle).

    python -m loadtest.finetune_bench [--samples 500] [--clients 4]
"""

from __future__ import annotations

import argparse
import io
import secrets
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import requests

from devtools.processes import ROOT
from devtools.serverctl import private_registry, service
from loadtest.bench import hey, multipart_body
from model.data import IDX_FILES, raw_dir, read_idx
from model.preprocess import encode_png

PORT = 8102
URL = f"http://127.0.0.1:{PORT}"


def rotated_upload(data_dir: Path, count: int) -> bytes:
    images = read_idx(raw_dir(data_dir) / IDX_FILES["train_images"])[-count:]
    labels = read_idx(raw_dir(data_dir) / IDX_FILES["train_labels"])[-count:]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            archive.writestr(f"{label}/{i}.png", encode_png(np.rot90(image)))
    return buffer.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each latency measurement")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--registry", type=Path, default=Path("registry"), help="copied; never changed")
    parser.add_argument("--reports", type=Path, default=ROOT / "reports")
    args = parser.parse_args()
    args.reports.mkdir(parents=True, exist_ok=True)
    body = multipart_body(args.reports / "bench-body.bin", args.data_dir)
    token = secrets.token_urlsafe(16)
    upload = rotated_upload(args.data_dir, args.samples)
    print("starting the service with default settings ...", flush=True)
    registry = private_registry(args.registry, args.reports / "bench-finetune-registry")
    with service(PORT, args.reports, admin_token=token, access_log="false",
                 registry=str(registry)):
        hey(f"{URL}/predict", body, args.clients, 2)
        _, _, idle_p99, _, _ = hey(f"{URL}/predict", body, args.clients, args.seconds)
        print(f"idle: p99 {idle_p99:.1f} ms at {args.clients} clients", flush=True)
        auth = {"Authorization": f"Bearer {token}"}
        submitted = time.monotonic()
        job = requests.post(f"{URL}/admin/finetune", headers=auth, files={"archive": ("up.zip", upload)},
                            timeout=120).json()
        _, _, busy_p99, ok, failed = hey(f"{URL}/predict", body, args.clients, args.seconds)
        while (record := requests.get(f"{URL}{job['status_url']}", headers=auth, timeout=10).json())["state"] in (
                "queued", "running"):
            time.sleep(0.2)
        took = time.monotonic() - submitted
    print(f"fine-tune on {args.samples} samples: {record['state']} in {took:.1f} s from submit "
          f"({record['message']})")
    print(f"/predict while it ran: p99 {busy_p99:.1f} ms ({busy_p99 / idle_p99:.2f}x idle), "
          f"{ok} answered, {failed} failed")
    print(f"targets: fine-tune <= 60 s -> {'met' if took <= 60 else 'NOT met'}; "
          f"p99 <= 3x idle -> {'met' if busy_p99 <= 3 * idle_p99 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
