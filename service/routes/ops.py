"""Operational routes: liveness, readiness, Prometheus metrics, and the drawing page at /."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from service import metrics
from service.inference import readiness

router = APIRouter(tags=["operations"])
PAGE = (resources.files("service") / "static" / "index.html").read_text()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def drawing_page() -> HTMLResponse:
    """A drawing pad that calls /predict and /feedback."""
    return HTMLResponse(PAGE)


@router.get("/health", summary="Liveness: the HTTP server answers")
async def health() -> dict:
    return {"status": "alive"}


@router.get("/ready", summary="Readiness: every process that holds a model has loaded and warmed it; which "
            "version each serves and whether they agree with the registry's active one")
async def ready(request: Request) -> JSONResponse:
    body = readiness.report(request.app)
    return JSONResponse(body, status_code=200 if body["ready"] else 503)


@router.get("/metrics", summary="Prometheus metrics of all processes")
async def prometheus_metrics(request: Request) -> Response:
    return Response(metrics.render(readiness.report(request.app)), media_type=metrics.CONTENT_TYPE_LATEST)
