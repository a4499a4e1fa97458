"""Builds the LitServer: the predict API, our transport, extra routes and middlewares."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from importlib import resources
from pathlib import Path

import litserve as ls
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import metrics
from service.middleware import BodyLimitMiddleware, RequestContextMiddleware
from service.predict import PredictAPI, readiness_dir
from service.schemas import ErrorBody, PredictJSON, PredictResponse
from service.settings import Settings
from service.transport import GreedyBatchQueue, PipeQueueTransport, new_queue

log = logging.getLogger("digits.server")

STATUS_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid_request",
    500: "internal_error", 503: "unavailable", 504: "timeout",
}


class DigitServer(ls.LitServer):
    """LitServer with a pipe-backed transport and a start that does not wait for warm-up."""

    greedy_batching = False

    def _init_manager(self, num_api_servers: int):
        manager = super()._init_manager(num_api_servers)
        for api_path in self.litapi_request_queues:
            self.litapi_request_queues[api_path] = GreedyBatchQueue() if self.greedy_batching else new_queue()
        self._transport = PipeQueueTransport([new_queue() for _ in range(num_api_servers)])
        return manager

    def verify_worker_status(self) -> None:
        """Open the port at once: /health answers and /ready says 503 while workers warm up.
        A worker whose setup fails exits, and the monitor below then shuts the server down."""

    def _start_worker_monitoring(self, manager, uvicorn_workers) -> None:
        """Replaces LitServe's monitor, which polls the manager until it crashes at shutdown.
        A dead inference worker stops the whole server through the same path as SIGTERM:
        never a half-working server."""
        self._stopping = threading.Event()

        def monitor() -> None:
            while not self._stopping.wait(1.0):
                dead = [p for p in self.inference_workers if not p.is_alive()]
                if dead:
                    log.error("inference worker %s exited (code %s); stopping the server",
                              dead[0].pid, dead[0].exitcode)
                    os.kill(os.getpid(), signal.SIGTERM)
                    return

        threading.Thread(target=monitor, name="digits-worker-monitor", daemon=True).start()

    def _perform_graceful_shutdown(self, manager, uvicorn_workers, shutdown_reason: str = "normal") -> None:
        stopping = getattr(self, "_stopping", None)
        if stopping is not None:
            stopping.set()
        super()._perform_graceful_shutdown(manager, uvicorn_workers, shutdown_reason)


def error_response(status: int, code: str, detail, request: Request) -> JSONResponse:
    request_id = request.scope.get("state", {}).get("request_id")
    body = ErrorBody(error=code, detail=detail, request_id=request_id).model_dump()
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = getattr(exc, "code", None) or STATUS_CODES.get(exc.status_code, "error")
        return error_response(exc.status_code, code, exc.detail, request)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [{"loc": list(e.get("loc", [])), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        return error_response(422, "invalid_request", detail, request)


def read_readiness(settings: Settings) -> list[dict]:
    directory = Path(readiness_dir(settings))
    workers = []
    for path in sorted(directory.glob("worker-*.json")) if directory.is_dir() else []:
        try:
            workers.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue  # being replaced right now; the next poll sees it
    return workers


def install_demo_page(app: FastAPI) -> None:
    """A drawing pad at / that calls /predict and /feedback (replaces LitServe's plain-text index)."""
    page = (resources.files("service") / "static" / "index.html").read_text()
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != "/"]

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def demo() -> HTMLResponse:
        return HTMLResponse(page)


def install_operational_routes(app: FastAPI, settings: Settings, expected_workers: int) -> None:
    @app.get("/health", tags=["operations"], summary="Liveness: the HTTP server answers")
    async def health() -> dict:
        return {"status": "alive"}

    @app.get("/ready", tags=["operations"], summary="Readiness: every worker has loaded and warmed the model")
    async def ready() -> JSONResponse:
        workers = read_readiness(settings)
        body = {"ready": len(workers) >= expected_workers, "workers_ready": len(workers),
                "workers_expected": expected_workers, "workers": workers}
        if workers:
            body.update(model_version=workers[0]["model_version"], runtime=workers[0]["runtime"],
                        runtime_reason=workers[0]["runtime_reason"])
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics of all processes")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=metrics.CONTENT_TYPE_LATEST)


def document_predict_route(app: FastAPI) -> None:
    """LitServe registers /predict with a dependency that reads the raw body; describe the
    body it accepts so /docs shows both forms."""
    for route in app.routes:
        if getattr(route, "path", None) == "/predict":
            route.summary = "Classify a handwritten digit"
            route.description = (
                "Send an image (PNG, JPEG, BMP, GIF, WebP, TIFF; photo, scan, canvas drawing or MNIST "
                "sample) as multipart field `file`, or as JSON `{\"image\": \"<base64 or data URL>\"}`."
            )
            route.openapi_extra = {
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": {"type": "string", "format": "binary"}}}
                        },
                        "application/json": {"schema": PredictJSON.model_json_schema()},
                    },
                }
            }
            route.responses = {
                413: {"model": ErrorBody, "description": "body or image dimensions over the limit"},
                415: {"model": ErrorBody, "description": "not a supported image or content type"},
                422: {"model": ErrorBody, "description": "corrupt image, no ink, bad JSON or base64"},
            }
            route.response_model = PredictResponse


def build_server(settings: Settings) -> DigitServer:
    if settings.run_dir is None:
        raise ValueError("settings.run_dir must be set (the entry point makes one)")
    os.makedirs(readiness_dir(settings), exist_ok=True)
    api = PredictAPI(settings)
    server = DigitServer(
        api,
        accelerator="cuda" if settings.device == "cuda" else ("cpu" if settings.device == "cpu" else "auto"),
        workers_per_device=settings.workers,
        timeout=settings.request_timeout,
        healthcheck_path="/litserve/health",
        info_path="/litserve/info",
    )
    server.greedy_batching = settings.batching == "greedy"
    app = server.app
    app.title = "digit-service"
    app.description = "Handwritten-digit classification, fine-tunable while it serves."
    app.state.settings = settings
    expected_workers = len(server._inference_workers_config_for_api(api.api_path))
    install_error_handlers(app)
    install_operational_routes(app, settings, expected_workers)
    install_demo_page(app)
    document_predict_route(app)
    from service.admin import install_admin_routes

    install_admin_routes(app, settings)
    from service import v2

    v2.install(app, settings)
    # add_middleware wraps: the last added runs first, so request ids exist before the body check.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes,
                       admin_max_bytes=settings.finetune_max_body_bytes)
    app.add_middleware(RequestContextMiddleware, access_log_enabled=settings.access_log)
    return server

