"""Shared fixtures: the prepared MNIST data, the trained base model, and real servers.

`make test` prepares the data and trains the base model before pytest runs; these fixtures
use them read-only and give each test that changes state its own registry copy.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
import torch

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
    """A private registry holding only the source's active version, as v0001 (whatever its
    number in the source), so tests see the same versions on every machine."""
    version = source.active_version()
    assert version is not None
    registry = Registry(target)
    shutil.copytree(source.version_dir(version), registry.version_dir("v0001"))
    manifest = source.get(version).model_copy(update={"version": "v0001", "parent": None, "job_id": None})
    (registry.version_dir("v0001") / "manifest.json").write_text(manifest.model_dump_json(indent=2))
    (registry.root / "ACTIVE").write_text("v0001\n")
    return registry


@pytest.fixture
def registry_copy(base_registry: Registry, tmp_path: Path) -> Registry:
    return copy_registry(base_registry, tmp_path / "registry")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png_of(pixels: torch.Tensor | np.ndarray) -> bytes:
    return encode_png(np.asarray(pixels, dtype=np.uint8))


def zip_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


@dataclass
class ServerProcess:
    """A real `python -m service` in its own process group; stopped (group and all) on exit."""

    registry: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, log_dir: Path, wait_ready: float = 180.0) -> ServerProcess:
        env = {
            **os.environ,
            "DIGITS_PORT": str(self.port),
            "DIGITS_GRPC_PORT": str(self.grpc_port),
            "DIGITS_REGISTRY": str(self.registry),
            "DIGITS_DATA_DIR": str(DATA_DIR),
            "DIGITS_RUNTIME": "onnx",
            "DIGITS_API_SERVERS": "1",
            "DIGITS_LOG_LEVEL": "info",
            **self.env,
        }
        self.log_path = log_dir / f"server-{self.port}.log"
        log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if wait_ready:
            self.wait_ready(wait_ready)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path else ""

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> None:
        """Signal the main process; if anything of the group is left, kill the group."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(10)

    def kill_group(self) -> None:
        """Simulate a crash: SIGKILL every process of the server at once."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator:
    started: list[ServerProcess] = []

    def start(registry: Path, wait_ready: float = 180.0, **env: str) -> ServerProcess:
        server = ServerProcess(Path(registry), env={f"DIGITS_{k.upper()}": str(v) for k, v in env.items()})
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
