"""Operational routes: liveness, readiness, Prometheus metrics, and the drawing page at /."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, FastAPI, Request
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


def readiness_report(app: FastAPI) -> dict:
    """What /ready says (and the V2 protocol's readiness follows)."""
    expected: list[tuple[str, int]] = app.state.model_holders
    states = readiness.read_all(app.state.settings.run_dir)
    holders = [state for state in states if "problem" not in state]
    problems = {f"{s['role']} {s['index']}": s["problem"] for s in states if "problem" in s}
    present = {(h["role"], h["index"]) for h in holders}
    missing = [f"{role} {index}" for role, index in expected if (role, index) not in present]
    body = {"ready": not missing, "holders_ready": len(expected) - len(missing), "holders_expected": len(expected),
            "missing": missing, "holders": holders}
    if problems:  # why a holder cannot serve (e.g. a version without model.onnx and no torch to export it)
        body.update(problems=problems, reason="; ".join(sorted(set(problems.values()))))
    if holders:
        first = holders[0]
        body.update(model_version=first["model_version"], runtime=first["runtime"],
                    runtime_reason=first["runtime_reason"])
    return body


@router.get("/ready", summary="Readiness: every process that holds a model has loaded and warmed it")
async def ready(request: Request) -> JSONResponse:
    body = readiness_report(request.app)
    return JSONResponse(body, status_code=200 if body["ready"] else 503)


@router.get("/metrics", summary="Prometheus metrics of all processes")
async def prometheus_metrics() -> Response:
    return Response(metrics.render(), media_type=metrics.CONTENT_TYPE_LATEST)
