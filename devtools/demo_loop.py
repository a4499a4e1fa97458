"""`make demo-loop`: from traffic alone to a promoted version that reads a new style of digit.

The style: MNIST test digits struck through by a horizontal bar (dark on white), which the base
model reads poorly (69 % here). A real server on a private copy of the registry gets them as /predict
traffic beside ordinary MNIST digits; the capture tap puts the unsure ones in the review queue;
a scripted reviewer leases and labels them (with MNIST's true labels, found by the 28x28 digit
the model saw); one call fine-tunes on the reviewed items; the gate decides; then the same
server reads a separate set of struck digits again. Exit 0 when the promoted version reads
the style at least ``--min-gain`` points better, no slice is worse beyond chance (the gate's
table) and it all took at most ``--budget`` seconds.

    python -m devtools.demo_loop [--traffic 600] [--evaluate 300] [--budget 180]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import requests
from PIL import Image

from devtools.serverctl import ServerProcess, private_registry, settings_env
from model import data
from model.preprocess import encode_png, prepare_digit

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "demo-loop-admin-token"
EVALUATE_FROM = 9000  # evaluation digits come from MNIST test indices 9000.., traffic from 0..


def struck(digit: np.ndarray) -> bytes:
    """The new style: an MNIST digit struck through by a horizontal bar at its ink's mean height,
    wider than the digit, dark ink on white, a 112x112 PNG."""
    ink = cv2.resize(digit, (112, 112), interpolation=cv2.INTER_CUBIC)
    rows, columns = np.nonzero(ink > 100)
    height = int(rows.mean())
    cv2.line(ink, (int(columns.min()) - 10, height), (int(columns.max()) + 10, height), 255, 7)
    return encode_png(255 - ink)


def fingerprint(pixels: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()).hexdigest()


@dataclass
class Figures:
    before: float
    after: float
    traffic: int
    captured: int
    labelled: int
    job_state: str
    version: str | None
    worse_slices: list[str]
    slices: dict
    seconds: float
    message: str

    @property
    def gain_points(self) -> float:
        return 100 * (self.after - self.before)


class Client:
    def __init__(self, url: str) -> None:
        self.url, self.session = url, requests.Session()
        self.admin = {"Authorization": f"Bearer {TOKEN}"}

    def predict(self, png: bytes) -> dict:
        response = self.session.post(f"{self.url}/predict", files={"file": ("d.png", png, "image/png")}, timeout=30)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: dict | None = None) -> requests.Response:
        return self.session.post(f"{self.url}{path}", json=body, headers=self.admin, timeout=60)

    def get(self, path: str) -> dict | list:
        response = self.session.get(f"{self.url}{path}", headers=self.admin, timeout=60)
        response.raise_for_status()
        return response.json()


def predict_all(url: str, pngs: list[bytes]) -> list[dict]:
    """/predict's answers to ``pngs``, from 4 clients at once."""
    def one(png: bytes) -> dict:
        return Client(url).predict(png)

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, pngs))


def accuracy(url: str, pngs: list[bytes], labels: np.ndarray) -> tuple[float, set[str]]:
    """Share of ``pngs`` /predict reads right, and the versions that answered."""
    answers = predict_all(url, pngs)
    right = np.array([a["digit"] for a in answers]) == labels
    return float(right.mean()), {a["model_version"] for a in answers}


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.25) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    return predicate()


def seen_pixels(item: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["image_png"]))))


def review_all(client: Client, truth: dict[str, int]) -> int:
    """The scripted reviewer: lease everything, label what it knows (MNIST's label), discard the rest."""
    labelled = 0
    for _ in range(1000):  # bounded: each round leases up to 200 items
        lease = client.post("/admin/review/lease", {"count": 200, "reviewer": "demo"}).json()
        if not lease["items"]:
            break
        for item in lease["items"]:
            label = truth.get(fingerprint(seen_pixels(item)))
            path = f"/admin/review/items/{item['item_id']}"
            if label is None:
                client.post(f"{path}/discard", {"token": lease["token"]}).raise_for_status()
            else:
                client.post(f"{path}/label", {"token": lease["token"], "label": label}).raise_for_status()
                labelled += 1
    return labelled


def style_sets(data_dir: Path, traffic: int, evaluate: int, mnist_share: float, seed: int = 0):
    """(traffic PNGs with their labels, evaluation PNGs with theirs): struck digits from MNIST test
    indices 0.. (and plain MNIST PNGs, ``mnist_share`` of the traffic), evaluation from 9000.."""
    images, labels = (t.numpy() for t in data.load_split(data_dir, train=False))
    rng = np.random.default_rng(seed)
    sent = [(struck(images[i]), int(labels[i])) for i in range(traffic)]
    plain = rng.choice(np.arange(traffic, EVALUATE_FROM), round(traffic * mnist_share), replace=False)
    sent += [(encode_png(images[i]), int(labels[i])) for i in plain]
    order = rng.permutation(len(sent))
    sent = [sent[i] for i in order]
    held = range(EVALUATE_FROM, EVALUATE_FROM + evaluate)
    return sent, ([struck(images[i]) for i in held], labels[EVALUATE_FROM:EVALUATE_FROM + evaluate])


