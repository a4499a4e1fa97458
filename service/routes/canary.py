"""Admin API of canary rollouts: start one, compare it with the live version, promote or abort.

The routes move the registry's CANARY pointer (``Registry.start_canary`` / ``end_canary``);
every model holder on the registry follows it by itself (service/loop/canary.py). The
comparison comes from the ``digits_prediction_confidence`` histogram, merged over this
server's processes.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from model.registry import ONNX, Canary, Registry, RegistryError
from service import metrics
from service.http.auth import require_admin
from service.http.errors import ClientError
from service.inference import readiness
from service.routes.admin import ACTIVATE_POLL_SECONDS, Version, converged_on
from service.routes.schemas import ActivateResponse, ErrorBody
from service.routes.stores import RegistryDep, SettingsDep
from service.settings import Settings

router = APIRouter(
    prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)],
    responses={401: {"model": ErrorBody, "description": "no admin token, or a wrong one"},
               403: {"model": ErrorBody, "description": "admin disabled: no token configured"}},
)
MAX_PERCENT = 50  # beyond half the traffic the canary is the live version: promote it instead


class CanaryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    percent: float = Field(..., ge=1, le=MAX_PERCENT, description="share of requests the canary serves, 1-50")


class VersionStats(BaseModel):
    version: str
    predictions: int = Field(description="digits predicted by this version since the server started")
    mean_confidence: float | None
    low_confidence_share: float | None = Field(description="share with confidence <= `low_confidence_at`")
    review_rate: float | None = Field(description="share the capture tap kept for the review queue")
    feedback: int = Field(0, description="corrections posted to /feedback naming this version")
    feedback_rate: float | None = Field(description="corrections per prediction of this version")


class CanaryStatus(BaseModel):
    active: str | None = Field(description="the live version")
    canary: Canary | None = Field(description="the rollout under way, or null")
    live_stats: VersionStats | None
    canary_stats: VersionStats | None
    low_confidence_at: float = Field(description="the confidence bucket edge at or below DIGITS_REVIEW_THRESHOLD")
    holders: int = Field(description="model holders of this server that serve a model")
    holders_with_canary: int = Field(description="of them, those that have loaded the canary (a holder that "
                                                 "cannot load it, or whose canary failed, serves the live version)")


class CanaryAborted(BaseModel):
    aborted: str = Field(description="the canary version, no longer served")
    active: str | None = Field(description="the live version, which serves every request again")
    converged: bool = Field(description="every model holder of this server has dropped the canary: from now on "
                                        "this server answers every request with the live version")
    behind: list[str] = Field(description="holders still announcing the canary after DIGITS_ACTIVATE_WAIT_SECONDS")


def stats_of(version: str | None, measured: dict[str, dict]) -> VersionStats | None:
    if version is None:
        return None
    empty = {"predictions": 0, "mean_confidence": None, "low_confidence_share": None, "review_rate": None,
             "feedback_rate": None}
    return VersionStats(version=version, **measured.get(version, empty))


def status(request: Request, registry: Registry, settings: Settings) -> CanaryStatus:
    active, canary = registry.active_version(), registry.canary()
    low_at = metrics.low_confidence_edge(settings.review_threshold)
    measured = metrics.by_version(low_at)
    holders = readiness.report(request.app)["holders"]
    with_canary = sum(1 for h in holders if canary is not None and h.get("canary_version") == canary.version)
    return CanaryStatus(active=active, canary=canary, live_stats=stats_of(active, measured),
                        canary_stats=stats_of(canary.version if canary else None, measured), low_confidence_at=low_at,
                        holders=len(holders), holders_with_canary=with_canary)


@router.post("/models/{version}/canary", response_model=CanaryStatus,
             summary="Serve a share of requests with this version on every replica (replaces a canary under way)",
             responses={404: {"model": ErrorBody, "description": "no such version"},
                        409: {"model": ErrorBody, "description": "the version is active, or cannot be served here"},
                        422: {"model": ErrorBody, "description": "percent missing or outside 1-50"}})
async def start(version: Version, body: CanaryRequest, request: Request, registry: RegistryDep,
                settings: SettingsDep) -> CanaryStatus:
    if not registry.exists(version):
        raise ClientError(404, "unknown_version", f"no version {version}; see GET /admin/models")
    needs_onnx = settings.runtime != "torch"  # ONNX Runtime serves on CPU, and on every runtime's fallback
    if needs_onnx and not await asyncio.to_thread(registry.verify_artifact, version, ONNX):
        raise ClientError(409, "not_servable", f"version {version} has no intact {ONNX}, which the model holders "
                                               f"here load (DIGITS_RUNTIME={settings.runtime})")
    try:
        await asyncio.to_thread(registry.start_canary, version, body.percent)
    except RegistryError as exc:
        raise ClientError(409, "already_active", str(exc)) from None
    return await asyncio.to_thread(status, request, registry, settings)  # file reads: off the loop


@router.get("/canary", response_model=CanaryStatus, summary="The canary rollout, and live and canary compared")
async def get_canary(request: Request, registry: RegistryDep, settings: SettingsDep) -> CanaryStatus:
    return await asyncio.to_thread(status, request, registry, settings)  # file reads: off the loop


@router.post("/canary/promote", response_model=ActivateResponse,
             summary="Make the canary the active version; answers once every model holder of this server serves it",
             responses={202: {"model": ActivateResponse, "description": "promoted, but some holders still serve "
                              "another version after DIGITS_ACTIVATE_WAIT_SECONDS (named in `behind`)"},
                        409: {"model": ErrorBody, "description": "no canary rollout is under way"}})
async def promote(request: Request, registry: RegistryDep, settings: SettingsDep) -> JSONResponse:
    previous = registry.active_version()
    canary = await end(registry, promote=True)
    return await converged_on(request, canary.version, previous, settings)


@router.post("/canary/abort", response_model=CanaryAborted,
             summary="Stop the canary: the live version serves all; answers once every model holder of this "
                     "server has dropped it",
             responses={202: {"model": CanaryAborted, "description": "aborted, but some holders still announce "
                              "the canary after DIGITS_ACTIVATE_WAIT_SECONDS (named in `behind`)"},
                        409: {"model": ErrorBody, "description": "no canary rollout is under way"}})
async def abort(request: Request, registry: RegistryDep, settings: SettingsDep) -> JSONResponse:
    canary = await end(registry, promote=False)
    deadline = time.monotonic() + settings.activate_wait_seconds
    while (behind := await asyncio.to_thread(holding, request, canary.version)) and time.monotonic() < deadline:
        await asyncio.sleep(ACTIVATE_POLL_SECONDS)
    body = CanaryAborted(aborted=canary.version, active=registry.active_version(), converged=not behind,
                         behind=behind)
    return JSONResponse(body.model_dump(), status_code=202 if behind else 200)


def holding(request: Request, version: str) -> list[str]:
    """The holders (``"role index"``) of this server that still announce ``version`` as their canary."""
    return [f"{h['role']} {h['index']}" for h in readiness.report(request.app)["holders"]
            if h.get("canary_version") == version]


async def end(registry: Registry, promote: bool) -> Canary:
    try:
        return await asyncio.to_thread(registry.end_canary, promote)
    except RegistryError as exc:
        raise ClientError(409, "no_canary", str(exc)) from None
