"""Start and stop servers for load tests and benchmarks: in their own process group, stopped
(group and all) when the block ends, also on errors."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent


def private_registry(source: Path, target: Path) -> Path:
    """A copy of the source registry's active version, so a load test's fine-tunes never touch
    the registry people serve from."""
    from model.registry import Registry

    registry = Registry(source)
    version = registry.active_version()
    if version is None:
        raise RuntimeError(f"{source} has no active version; run `make train`")
    shutil.rmtree(target, ignore_errors=True)
    copy = Registry(target)
    shutil.copytree(registry.version_dir(version), copy.version_dir(version))
    (copy.root / "ACTIVE").write_text(f"{version}\n")
    return target


def is_up(url: str, path: str = "/ready") -> bool:
    try:
        return requests.get(url + path, timeout=2).status_code == 200
    except requests.RequestException:
        return False


@contextlib.contextmanager
def server_process(command: list[str], url: str, env: dict[str, str] | None = None, ready_path: str = "/ready",
                   timeout: float = 300.0, log_path: Path | None = None) -> Iterator[subprocess.Popen]:
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed below
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not is_up(url, ready_path):
            if process.poll() is not None:
                raise RuntimeError(f"{' '.join(command)} exited with {process.returncode} (log: {log_path})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not ready after {timeout:.0f} s (log: {log_path})")
            time.sleep(0.3)
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
        if log_path:
            log.close()


def service(port: int, log_path: Path | None = None, **settings: str) -> contextlib.AbstractContextManager:
    env = {f"DIGITS_{k.upper()}": str(v) for k, v in settings.items()}
    env["DIGITS_PORT"] = str(port)
    return server_process([sys.executable, "-m", "service"], f"http://127.0.0.1:{port}", env, log_path=log_path)


def reference(port: int, registry: str, log_path: Path | None = None) -> contextlib.AbstractContextManager:
    command = [sys.executable, "-m", "loadtest.reference_server", "--port", str(port), "--registry", registry]
    return server_process(command, f"http://127.0.0.1:{port}", ready_path="/docs", log_path=log_path)