# Twice as much replayed MNIST as reviewed digits: with the default (as much), the struck style learnt
# alone cost the tall slice a few points, at the gate's edge (once in CI: 89.5 -> 86.75 %, rejected).
DEMO_OPTIONS = {"replay_ratio": 2.0}

def run(workdir: Path, data_dir: Path, source_registry: Path, traffic: int = 600, evaluate: int = 300,
        mnist_share: float = 0.25, log: Callable[[str], None] = print,
        finetune_options: dict | None = None) -> Figures:
    """The whole loop on a private registry under ``workdir``; the server is stopped at the end."""
    started = time.monotonic()
    sent, (eval_pngs, eval_labels) = style_sets(data_dir, traffic, evaluate, mnist_share)
    truth = {fingerprint(prepare_digit(png)): label for png, label in sent}
    registry = private_registry(source_registry, workdir / "registry")
    # the demo sends in seconds what traffic would bring in minutes: no capture rate bound here
    server = ServerProcess(env=settings_env(registry=registry, data_dir=data_dir, runtime="onnx", api_servers=1,
                                            admin_token=TOKEN, log_level="warning", review_max_per_second=100_000))
    server.start(workdir, wait_ready=120)
    try:
        client = Client(server.url)
        before, _ = accuracy(server.url, eval_pngs, eval_labels)
        log(f"{time.monotonic() - started:5.1f} s  base model reads the struck style: {before:.1%}")
        predict_all(server.url, [png for png, _ in sent])
        captured = wait_for(lambda: _settled(client), 20)
        log(f"{time.monotonic() - started:5.1f} s  {len(sent)} predictions sent; {captured} captured for review")
        labelled = review_all(client, truth)
        log(f"{time.monotonic() - started:5.1f} s  the reviewer labelled {labelled}")
        response = client.post("/admin/review/finetune", finetune_options or DEMO_OPTIONS)
        response.raise_for_status()
        job_id = response.json()["job_id"]
        job = wait_for(lambda: (j := client.get(f"/admin/jobs/{job_id}"))["state"] not in ("queued", "running")
                       and j, 150, interval=0.5)
        log(f"{time.monotonic() - started:5.1f} s  job {job_id}: {job['state']}: {job['message']}")
        version = job.get("produced_version")
        if version:
            wait_for(lambda: requests.get(f"{server.url}/ready", timeout=5).json().get("model_version") == version, 20)
        after, versions = accuracy(server.url, eval_pngs, eval_labels)
        log(f"{time.monotonic() - started:5.1f} s  /predict ({', '.join(sorted(versions))}) reads it: {after:.1%}")
        slices = job.get("metrics_after", {}).get("slices", {})
        return Figures(before=before, after=after, traffic=len(sent), captured=captured, labelled=labelled,
                       job_state=job["state"], version=version,
                       worse_slices=[name for name, row in slices.items() if row["worse"]], slices=slices,
                       seconds=round(time.monotonic() - started, 1), message=job["message"])
    finally:
        server.stop()


def _settled(client: Client) -> int | None:
    """The queue's item count once the capture thread has written what it had (unchanged for a beat)."""
    first = client.get("/admin/review")["items"]
    time.sleep(0.6)
    second = client.get("/admin/review")["items"]
    return second if second == first and second else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traffic", type=int, default=600, help="struck digits sent as traffic")
    parser.add_argument("--evaluate", type=int, default=300, help="struck digits read before and after")
    parser.add_argument("--budget", type=float, default=180.0, help="seconds the whole run may take")
    parser.add_argument("--min-gain", type=float, default=5.0, help="points the style must gain")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="demo-loop-") as workdir:
        figures = run(Path(workdir), Path(os.environ.get("DIGITS_DATA_DIR", ROOT / "data")).resolve(),
                      Path(os.environ.get("DIGITS_REGISTRY", ROOT / "registry")).resolve(),
                      args.traffic, args.evaluate)
    print(json.dumps(figures.__dict__ | {"gain_points": round(figures.gain_points, 2)}, indent=2, default=str))
    ok = (figures.job_state == "succeeded" and figures.gain_points >= args.min_gain and not figures.worse_slices
          and figures.seconds <= args.budget)
    print("demo-loop:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
