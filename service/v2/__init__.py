"""The Open Inference Protocol (KServe V2): REST routes under /v2 and gRPC
``inference.GRPCInferenceService``, both on ``predictor_of(app)`` (the /predict path).

``install(app, settings)`` is all the server calls: it adds the routes and error handler,
and starts the gRPC server with each API-server process (stopped at its shutdown).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.inference import litserve_adapter as adapter
from service.settings import Settings
from service.v2.errors import ProtocolError
from service.v2.rest import protocol_error, router

log = logging.getLogger("digits.grpc")


def install(app: FastAPI, settings: Settings) -> None:
    """Call after the lifespan that sets the app's predictor (gRPC starts inside it) and
    after the service's error handlers (V2 paths get the protocol's error shape instead)."""
    app.include_router(router)
    app.add_exception_handler(ProtocolError, protocol_error)
    service_handler = app.exception_handlers[StarletteHTTPException]

    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        """FastAPI's own errors (an unknown /v2 path: 404, a wrong method: 405) in the spec's shape."""
        if request.url.path == router.prefix or request.url.path.startswith(router.prefix + "/"):
            return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)
        return await service_handler(request, exc)

    app.add_exception_handler(StarletteHTTPException, http_error)
    adapter.add_lifespan(app, lambda app_: grpc_serving(app_, settings))


@contextlib.asynccontextmanager
async def grpc_serving(app: FastAPI, settings: Settings) -> AsyncIterator[None]:
    """gRPC for the life of one API-server process; stopped before the app's own shutdown."""
    # grpc is imported here, in the API-server process, so that gRPC's core is never
    # initialised in the parent that forks the API servers.
    from service.v2 import grpc_server

    try:
        server = await grpc_server.start(app, settings)
    except RuntimeError:
        # This API server exits; the supervisor's crash-loop rule stops the server if it keeps failing.
        log.exception("cannot serve gRPC on port %d; this API server exits", settings.grpc_port)
        raise
    try:
        yield
    finally:
        await grpc_server.stop(server)
