"""The Open Inference Protocol (KServe V2): REST routes under /v2 and gRPC
``inference.GRPCInferenceService``, both on ``app.state.predictor`` (the /predict path).

``install(app, settings)`` is all the server calls: it adds the routes and error handler,
and starts the gRPC server with each API-server process (stopped at its shutdown).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from service.settings import Settings
from service.v2.errors import ProtocolError
from service.v2.rest import protocol_error, router


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
    server = await grpc_server.start(app, settings)
    try:
        yield
    finally:
        await grpc_server.stop(server)
