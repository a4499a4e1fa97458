"""Child processes for tests, benchmarks and the local topology: each in its own process group,
so stopping one stops its whole tree; and the two probes everything waits with."""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent


def free_port(preferred: int = 0) -> int:
    """``preferred`` when it is free on 127.0.0.1, else any free port."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_up(url: str, path: str = "/ready", timeout: float = 2.0) -> bool:
    """Whether ``url + path`` answers 200 now."""
    try:
        return requests.get(url + path, timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


@dataclass
class Child:
    """One process in its own process group (its whole tree is stopped together), logging to a file."""

    name: str = ""
    command: list[str] = field(default_factory=list)
    log_path: Path | None = None
    env: dict[str, str] = field(default_factory=dict)  # on top of this process's environment
    user: pwd.struct_passwd | None = None  # run as this user (the topology, started as root, drops to nobody)
    process: subprocess.Popen | None = None

    def spawn(self) -> None:
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                self.command, cwd=ROOT, env={**os.environ, **self.env}, stdout=log_file,
                stderr=subprocess.STDOUT, start_new_session=True,
                user=self.user.pw_uid if self.user else None, group=self.user.pw_gid if self.user else None,
                extra_groups=[] if self.user else None,
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> None:
        """``sig`` to the main process, then SIGKILL to whatever is left of its group."""
        if self.process is None:
            return
        if self.alive():
            self.process.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        self.signal_group(signal.SIGKILL)
        self.process.wait(10)

    def kill_group(self) -> None:
        """Simulate a crash: SIGKILL every process of the group at once."""
        self.signal_group(signal.SIGKILL)
        self.process.wait(10)

    def log(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log()[-chars:]
