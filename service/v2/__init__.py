"""The Open Inference Protocol (KServe V2): REST routes under /v2 and gRPC
``inference.GRPCInferenceService``, both on ``app.state.predictor`` (the /predict path).

``install(app, settings)`` is all the server calls: it adds the routes and error handler,
and starts the gRPC server with each API-server process (stopped at its shutdown).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator

from fastapi import FastAPI

from service.settings import Settings
from service.v2.errors import ProtocolError
from service.v2.rest import protocol_error, router

log = logging.getLogger("digits.grpc")


def install(app: FastAPI, settings: Settings) -> None:
    app.include_router(router)
    app.add_exception_handler(ProtocolError, protocol_error)
    outer = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app_: FastAPI) -> AsyncIterator[None]:
        async with outer(app_), grpc_serving(app_, settings):
            yield

    app.router.lifespan_context = lifespan


@contextlib.asynccontextmanager
async def grpc_serving(app: FastAPI, settings: Settings) -> AsyncIterator[None]:
    """gRPC for the life of one API-server process; stopped before the app's own shutdown."""
    # grpc is imported here, in the API-server process, so that gRPC's core is never
    # initialised in the parent that forks the API servers.
    from service.v2 import grpc_server
    from service.v2.interim_predictor import ensure_predictor

    ensure_predictor(app, settings)
    try:
        server = await grpc_server.start(app, settings)
    except RuntimeError:
        # Like an HTTP port in use: never a half-working server. The parent (the main
        # process) stops everything through its SIGTERM path.
        log.exception("cannot serve gRPC on port %d; stopping the server", settings.grpc_port)
        os.kill(os.getppid(), signal.SIGTERM)
        raise
    try:
        yield
    finally:
        await grpc_server.stop(server)
