"""Builds the LitServer: where the model runs, the routes, the middlewares, the supervisor."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from model.registry import Registry
from service import v2
from service.http import inputs
from service.http.errors import install_error_handlers
from service.http.middleware import BodyLimitMiddleware, RequestContextMiddleware
from service.inference import litserve_adapter as adapter
from service.inference import readiness
from service.inference.model_slot import ModelSlot
from service.inference.placement import Placement, runtime_options
from service.inference.predictor import InProcessPredictor, WorkerPredictor, serve_with
from service.inference.runtimes import Serving
from service.inference.worker import PredictAPI
from service.loop import capture
from service.routes import admin, canary, feedback, ops, predict, review
from service.routes.predict import PredictEndpoint
from service.settings import Settings
from service.v2.rest import INFER_PATH, InferEndpoint

log = logging.getLogger("digits.server")

ROLE_OF = {adapter.ProcessKind.INFERENCE_WORKER: "worker", adapter.ProcessKind.API_SERVER: "api"}  # readiness roles


class Shortcuts:
    """POST /predict and V2 infer go straight to their endpoints; everything else through FastAPI."""

    def __init__(self, app: FastAPI) -> None:
        self.app, self.predict, self.infer = app, PredictEndpoint(app), InferEndpoint(app)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            if scope["path"] == predict.PATH:
                return await self.predict(scope, receive, send)
            if match := INFER_PATH.fullmatch(scope["path"]):
                return await self.infer(scope, receive, send, match)
        await self.app(scope, receive, send)


def edge(settings: Settings) -> Callable[[FastAPI], ASGIApp]:
    """What uvicorn runs in every API server: request ids, metrics and access log, the body
    limit, then the shortcuts (/predict, V2 infer) or the FastAPI app."""

    def wrap(app: FastAPI) -> ASGIApp:
        limited = BodyLimitMiddleware(Shortcuts(app), max_bytes=settings.max_body_bytes,
                                      admin_max_bytes=settings.finetune_max_body_bytes)
        return RequestContextMiddleware(limited, access_log_enabled=settings.access_log)

    return wrap


def model_lifespan(server: adapter.DigitServer, settings: Settings, placement: Placement,
                   ) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    """In every API server: the predictor the routes call, made after the fork."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        index = adapter.process_index()
        if placement.where == "api":
            swap_problem: dict[str, str] = {}  # why the active version cannot be swapped in, while it cannot

            def announce(serving: Serving) -> None:
                readiness.write(settings.run_dir, "api", index, device="cpu", model_version=serving.version,
                                runtime=serving.runtime.name, runtime_reason=placement.reason,
                                canary_version=slot.canary_version, **swap_problem)

            def not_ready(problem: str) -> None:
                readiness.write(settings.run_dir, "api", index, device="cpu", problem=problem)

            def cannot_swap(problem: str | None) -> None:
                swap_problem.clear()
                swap_problem.update({"swap_problem": problem} if problem else {})
                if slot.serving is not None:
                    announce(slot.serving)

            slot = await asyncio.to_thread(
                ModelSlot, Registry(settings.registry), "onnx", runtime_options(settings, "cpu", api_server=index),
                on_change=announce, on_problem=not_ready, on_swap_problem=cannot_swap)
            if slot.serving is not None:
                announce(slot.serving)
            slot.start_watching()
            tap = capture.tap_for(settings)
            serve_with(app, capture.TappedPredictor(InProcessPredictor(slot), tap))
            try:
                yield
            finally:
                slot.stop_watching()
                tap.close()
        else:
            predictor = WorkerPredictor(server, settings.run_dir)
            tap = capture.tap_for(settings)
            serve_with(app, capture.TappedPredictor(predictor, tap))
            watcher = asyncio.create_task(predictor.watch_workers(), name="digits-worker-watch")
            try:
                yield
            finally:
                watcher.cancel()
                tap.close()

    return lifespan


def _start_trainer(settings: Settings) -> multiprocessing.Process:
    from service.finetune.trainer import start_trainer  # torch: imported only where a trainer runs

    return start_trainer(settings)


def build_server(settings: Settings, placement: Placement, lit_api_class: type[PredictAPI] = PredictAPI,
                 ) -> adapter.DigitServer:
    """``lit_api_class``: tests pass a subclass to inject faults into the inference workers."""
    if settings.run_dir is None:
        raise ValueError("settings.run_dir must be set (the entry point makes one)")
    readiness.clear(settings.run_dir)
    in_worker = placement.where == "worker"

    def on_death(death: adapter.Death) -> None:
        if death.kind in ROLE_OF:  # a dead model holder is not ready (the trainer holds none)
            readiness.remove(settings.run_dir, ROLE_OF[death.kind], death.index)

    server = adapter.DigitServer(
        lit_api_class(settings, holds_model=in_worker),
        greedy_batching=settings.batching == "greedy",
        on_death=on_death,
        extra_processes={"trainer": lambda: _start_trainer(settings)} if settings.trainer_enabled else None,
        accelerator="cuda" if placement.device == "cuda" else "cpu",
        workers_per_device=settings.workers if in_worker else 1,
        timeout=settings.request_timeout,
        edge=edge(settings),
    )
    app = server.app
    app.title = "digit-service"
    app.description = "Handwritten-digit classification, fine-tunable while it serves."
    app.state.settings = settings
    app.state.model_holders = ([("worker", i) for i in range(server.worker_count())] if in_worker
                               else [("api", i) for i in range(settings.api_servers)])
    adapter.add_lifespan(app, model_lifespan(server, settings, placement))
    adapter.add_lifespan(app, inputs.heavy_decoding)
    install_error_handlers(app)
    app.include_router(ops.router)
    app.router.routes.append(Route(predict.PATH, PredictEndpoint(app), methods=["POST"]))  # 405 for others
    predict.document(app)
    app.include_router(feedback.router)
    app.include_router(admin.router)
    app.include_router(review.router)
    app.include_router(review.console)
    app.include_router(canary.router)
    v2.install(app, settings)  # after the model lifespan: gRPC starts once the predictor exists
    return server
