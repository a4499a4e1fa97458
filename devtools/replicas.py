"""The Kubernetes topology on one machine, with real parts: nginx (the Service) in front of N
serving replicas (``python -m service`` with ``DIGITS_TRAINER_ENABLED=false``) and one
standalone trainer (``python -m service.finetune.trainer``) on one shared registry, optionally
Prometheus scraping them all. A supervisor plays the kubelet and the endpoints controller:
it restarts a replica or trainer that dies, and nginx's upstreams are the replicas that are
alive and ready (rewritten and reloaded when that changes).

``python -m devtools.replicas`` (``make replicas``) runs it until Ctrl+C or SIGTERM, which
stop everything it started. Tests use :class:`Topology` as a context manager.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import requests

from devtools.processes import ROOT, Child, free_port, is_up
from devtools.serverctl import private_registry

log = logging.getLogger("digits.replicas")
NGINX_TEMPLATE = ROOT / "deploy" / "local" / "nginx.conf.template"
SUPERVISE_SECONDS = 0.25
READY_FAILURES_TO_LEAVE = 3  # like a readiness probe's failureThreshold
RESTART_LIMIT = 5  # restarts of one process within the window: a crash loop, given up on
RESTART_WINDOW_SECONDS = 60.0


def unprivileged_user() -> pwd.struct_passwd | None:
    """nobody when we are root (nginx and nothing else then runs as root); None otherwise."""
    return pwd.getpwnam("nobody") if os.geteuid() == 0 else None


@dataclass
class Supervised(Child):
    """A child the supervisor restarts when it exits, until it exits too often."""

    restarts: list[float] = field(default_factory=list)
    given_up: bool = False  # a crash loop: the supervisor stopped restarting it


@dataclass
class Replica(Supervised):
    port: int = 0
    in_service: bool = False
    in_service_since: float = 0.0  # time.time() when it last went into nginx's upstreams
    ready_failures: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        return is_up(self.url, timeout=1)


class Nginx:
    """nginx from the repository's template, unprivileged, everything it writes in its own dir."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.prefix = Path(tempfile.mkdtemp(prefix="digits-nginx-"))  # reachable by nobody, unlike a 0700 tmp
        user = unprivileged_user()
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.prefix / sub).mkdir()
        if user:
            for path in (self.prefix, *self.prefix.iterdir()):
                os.chown(path, user.pw_uid, user.pw_gid)
        self.conf = self.prefix / "nginx.conf"
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        self.command = [binary, "-p", str(self.prefix), "-c", str(self.conf), "-e", str(self.prefix / "error.log")]
        self.child = Supervised("nginx", self.command, self.prefix / "stdout.log", user=user)

    def check_conf(self) -> None:
        """``nginx -t`` as the user nginx runs as: a broken config fails here, clearly."""
        user = self.child.user
        result = subprocess.run([*self.command, "-t", "-q"], capture_output=True, text=True, timeout=30,
                                user=user.pw_uid if user else None, group=user.pw_gid if user else None,
                                extra_groups=[] if user else None)
        if result.returncode != 0:
            raise RuntimeError(f"nginx -t failed for {self.conf}:\n{result.stderr}")

    def write_conf(self, ports: list[int]) -> None:
        servers = "\n".join(f"        server 127.0.0.1:{port} max_fails=1 fail_timeout=1s;" for port in ports)
        text = NGINX_TEMPLATE.read_text()
        for name, value in {"PREFIX": str(self.prefix), "LISTEN": f"127.0.0.1:{self.port}",
                            "SERVERS": servers}.items():
            text = text.replace(f"@{name}@", value)
        tmp = self.conf.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.conf)

    def reload(self, ports: list[int]) -> None:
        self.write_conf(ports)
        if self.child.alive():
            self.child.process.send_signal(signal.SIGHUP)  # graceful: in-flight requests finish

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def cleanup(self) -> None:
        shutil.rmtree(self.prefix, ignore_errors=True)


