"""``python -m service``: serve the active model on DIGITS_HOST:DIGITS_PORT (127.0.0.1:8000).

Owns the process tree: LitServe's API servers and inference workers, and the fine-tune
trainer, all supervised (a dead one is replaced). SIGTERM and SIGINT both run one graceful
shutdown: in-flight requests finish, then every child stops.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from service.settings import Settings

log = logging.getLogger("digits.main")


def stop_children(timeout: float = 10.0) -> None:
    """Terminate (then kill) any process this one started that is still running, except
    multiprocessing's resource tracker, which exits by itself after us."""
    import psutil

    def is_resource_tracker(child: psutil.Process) -> bool:
        try:
            return "resource_tracker" in " ".join(child.cmdline())
        except psutil.Error:  # gone, or a zombie: nothing to keep
            return False

    children = [child for child in psutil.Process().children(recursive=True) if not is_resource_tracker(child)]
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


def main(argv: list[str] | None = None, lit_api_class: type | None = None) -> int:
    """``lit_api_class``: tests pass a PredictAPI subclass to inject faults into the workers."""
    settings = Settings(_cli_parse_args=argv if argv is not None else True)
    own_run_dir = settings.run_dir is None
    settings.run_dir = Path(tempfile.mkdtemp(prefix="digits-run-")) if own_run_dir else settings.run_dir

    # Before anything imports prometheus_client: every process must see multiprocess mode,
    # starting from an empty directory (stale files from a previous run would add up).
    metrics_dir = settings.run_dir / "metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)

    from model.onnx_serving import OnnxUnavailable, ensure_onnx
    from model.registry import Registry
    from service.http.protocol import timed_protocol
    from service.inference import litserve_adapter as adapter
    from service.inference import placement
    from service.logs import configure_logging
    from service.server import build_server

    configure_logging(settings.log_level)
    registry = Registry(settings.registry)
    version = registry.active_version()
    if version is None:
        print(f"error: {settings.registry} has no active model; run `make train` first", file=sys.stderr)
        return 2
    where = placement.decide(settings)
    problem = placement.torch_problem(settings, where)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if where.where == "api":
        try:
            ensure_onnx(registry, version, settings.data_dir)  # once here, not in every API server
        except OnnxUnavailable as exc:  # the API servers start unready, say why, and wait for a servable version
            log.error("cannot serve the active version yet: %s", exc)
    server = build_server(settings, where) if lit_api_class is None else build_server(settings, where, lit_api_class)
    adapter.interrupt_on_signals(os.getpid())
    exit_code = 0
    log.info("serving on http://%s:%d (docs at /docs); model in the %s (%s)", settings.host, settings.port,
             "API servers" if where.where == "api" else "inference workers", where.reason)
    try:
        server.run(
            host=settings.host,
            port=settings.port,
            num_api_servers=settings.api_servers,
            log_level=settings.log_level,
            generate_client_file=False,
            access_log=False,  # ours is structured and carries the request id
            http=timed_protocol(settings),  # bounds connections too (uvicorn's limit_concurrency answers text)
        )
    except KeyboardInterrupt:
        pass
    except adapter.ManagerGone as exc:
        log.critical("%s; stopping the server", exc)
        exit_code = 1
    finally:
        adapter.ignore_signals()
        log.info("shutting down")
        stop_children()
        if own_run_dir:
            shutil.rmtree(settings.run_dir, ignore_errors=True)
        log.info("stopped")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
