"""The review queue over HTTP (behind the admin token), and the admin console page at /admin.

Reviewers lease items (nobody else gets them meanwhile), label, skip or discard them with the
lease's token, and fine-tune on what was labelled: a job of source ``review`` on the ordinary
fine-tune path (the same trainer and gate), its items marked with the job so that no label
is trained on twice and none is lost.
"""

from __future__ import annotations

import asyncio
import base64
from importlib import resources
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from model.finetune_options import FinetuneOptions
from model.preprocess import encode_png
from model.registry import RECORD_ID
from service.finetune.jobs import JobState, JobStore, QueueFull
from service.http.auth import require_admin
from service.http.errors import ClientError
from service.http.labels import Label
from service.loop.review import ReviewError, ReviewItem, ReviewQueue
from service.routes.schemas import ErrorBody, JobAccepted
from service.routes.stores import JobsDep, RegistryDep, SettingsDep
from service.settings import Settings

ItemId = Annotated[str, Path(pattern=RECORD_ID, description="a review item id, like 20260101120000a1b2c3d4")]
STATUS_OF_ERROR = {"unknown_item": 404, "lease_lost": 409, "already_labelled": 409, "nothing_reviewed": 422}
QUEUE_FULL_RETRY_SECONDS = 30
CONSOLE = (resources.files("service") / "static" / "admin.html").read_text()

router = APIRouter(
    prefix="/admin/review", tags=["review"], dependencies=[Depends(require_admin)],
    responses={401: {"model": ErrorBody, "description": "no admin token, or a wrong one"},
               403: {"model": ErrorBody, "description": "admin disabled: no token configured"}},
)
console = APIRouter(tags=["review"])


def get_queue(registry: RegistryDep, settings: SettingsDep) -> ReviewQueue:
    return ReviewQueue(registry, settings.review_max_items, settings.review_max_bytes, settings.review_lease_seconds)


QueueDep = Annotated[ReviewQueue, Depends(get_queue)]


# ------------------------------------------------------------------ bodies


class LeaseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    count: int = Field(24, ge=1, le=200, description="items wanted")
    reviewer: str = Field("reviewer", min_length=1, max_length=64, description="who reviews (shown in the record)")


class TokenBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str = Field(..., min_length=1, max_length=64, description="the lease's token")


class LabelBody(TokenBody):
    label: Label


class ItemState(BaseModel):
    label: int | None = None
    labelled_at: float | None = None
    reviewer: str | None = None
    leased_by: str | None = None
    lease_expires: float | None = None
    skips: int = 0
    job_id: str | None = Field(None, description="the fine-tune job that trained on this label")


class ItemOut(BaseModel):
    item_id: str
    image_png: str = Field(..., description="base64 PNG of the 28x28 digit the model saw (white on black)")
    source: Literal["capture", "feedback"]
    reason: str = Field(..., description="low_confidence, sample (captures) or feedback")
    prediction: int | None = Field(None, description="the model's digit (captures)")
    confidence: float | None = None
    version: str | None = Field(None, description="the version that answered")
    time: float
    suggested: int | None = Field(None, description="the label a /feedback user gave")
    has_original: bool = Field(..., description="the upload was kept (DIGITS_REVIEW_KEEP_ORIGINAL)")
    state: ItemState


class Lease(BaseModel):
    token: str = Field(..., description="send it with each label, skip or discard")
    expires: float = Field(..., description="unix time; later, another reviewer may get these items")
    items: list[ItemOut]


class QueueCounts(BaseModel):
    items: int
    pending: int = Field(..., description="not labelled yet")
    leased: int
    labelled: int
    used: int = Field(..., description="labelled and trained on by a job")
    bytes: int
    max_items: int
    max_bytes: int
    capture: bool
    threshold: float
    sample: float


def item_out(item: ReviewItem) -> ItemOut:
    state = item.state
    leased = state.lease_token is not None
    return ItemOut(
        item_id=item.item_id, image_png=base64.b64encode(encode_png(item.image)).decode("ascii"),
        source=item.source, reason=item.reason, prediction=item.prediction, confidence=item.confidence,
        version=item.version, time=item.time, suggested=item.suggested, has_original=item.has_original,
        state=ItemState(label=state.label, labelled_at=state.labelled_at, reviewer=state.reviewer,
                        leased_by=state.lease_reviewer if leased else None,
                        lease_expires=state.lease_expires if leased else None, skips=state.skips,
                        job_id=state.job_id))


def refused(error: ReviewError) -> ClientError:
    return ClientError(STATUS_OF_ERROR.get(error.code, 409), error.code, error.message)


ITEM_ERRORS = {404: {"model": ErrorBody, "description": "no such item (discarded or evicted)"},
               409: {"model": ErrorBody, "description": "the lease is lost (expired and taken) or the item is "
                                                        "labelled already"},
               422: {"model": ErrorBody, "description": "bad body: token, label 0-9"}}


# ------------------------------------------------------------------ routes


@router.get("", response_model=QueueCounts, summary="The review queue's counts and bounds")
async def counts(queue: QueueDep, settings: SettingsDep) -> QueueCounts:
    found = await asyncio.to_thread(queue.counts)
    return QueueCounts(**found, max_items=queue.max_items, max_bytes=queue.max_bytes,
                       capture=settings.review_capture, threshold=settings.review_threshold,
                       sample=settings.review_sample)


