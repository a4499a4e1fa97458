"""``python -m service``: serve the active model on DIGITS_HOST:DIGITS_PORT (127.0.0.1:8000).

Owns the process tree: LitServe's API servers and inference workers, and the fine-tune
trainer. SIGTERM and SIGINT both run one graceful shutdown (LitServe 0.2.19 alone would
leave its children running on SIGTERM): in-flight requests finish, then every child stops.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from service.settings import Settings

log = logging.getLogger("digits.main")


MAIN_PID = os.getpid()


def _raise_interrupt(signum: int, frame: object) -> None:
    """SIGTERM/SIGINT in the main process -> LitServe's graceful shutdown path. Forked API
    servers inherit this handler; uvicorn has already shut them down gracefully when it
    re-raises the signal, so there it does nothing and the process exits."""
    if os.getpid() == MAIN_PID:
        raise KeyboardInterrupt(f"signal {signum}")


def stop_children(timeout: float = 10.0) -> None:
    """Terminate (then kill) any process this one started that is still running, except
    multiprocessing's resource tracker, which exits by itself after us."""
    import psutil

    children = [
        child for child in psutil.Process().children(recursive=True)
        if "resource_tracker" not in " ".join(child.cmdline() or [])
    ]
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def main() -> int:
    settings = Settings(_cli_parse_args=True)
    own_run_dir = settings.run_dir is None
    settings.run_dir = Path(tempfile.mkdtemp(prefix="digits-run-")) if own_run_dir else settings.run_dir

    # Before anything imports prometheus_client: every process must see multiprocess mode,
    # starting from an empty directory (stale files from a previous run would add up).
    metrics_dir = settings.run_dir / "metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)

    from service.logs import configure_logging
    from service.server import build_server
    from service.trainer import start_trainer

    configure_logging(settings.log_level)
    from model.registry import Registry

    if Registry(settings.registry).active_version() is None:
        print(f"error: {settings.registry} has no active model; run `make train` first", file=sys.stderr)
        return 2
    server = build_server(settings)
    trainer = start_trainer(settings) if settings.trainer_enabled else None
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)
    log.info("serving on http://%s:%d (docs at /docs)", settings.host, settings.port)
    try:
        server.run(
            host=settings.host,
            port=settings.port,
            num_api_servers=settings.api_servers,
            log_level=settings.log_level,
            generate_client_file=False,
            access_log=False,  # ours is structured and carries the request id
        )
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        log.info("shutting down")
        if trainer is not None:
            trainer.stop()
        stop_children()
        if own_run_dir:
            shutil.rmtree(settings.run_dir, ignore_errors=True)
        log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
