"""Shared fixtures: the prepared MNIST data, the trained base model, and real servers.

`make test` prepares the data and trains the base model before pytest runs; these fixtures
use them read-only and give each test that changes state its own registry copy.
"""

from __future__ import annotations

import io
import json
import os
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
import torch

from devtools.serverctl import ServerProcess, private_registry, settings_env
from model import data
from model.preprocess import encode_png
from model.registry import Registry

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("DIGITS_DATA_DIR", ROOT / "data")).resolve()
BASE_REGISTRY = Path(os.environ.get("DIGITS_REGISTRY", ROOT / "registry")).resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not data.is_prepared(DATA_DIR):
        pytest.fail(f"MNIST is not prepared under {DATA_DIR}: run `make data` (make test does it)")
    return DATA_DIR


@pytest.fixture(scope="session")
def mnist_test(data_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    return data.load_split(data_dir, train=False)


@pytest.fixture(scope="session")
def mnist_train(data_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    return data.load_split(data_dir, train=True)


@pytest.fixture(scope="session")
def base_registry() -> Registry:
    registry = Registry(BASE_REGISTRY)
    if registry.active_version() is None:
        pytest.fail(f"{BASE_REGISTRY} has no trained model: run `make train` (make test does it)")
    return registry


def copy_registry(source: Registry, target: Path) -> Registry:
    """A private registry holding the source's base model as v0001, so tests see the same
    versions on every machine, whatever is active in the developer's registry."""
    return Registry(private_registry(source.root, target))


@pytest.fixture
def registry_copy(base_registry: Registry, tmp_path: Path) -> Registry:
    return copy_registry(base_registry, tmp_path / "registry")


def png_of(pixels: torch.Tensor | np.ndarray) -> bytes:
    return encode_png(np.asarray(pixels, dtype=np.uint8))


def large_png(pixels: torch.Tensor | np.ndarray) -> bytes:
    """A 2,800 x 2,800 scan of a digit: decoded in the API server's background decoder process."""
    return png_of(np.kron(np.asarray(pixels, np.uint8), np.ones((100, 100), np.uint8)))


def access_line(server: ServerProcess, request_id: str) -> dict | None:
    """The server's access-log line of one request (its JSON), or None."""
    for line in server.log().splitlines():
        if line.startswith("{") and f'"request_id":"{request_id}"' in line and '"digits.access"' in line:
            return json.loads(line)
    return None


def zip_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def service_process(registry: Path, command: list[str] | None = None, **settings: object) -> ServerProcess:
    """A `python -m service` (or ``command``) on ``registry`` with the tests' defaults: ONNX Runtime,
    one API server."""
    env = settings_env(registry=Path(registry), data_dir=DATA_DIR, runtime="onnx", api_servers=1, log_level="info")
    env.update(settings_env(**settings))
    return ServerProcess(env=env, command=command) if command else ServerProcess(env=env)


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator:
    """start_server(registry, wait_ready=180, command=None, **settings) -> a running ServerProcess,
    stopped (with all its processes) after the test."""
    started: list[ServerProcess] = []

    def start(registry: Path, wait_ready: float = 180.0, command: list[str] | None = None,
              **settings: object) -> ServerProcess:
        server = service_process(registry, command, **settings)
        started.append(server)
        return server.start(tmp_path, wait_ready)

    yield start
    for server in started:
        server.stop()


def still_running(processes: list[psutil.Process], grace: float = 10.0) -> list[str]:
    """The processes (as 'pid name') still running after a grace period; zombies count as gone
    (multiprocessing's resource tracker, for one, exits a moment after its parent)."""
    def running() -> list[str]:
        names = []
        for process in processes:
            try:
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    names.append(f"{process.pid} {' '.join(process.cmdline())}")
            except psutil.NoSuchProcess:
                continue
        return names

    wait_until(lambda: running() == [], grace, interval=0.1)
    return running()


def post_png(url: str, png: bytes, timeout: float = 30.0, **kwargs) -> requests.Response:
    return requests.post(f"{url}/predict", files={"file": ("digit.png", png, "image/png")}, timeout=timeout, **kwargs)


def wait_until(predicate, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def serves_everywhere(url: str, version: str, timeout: float = 10.0) -> bool:
    """True once /ready says every model holder of the server serves ``version``. Never judge by
    one /predict answer: each comes from one holder, and the others may still be swapping."""
    def converged() -> bool:
        try:
            body = requests.get(f"{url}/ready", timeout=5).json()
        except (requests.RequestException, ValueError):
            return False
        return bool(body.get("converged")) and body.get("model_version") == version

    return bool(wait_until(converged, timeout, interval=0.05))