@router.post("/lease", response_model=Lease, summary="Lease the next unlabelled items (no other reviewer gets them)",
             responses={422: {"model": ErrorBody, "description": "bad count or reviewer"}})
async def lease(body: LeaseRequest, queue: QueueDep) -> Lease:
    token, expires, items = await asyncio.to_thread(queue.lease, body.reviewer, body.count)
    return Lease(token=token, expires=expires, items=[item_out(item) for item in items])


@router.get("/items", response_model=list[ItemOut], summary="Items, newest first")
async def list_items(queue: QueueDep,
                     status: Annotated[Literal["all", "pending", "labelled", "leased"], Query()] = "all",
                     limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[ItemOut]:
    await asyncio.to_thread(queue.import_feedback)
    return [item_out(item) for item in await asyncio.to_thread(queue.items, status, limit)]


@router.get("/items/{item_id}", response_model=ItemOut, summary="One item",
            responses={404: ITEM_ERRORS[404]})
async def get_item(item_id: ItemId, queue: QueueDep) -> ItemOut:
    try:
        return item_out(await asyncio.to_thread(queue.get, item_id))
    except ReviewError as error:
        raise refused(error) from None


@router.get("/items/{item_id}/original", summary="The upload itself, when DIGITS_REVIEW_KEEP_ORIGINAL kept it",
            response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}},
                       404: {"model": ErrorBody, "description": "no such item, or its upload was not kept"}})
async def get_original(item_id: ItemId, queue: QueueDep) -> Response:
    try:
        data = await asyncio.to_thread(queue.original, item_id)
    except ReviewError as error:
        raise refused(error) from None
    if data is None:
        raise ClientError(404, "no_original", f"item {item_id}'s upload was not kept (DIGITS_REVIEW_KEEP_ORIGINAL)")
    return Response(data, media_type="application/octet-stream")


@router.post("/items/{item_id}/label", response_model=ItemState, summary="Label a leased item (once)",
             responses=ITEM_ERRORS)
async def label_item(item_id: ItemId, body: LabelBody, queue: QueueDep) -> ItemState:
    try:
        state = await asyncio.to_thread(queue.label, item_id, body.token, body.label)
    except ReviewError as error:
        raise refused(error) from None
    return ItemState(label=state.label, labelled_at=state.labelled_at, reviewer=state.reviewer, skips=state.skips)


@router.post("/items/{item_id}/skip", response_model=ItemState,
             summary="Give a leased item back; it comes again after the items skipped less often",
             responses=ITEM_ERRORS)
async def skip_item(item_id: ItemId, body: TokenBody, queue: QueueDep) -> ItemState:
    try:
        state = await asyncio.to_thread(queue.skip, item_id, body.token)
    except ReviewError as error:
        raise refused(error) from None
    return ItemState(skips=state.skips)


@router.post("/items/{item_id}/discard", status_code=204, response_class=Response,
             summary="Remove a leased item (not a digit, or not to be kept)", responses=ITEM_ERRORS)
async def discard_item(item_id: ItemId, body: TokenBody, queue: QueueDep) -> Response:
    try:
        await asyncio.to_thread(queue.discard, item_id, body.token)
    except ReviewError as error:
        raise refused(error) from None
    return Response(status_code=204)


async def finetune_on_reviewed(queue: ReviewQueue, jobs: JobStore, options: FinetuneOptions,
                               settings: Settings) -> JobAccepted:
    """A job of source ``review`` on every labelled item no job has used yet (marked with it)."""
    ahead = 0

    def create(job_id: str, images, labels) -> None:
        nonlocal ahead
        _, ahead = jobs.create(images, labels, options, "review", settings.finetune_max_queued, job_id)

    try:
        job_id, count = await asyncio.to_thread(queue.take_for_job, create, settings.finetune_max_samples)
    except ReviewError as error:
        raise refused(error) from None
    except QueueFull as full:
        raise ClientError(429, "queue_full",
                          f"{full.args[0]} fine-tune jobs are queued or running (DIGITS_FINETUNE_MAX_QUEUED="
                          f"{settings.finetune_max_queued}); retry when one has finished",
                          headers={"Retry-After": str(QUEUE_FULL_RETRY_SECONDS)}) from None
    return JobAccepted(job_id=job_id, status_url=f"/admin/jobs/{job_id}", state=JobState.QUEUED, queued_behind=ahead,
                       message=f"{count} reviewed item(s); queued behind {ahead} job(s)")


@router.post("/finetune", status_code=202, response_model=JobAccepted,
             summary="Fine-tune on the reviewed items no job has used yet (the ordinary job path and gate)",
             responses={422: {"model": ErrorBody, "description": "no unused labelled item, or a bad option"},
                        429: {"model": ErrorBody, "description": "the job queue is full (see Retry-After)"}})
async def finetune(queue: QueueDep, jobs: JobsDep, settings: SettingsDep,
                   options: FinetuneOptions | None = None) -> JobAccepted:
    return await finetune_on_reviewed(queue, jobs, options or FinetuneOptions(), settings)


@console.get("/admin", response_class=HTMLResponse, include_in_schema=False)
async def console_page() -> HTMLResponse:
    """The admin console (static; its calls carry the admin token the operator enters)."""
    return HTMLResponse(CONSOLE)
