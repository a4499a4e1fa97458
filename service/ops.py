"""Operational routes: liveness, readiness, Prometheus metrics, and the drawing page at /."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from service import metrics, readiness

router = APIRouter(tags=["operations"])
PAGE = (resources.files("service") / "static" / "index.html").read_text()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def drawing_page() -> HTMLResponse:
    """A drawing pad that calls /predict and /feedback."""
    return HTMLResponse(PAGE)


@router.get("/health", summary="Liveness: the HTTP server answers")
async def health() -> dict:
    return {"status": "alive"}


@router.get("/ready", summary="Readiness: every process that holds a model has loaded and warmed it")
async def ready(request: Request) -> JSONResponse:
    expected: list[tuple[str, int]] = request.app.state.model_holders
    holders = readiness.read_all(request.app.state.settings.run_dir)
    present = {(h["role"], h["index"]) for h in holders}
    missing = [f"{role} {index}" for role, index in expected if (role, index) not in present]
    body = {"ready": not missing, "holders_ready": len(expected) - len(missing), "holders_expected": len(expected),
            "missing": missing, "holders": holders}
    if holders:
        first = holders[0]
        body.update(model_version=first["model_version"], runtime=first["runtime"],
                    runtime_reason=first["runtime_reason"])
    return JSONResponse(body, status_code=200 if body["ready"] else 503)


@router.get("/metrics", summary="Prometheus metrics of all processes")
async def prometheus_metrics() -> Response:
    return Response(metrics.render(), media_type=metrics.CONTENT_TYPE_LATEST)
