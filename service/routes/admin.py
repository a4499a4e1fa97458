"""Admin API: fine-tune jobs, model versions, activate/rollback, behind the admin bearer token.

These routes run in the API-server processes and never touch the model they may hold: they
validate uploads, write jobs and samples to the registry, and move the ACTIVE pointer. The
trainer process runs the jobs; every model holder (the API servers on CPU, the inference
workers otherwise) notices a new ACTIVE by itself.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import ValidationError

from model.finetune_options import FinetuneOptions
from model.registry import RECORD_ID, VERSION_ID, RegistryError
from service.finetune.archives import ArchiveLimits, read_image_folder
from service.finetune.feedback_store import FeedbackStore
from service.finetune.jobs import JobFinished, JobRecord, JobState, QueueFull
from service.http.auth import require_admin
from service.http.bodies import Form, decode_base64, read_body
from service.http.errors import ClientError, echo, validation_detail
from service.http.inputs import digit_from_bytes
from service.http.labels import parse_label
from service.inference import readiness
from service.routes import review
from service.routes.schemas import ActivateResponse, ErrorBody, FinetuneJSON, JobAccepted, ModelEntry, inline_schema
from service.routes.stores import FeedbackStoreDep, JobsDep, RegistryDep, SettingsDep
from service.settings import Settings

OPTION_FIELDS = tuple(FinetuneOptions.model_fields)
Named = list[tuple[str, int, bytes]]  # (sample name, label, image bytes)
JobId = Annotated[str, Path(pattern=RECORD_ID, description="a job id, like 20260101120000a1b2c3d4")]
Version = Annotated[str, Path(pattern=VERSION_ID, description="a version id, like v0001")]
ACTIVATE_POLL_SECONDS = 0.05
QUEUE_FULL_RETRY_SECONDS = 30  # about one fine-tune of a few hundred samples here

router = APIRouter(
    prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)],
    responses={401: {"model": ErrorBody, "description": "no admin token, or a wrong one"},
               403: {"model": ErrorBody, "description": "admin disabled: no token configured"}},
)

# ------------------------------------------------------------------ fine-tune uploads

MULTIPART_FORM = {
    "type": "object",
    "description": "either an `archive`, or `files` with one label each in `labels`; plus any option",
    "properties": {
        "archive": {"type": "string", "format": "binary", "description": ".zip/.tar.gz, <label>/<name>.png"},
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "labels": {"type": "string", "description": "one digit per file, comma-separated (or one field each)"},
        **{name: {"type": "string", "description": f"option {name} (see the JSON form)"} for name in OPTION_FIELDS},
    },
}


def decode_samples(named: Named, max_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """Every sample through the same preprocessing as /predict; the first bad one is named."""
    images = np.empty((len(named), 28, 28), dtype=np.uint8)
    for index, (name, _, data) in enumerate(named):
        images[index] = digit_from_bytes(data, max_pixels, f"sample {index} ({echo(name)})")
    return images, np.array([label for _, label, _ in named], dtype=np.int64)


def options_from_form(form: Form) -> FinetuneOptions:
    values = {name: form.field(name) for name in OPTION_FIELDS if form.field(name) not in (None, "")}
    try:
        return FinetuneOptions.model_validate(values)
    except ValidationError as exc:
        raise ClientError(422, "invalid_options", validation_detail(exc.errors(include_input=False))) from None


async def samples_from_form(form: Form, settings: Settings) -> Named:
    archive = form.file("archive")
    if archive is not None:
        limits = ArchiveLimits(settings.finetune_max_samples, settings.finetune_max_archive_bytes)
        return await asyncio.to_thread(read_image_folder, archive.data, archive.filename, limits)  # off the loop
    files = form.files("files")
    labels = [part.strip() for value in form.fields("labels") for part in value.split(",") if part.strip()]
    if not files:
        raise ClientError(422, "missing_samples",
                          "send an 'archive' (.zip/.tar.gz, <label>/<name>.png) or 'files' with 'labels'")
    if len(labels) != len(files):
        raise ClientError(422, "label_count_mismatch", f"{len(files)} files but {len(labels)} labels")
    named = []
    for index, (upload, label) in enumerate(zip(files, labels, strict=True)):
        name = upload.filename or f"file {index}"
        named.append((name, parse_label(label, f"labels[{index}] (of {echo(name)})"), upload.data))
    return named


def samples_from_json(payload: FinetuneJSON) -> Named | None:
    """The inline samples, or None for ``source: feedback`` and ``source: review``."""
    if payload.source in ("feedback", "review"):
        if payload.samples:
            raise ClientError(422, "samples_with_source",
                              f"'samples' and 'source': '{payload.source}' exclude each other: send one of them")
        return None
    if not payload.samples:
        raise ClientError(422, "missing_samples", "send 'samples': [{image, label}, ...] or 'source': 'feedback'")
    return [(f"samples[{i}]", s.label, decode_base64(s.image, f"samples[{i}].image"))
            for i, s in enumerate(payload.samples)]


async def read_upload(request: Request, settings: Settings) -> tuple[Named | None, FinetuneOptions, str]:
    """(samples or None for feedback, options, source) from a multipart or JSON body."""
    body = await read_body(request, FinetuneJSON, max_parts=2 * settings.finetune_max_samples + len(OPTION_FIELDS) + 1,
                           expected="multipart/form-data (archive, or files + labels) or application/json")
    if isinstance(body, Form):
        options = options_from_form(body)
        return await samples_from_form(body, settings), options, "upload"
    options = FinetuneOptions.model_validate(body.model_dump(include=set(OPTION_FIELDS)))
    return samples_from_json(body), options, body.source


async def training_data(named: Named | None, settings: Settings,
                        feedback: FeedbackStore) -> tuple[np.ndarray, np.ndarray]:
    """The upload's samples decoded (every one checked), or the stored feedback; never more than
    a fine-tune takes. (An upload with no samples was refused while it was read.)"""
    limit = settings.finetune_max_samples
    if named is None:
        images, labels = await asyncio.to_thread(feedback.load_all)
        if len(labels) == 0:
            raise ClientError(422, "no_feedback", "no feedback has been collected yet; POST /feedback first")
        if len(labels) > limit:
            raise ClientError(413, "too_many_samples", f"the feedback store holds {len(labels):,} samples; a "
                              f"fine-tune takes at most {limit:,} (DIGITS_FINETUNE_MAX_SAMPLES)")
        return images, labels
    if len(named) > limit:
        raise ClientError(413, "too_many_samples", f"{len(named):,} samples; the limit is {limit:,}")
    return await asyncio.to_thread(decode_samples, named, settings.max_pixels)


@router.post(
    "/finetune", status_code=202, response_model=JobAccepted,
    summary="Fine-tune the live model on labelled samples (runs in the background)",
    openapi_extra={"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": MULTIPART_FORM},
        "application/json": {"schema": inline_schema(FinetuneJSON)}}}},
    responses={413: {"model": ErrorBody, "description": "body, archive or sample count over the limit"},
               429: {"model": ErrorBody, "description": "the job queue is full (Retry-After says when to retry)"},
               415: {"model": ErrorBody, "description": "not multipart or JSON; not a zip/tar.gz; not an image"},
               422: {"model": ErrorBody, "description": "bad label, option, sample, archive layout or base64"}},
)
async def submit_finetune(request: Request, settings: SettingsDep, jobs: JobsDep,
                          feedback: FeedbackStoreDep) -> JobAccepted:
    named, options, source = await read_upload(request, settings)
    if source == "review":
        return await review.finetune_on_reviewed(review.get_queue(jobs.registry, settings), jobs, options, settings)
    images, labels = await training_data(named, settings, feedback)
    try:
        record, ahead = await asyncio.to_thread(jobs.create, images, labels, options, source,
                                                settings.finetune_max_queued)
    except QueueFull as full:
        raise ClientError(429, "queue_full",
                          f"{full.args[0]} fine-tune jobs are queued or running (DIGITS_FINETUNE_MAX_QUEUED="
                          f"{settings.finetune_max_queued}); retry when one has finished",
                          headers={"Retry-After": str(QUEUE_FULL_RETRY_SECONDS)}) from None
    message = (f"queued behind {ahead} job(s); one job trains at a time" if ahead
               else "queued; training starts within a second")
    return JobAccepted(job_id=record.job_id, status_url=f"/admin/jobs/{record.job_id}", state=record.state,
                       queued_behind=ahead, message=message)


# ------------------------------------------------------------------ jobs and versions


@router.get("/jobs", response_model=list[JobRecord], summary="All fine-tune jobs, oldest first")
async def list_jobs(jobs: JobsDep) -> list[JobRecord]:
    return jobs.all()


@router.get("/jobs/{job_id}", response_model=JobRecord, summary="One job: state, progress, metrics",
            responses={404: {"model": ErrorBody, "description": "no such job"}})
async def get_job(job_id: JobId, jobs: JobsDep) -> JobRecord:
    try:
        return jobs.get(job_id)
    except KeyError:
        raise ClientError(404, "unknown_job", f"no job {job_id!r}") from None


@router.delete("/jobs/{job_id}", response_model=JobRecord,
               summary="Cancel a job: a queued one at once, a running one at its next batch; nothing is published",
               responses={202: {"model": JobRecord, "description": "running: it stops at the next batch"},
                          404: {"model": ErrorBody, "description": "no such job"},
                          409: {"model": ErrorBody, "description": "the job has finished already"}})
async def cancel_job(job_id: JobId, jobs: JobsDep) -> JSONResponse:
    try:
        record = await asyncio.to_thread(jobs.cancel, job_id)
    except KeyError:
        raise ClientError(404, "unknown_job", f"no job {job_id!r}") from None
    except JobFinished as finished:
        raise ClientError(409, "job_finished", f"job {job_id} has finished ({finished.args[0]})") from None
    return JSONResponse(record.model_dump(mode="json"), status_code=202 if record.state == JobState.RUNNING else 200)


@router.get("/models", response_model=list[ModelEntry], summary="Published versions; which is active")
async def list_models(registry: RegistryDep) -> list[ModelEntry]:
    active = registry.active_version()
    return [ModelEntry(version=m.version, arch=m.arch, parent=m.parent, created=m.created,
                       active=m.version == active, job_id=m.job_id,
                       metrics={k: v for k, v in m.metrics.items() if k != "history"})
            for m in registry.list_versions()]


@router.get("/models/{version}/plots/{name}", response_class=FileResponse,
            summary="A version's plots: training curves, confusion matrix (when its publisher drew them)",
            responses={200: {"content": {"image/png": {}}},
                       404: {"model": ErrorBody, "description": "no such version, or it has no such plot"}})
async def version_plot(version: Version, name: Literal["training.png", "confusion.png"],
                       registry: RegistryDep) -> FileResponse:
    path = registry.version_dir(version) / name
    if not registry.exists(version) or not path.is_file():
        raise ClientError(404, "no_plot", f"{version} has no {name}")
    return FileResponse(path, media_type="image/png")


@router.post("/models/{version}/activate", response_model=ActivateResponse,
             summary="Roll back or forward; answers once every model holder of this server serves the version",
             responses={202: {"model": ActivateResponse,
                              "description": "activated, but some holders still serve another version after "
                                             "DIGITS_ACTIVATE_WAIT_SECONDS (named in `behind`)"},
                        404: {"model": ErrorBody, "description": "no such version"}})
async def activate(version: Version, request: Request, registry: RegistryDep,
                   settings: SettingsDep) -> JSONResponse:
    previous = registry.active_version()
    try:
        await asyncio.to_thread(registry.activate, version)
    except RegistryError as exc:
        raise ClientError(404, "unknown_version", str(exc)) from None
    return await converged_on(request, version, previous, settings)


async def converged_on(request: Request, version: str, previous: str | None, settings: Settings) -> JSONResponse:
    """The answer to an activation: 200 once every model holder of this server serves ``version``,
    202 naming those behind after DIGITS_ACTIVATE_WAIT_SECONDS."""
    started = time.monotonic()
    deadline = started + settings.activate_wait_seconds
    while ((behind := readiness.behind(await asyncio.to_thread(readiness.report, request.app), version))
           and time.monotonic() < deadline):  # file reads: off the loop
        await asyncio.sleep(ACTIVATE_POLL_SECONDS)
    body = ActivateResponse(active=version, previous=previous, converged=not behind, behind=behind,
                            waited_seconds=round(time.monotonic() - started, 3))
    return JSONResponse(body.model_dump(), status_code=202 if behind else 200)