class Prometheus:
    """Debian's Prometheus on 127.0.0.1, scraping the replicas and the trainer every second."""

    def __init__(self, port: int, directory: Path, replica_ports: list[int], trainer_port: int) -> None:
        self.port, self.directory = port, directory
        directory.mkdir(parents=True, exist_ok=True)
        config = {  # JSON is YAML
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "digit-service", "static_configs": [  # labelled as on Kubernetes
                {"targets": [f"127.0.0.1:{p}" for p in replica_ports], "labels": {"component": "serving"}},
                {"targets": [f"127.0.0.1:{trainer_port}"], "labels": {"component": "trainer"}},
            ]}],
        }
        (directory / "prometheus.yml").write_text(json.dumps(config, indent=2))
        binary = shutil.which("prometheus") or "/usr/bin/prometheus"
        self.child = Supervised("prometheus", [
            binary, f"--config.file={directory / 'prometheus.yml'}", f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
        ], directory / "prometheus.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        try:
            return requests.get(f"{self.url}/-/ready", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def query(self, promql: str) -> list[dict]:
        response = requests.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=5)
        response.raise_for_status()
        return response.json()["data"]["result"]


class Topology:
    """nginx -> N replicas + one trainer on one private registry, supervised; see the module doc."""

    def __init__(self, root: Path, source_registry: Path, replicas: int = 3, port: int = 0,
                 prometheus_port: int | None = None, admin_token: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.registry = private_registry(source_registry, root / "registry")
        self.admin_token = admin_token or secrets.token_urlsafe(18)
        self.token_file = root / "admin-token"
        self.token_file.write_text(self.admin_token)
        self.token_file.chmod(0o600)
        shared = {"DIGITS_REGISTRY": str(self.registry), "DIGITS_ADMIN_TOKEN_FILE": str(self.token_file),
                  "DIGITS_HOST": "127.0.0.1", "DIGITS_RUNTIME": os.environ.get("DIGITS_RUNTIME", "onnx"),
                  **(env or {})}
        logs = root / "logs"
        logs.mkdir(exist_ok=True)
        self.replicas: list[Replica] = []
        for index in range(replicas):
            replica_port = free_port()
            self.replicas.append(Replica(
                f"replica-{index}", [sys.executable, "-m", "service"], logs / f"replica-{index}.log",
                # every request arrives from nginx's one address: the per-address bound is nginx's job
                env={**shared, "DIGITS_PORT": str(replica_port), "DIGITS_TRAINER_ENABLED": "false",
                     "DIGITS_MAX_CONNECTIONS_PER_CLIENT": "1024",
                     "DIGITS_API_SERVERS": "1", "DIGITS_RUN_DIR": str(root / "run" / f"replica-{index}")},
                port=replica_port))
        self.trainer_metrics_port = free_port()
        self.trainer = Supervised("trainer", [sys.executable, "-m", "service.finetune.trainer"], logs / "trainer.log",
                             env={**shared, "DIGITS_TRAINER_METRICS_PORT": str(self.trainer_metrics_port)})
        self.nginx = Nginx(port or free_port())
        self.prometheus = (Prometheus(prometheus_port, root / "prometheus", [r.port for r in self.replicas],
                                      self.trainer_metrics_port) if prometheus_port is not None else None)
        self._stopping = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, name="digits-supervisor", daemon=True)
        self.events: deque[str] = deque(maxlen=1000)  # what the supervisor did lately, for logs and tests

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.nginx.port}"

    def children(self) -> list[Supervised]:
        extra = [self.prometheus.child] if self.prometheus else []
        return [*self.replicas, self.trainer, self.nginx.child, *extra]

    def start(self) -> Topology:
        self.nginx.write_conf([r.port for r in self.replicas])
        self.nginx.check_conf()
        for child in self.children():
            child.spawn()
        self._supervisor.start()
        return self

    def wait_ready(self, timeout: float = 240.0) -> None:
        """Until every replica is in nginx's upstreams and nginx (and Prometheus) answer."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(r.in_service for r in self.replicas) and self._front_answers() and (
                    self.prometheus is None or self.prometheus.ready()):
                return
            for child in self.children():
                if child.given_up:
                    raise RuntimeError(f"{child.name} keeps exiting:\n{child.log_tail()}\n{self.nginx.error_log()}")
            time.sleep(0.3)
        states = {r.name: (r.alive(), r.in_service) for r in self.replicas}
        raise TimeoutError(f"topology not ready after {timeout:.0f} s: {states}\n"
                           + "\n".join(f"--- {r.name}\n{r.log_tail(1500)}" for r in self.replicas))

    def _front_answers(self) -> bool:
        try:
            return requests.get(f"{self.url}/health", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def _note(self, message: str, level: int = logging.WARNING) -> None:
        self.events.append(f"{time.time():.3f} {message}")
        log.log(level, message)

    def _restart(self, child: Supervised) -> None:
        now = time.monotonic()
        child.restarts = [t for t in child.restarts if now - t < RESTART_WINDOW_SECONDS]
        if len(child.restarts) >= RESTART_LIMIT:
            if not child.given_up:
                child.given_up = True
                self._note(f"{child.name} crash loop ({RESTART_LIMIT} restarts in {RESTART_WINDOW_SECONDS:.0f} s): "
                           f"not restarting it; see {child.log_path}")
            return
        code = child.process.returncode if child.process else None
        child.signal_group(signal.SIGKILL)  # whatever of its tree outlived it
        child.restarts.append(now)
        self._note(f"{child.name} (pid {child.pid}) exited with {code}; restarting it")
        child.spawn()

    def _supervise(self) -> None:
        upstreams = [r.port for r in self.replicas]
        while not self._stopping.wait(SUPERVISE_SECONDS):
            try:
                upstreams = self._supervise_once(upstreams)
            except Exception:  # keep supervising whatever one round ran into
                log.exception("supervisor round failed")

    def _supervise_once(self, upstreams: list[int]) -> list[int]:
        for child in (self.trainer, self.nginx.child, *([self.prometheus.child] if self.prometheus else [])):
            if not child.alive() and not self._stopping.is_set():
                self._restart(child)
        for replica in self.replicas:
            self._check_replica(replica)
        serving = [r.port for r in self.replicas if r.in_service] or [r.port for r in self.replicas]
        if serving != upstreams and not self._stopping.is_set():
            self._note(f"nginx upstreams now {serving}", logging.INFO)
            self.nginx.reload(serving)
        return serving

    def _check_replica(self, replica: Replica) -> None:
        if not replica.alive():
            if replica.in_service:
                self._note(f"{replica.name} died; out of nginx's upstreams")
            replica.in_service, replica.ready_failures = False, 0
            if not self._stopping.is_set():
                self._restart(replica)
            return
        if replica.ready():
            replica.ready_failures = 0
            if not replica.in_service:
                replica.in_service, replica.in_service_since = True, time.time()
                self._note(f"{replica.name} is ready; into nginx's upstreams", logging.INFO)
        elif replica.in_service:
            replica.ready_failures += 1
            if replica.ready_failures >= READY_FAILURES_TO_LEAVE:
                replica.in_service = False
                self._note(f"{replica.name} failed /ready {READY_FAILURES_TO_LEAVE} times; out of the upstreams")

    def stop(self) -> None:
        """Stop everything, also when start failed half-way: replicas drain first, nginx last."""
        self._stopping.set()
        if self._supervisor.is_alive():
            self._supervisor.join(10)
        stoppers = [threading.Thread(target=child.stop) for child in (*self.replicas, self.trainer)]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join()
        self.nginx.child.stop(signal.SIGQUIT, timeout=10)
        if self.prometheus:
            self.prometheus.child.stop()
        self.nginx.cleanup()

    def __enter__(self) -> Topology:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    from service.settings import Settings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--port", type=int, default=8000, help="nginx listens on 127.0.0.1:PORT")
    parser.add_argument("--prometheus-port", type=int, default=9090,
                        help="Prometheus on 127.0.0.1:PORT (another free one when taken); 0: none")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for tool in ("nginx", *(["prometheus"] if args.prometheus_port else [])):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"error: {tool} not found: `apt-get install {tool}` (make replicas does)", file=sys.stderr)
            return 2
    settings = Settings()
    root = Path(tempfile.mkdtemp(prefix="digits-replicas-"))
    signal.signal(signal.SIGTERM, _interrupt)  # SIGINT raises KeyboardInterrupt already
    topology = Topology(root, settings.registry.resolve(), args.replicas, args.port,
                        free_port(args.prometheus_port) if args.prometheus_port else None, settings.admin_token_value(),
                        env={"DIGITS_DATA_DIR": str(settings.data_dir.resolve())})
    try:
        print(f"starting {args.replicas} replicas and a trainer on {topology.registry} "
              f"(a copy of {settings.registry}); logs in {root / 'logs'}", flush=True)
        topology.start()
        topology.wait_ready()
        lines = [f"nginx       {topology.url}  (Ctrl+C stops everything)"]
        lines += [f"{r.name}   {r.url}" for r in topology.replicas]
        lines.append(f"trainer     http://127.0.0.1:{topology.trainer_metrics_port}/metrics")
        if topology.prometheus:
            lines.append(f"prometheus  {topology.prometheus.url}")
        lines.append(f'admin       curl -H "Authorization: Bearer $(cat {topology.token_file})" '
                     f"{topology.url}/admin/models")
        print("\n".join(lines), flush=True)
        while True:
            signal.pause()
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        topology.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
