"""Real servers for tests, load tests and benchmarks (started, waited for, stopped group and all,
also on errors), and private registries to run them on."""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from devtools.processes import Child, free_port, is_up
from model.registry import Registry


def private_registry(source: Path, target: Path, version: str | None = None) -> Path:
    """A new registry at ``target`` holding one version of ``source`` as v0001 (default: the
    base model `make train` published), so runs never touch the registry people serve from and
    never depend on what is active there."""
    registry = Registry(source)
    version = version or registry.base_version()
    if version is None:
        raise RuntimeError(f"{source} has no trained model; run `make train`")
    shutil.rmtree(target, ignore_errors=True)
    Registry(target).import_version(registry, version)
    return target


@dataclass
class ServerProcess(Child):
    """A real server (``python -m service`` unless ``command`` says otherwise) in its own process group."""

    name: str = "server"
    command: list[str] = field(default_factory=lambda: [sys.executable, "-m", "service"])
    port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)  # the service's Open Inference Protocol over gRPC
    ready_path: str = "/ready"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def registry(self) -> Path:
        return Path(self.env["DIGITS_REGISTRY"])

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, log_dir: Path, wait_ready: float = 180.0) -> ServerProcess:
        self.env = {"DIGITS_PORT": str(self.port), "DIGITS_GRPC_PORT": str(self.grpc_port), **self.env}
        self.log_path = log_dir / f"server-{self.port}.log"
        self.spawn()
        if wait_ready:
            self.wait_ready(wait_ready)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
            if is_up(self.url, self.ready_path):
                return
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log_tail()}")

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []


def settings_env(**settings: object) -> dict[str, str]:
    return {f"DIGITS_{name.upper()}": str(value) for name, value in settings.items()}


@contextlib.contextmanager
def running(server: ServerProcess, log_dir: Path, timeout: float = 300.0) -> Iterator[ServerProcess]:
    try:
        yield server.start(log_dir, timeout)
    finally:
        server.stop()


def service(port: int, log_dir: Path, **settings: object) -> contextlib.AbstractContextManager[ServerProcess]:
    return running(ServerProcess(env=settings_env(**settings), port=port), log_dir)


def peer(port: int, model_path: Path, log_dir: Path, null: bool = False,
         ) -> contextlib.AbstractContextManager[ServerProcess]:
    command = [sys.executable, "-m", "loadtest.peer_server", "--port", str(port), "--model", str(model_path)]
    return running(ServerProcess(port=port, command=[*command, "--null"] if null else command, ready_path="/docs"),
                   log_dir)
