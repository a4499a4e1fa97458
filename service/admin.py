"""Admin API: fine-tune jobs, model versions, activate/rollback, bearer-token auth.

These routes run in the API-server processes, which hold no model: they validate uploads,
write jobs and samples to the registry, and move the ACTIVE pointer. The trainer process
runs the jobs; the inference workers notice new versions by themselves.
"""

from __future__ import annotations

import asyncio
import hmac

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from model.preprocess import ImageProblem, prepare_digit
from model.registry import Registry, RegistryError
from service.archives import ArchiveLimits, read_image_folder
from service.feedback import FeedbackStore, install_feedback_route, parse_label
from service.inputs import ClientError, decode_base64, media_type, parse_json, read_form, validation_detail
from service.jobs import JobStore
from service.schemas import ActivateResponse, FinetuneJSON, FinetuneOptions, JobAccepted, JobRecord, ModelEntry
from service.settings import Settings

OPTION_FIELDS = tuple(FinetuneOptions.model_fields)


def require_admin(request: Request) -> None:
    """Bearer token, compared in constant time; 403 when no token is configured at all."""
    expected = request.app.state.settings.admin_token_value()
    if not expected:
        raise ClientError(403, "admin_disabled",
                          "admin routes are disabled: set DIGITS_ADMIN_TOKEN (or DIGITS_ADMIN_TOKEN_FILE) "
                          "and restart the service")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ClientError(401, "missing_token", "send 'Authorization: Bearer <admin token>'")
    if not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise ClientError(401, "invalid_token", "the admin token is not valid")


def decode_samples(named: list[tuple[str, int, bytes]], max_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """Every sample through the same preprocessing as /predict; the first bad one is named."""
    images = np.empty((len(named), 28, 28), dtype=np.uint8)
    for index, (name, _, data) in enumerate(named):
        try:
            images[index] = prepare_digit(data, max_pixels)
        except ImageProblem as exc:
            raise ClientError(exc.status_code, exc.code, f"sample {index} ({name}): {exc.message}") from None
    return images, np.array([label for _, label, _ in named], dtype=np.int64)


def options_from_form(form) -> FinetuneOptions:
    values = {name: form.get(name) for name in OPTION_FIELDS if form.get(name) not in (None, "")}
    try:
        return FinetuneOptions.model_validate(values)
    except ValidationError as exc:
        raise ClientError(422, "invalid_options", validation_detail(exc)) from None


async def samples_from_multipart(request: Request, settings: Settings):
    form = await read_form(request, settings.finetune_max_body_bytes, max_files=settings.finetune_max_samples + 1)
    options = options_from_form(form)
    archive = form.get("archive")
    if isinstance(archive, UploadFile):
        limits = ArchiveLimits(settings.finetune_max_samples, settings.finetune_max_archive_bytes)
        named = read_image_folder(await archive.read(), archive.filename or "", limits)
        return named, options
    files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
    raw_labels = [str(v) for v in form.getlist("labels")]
    labels = [part for value in raw_labels for part in value.split(",") if part.strip()]
    if not files:
        raise ClientError(422, "missing_samples",
                          "send an 'archive' (.zip/.tar.gz, <label>/<name>.png) or 'files' with 'labels'")
    if len(labels) != len(files):
        raise ClientError(422, "label_count_mismatch", f"{len(files)} files but {len(labels)} labels")
    named = []
    for index, (upload, label) in enumerate(zip(files, labels, strict=True)):
        name = upload.filename or f"file {index}"
        named.append((name, parse_label(label, f"label of sample {index} ({name})"), await upload.read()))
    return named, options


def samples_from_json(payload: FinetuneJSON):
    if payload.source == "feedback":
        return None
    if not payload.samples:
        raise ClientError(422, "missing_samples", "send 'samples': [{image, label}, ...] or 'source': 'feedback'")
    return [(f"samples[{i}]", s.label, decode_base64(s.image, f"samples[{i}].image"))
            for i, s in enumerate(payload.samples)]


def install_admin_routes(app: FastAPI, settings: Settings) -> None:
    registry = Registry(settings.registry)
    jobs = JobStore(registry)
    feedback = FeedbackStore(registry)
    install_feedback_route(app, registry)
    router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])

    @router.post("/finetune", status_code=202, response_model=JobAccepted,
                 summary="Fine-tune the live model on labelled samples (runs in the background)")
    async def submit_finetune(request: Request) -> JobAccepted:
        kind = media_type(request)
        if kind == "multipart/form-data":
            named, options = await samples_from_multipart(request, settings)
            source = "upload"
        elif kind == "application/json" or kind.endswith("+json"):
            payload = parse_json(await request.body(), FinetuneJSON)
            options = FinetuneOptions.model_validate(payload.model_dump(include=set(OPTION_FIELDS)))
            named, source = samples_from_json(payload), payload.source
        else:
            raise ClientError(415, "unsupported_media_type", "send multipart/form-data or application/json")
        if named is None:
            images, labels = await asyncio.to_thread(feedback.load_all)
            if len(labels) == 0:
                raise ClientError(422, "no_feedback", "no feedback has been collected yet; POST /feedback first")
        else:
            if len(named) > settings.finetune_max_samples:
                raise ClientError(413, "too_many_samples",
                                  f"{len(named):,} samples; the limit is {settings.finetune_max_samples:,}")
            images, labels = await asyncio.to_thread(decode_samples, named, settings.max_pixels)
        if not 1 <= len(labels) <= settings.finetune_max_samples:
            raise ClientError(422, "sample_count", f"send 1 to {settings.finetune_max_samples:,} samples")
        ahead = jobs.pending_count()
        record = await asyncio.to_thread(jobs.create, images, labels, options, source)
        message = (f"queued behind {ahead} job(s); one job trains at a time" if ahead
                   else "queued; training starts within a second")
        return JobAccepted(job_id=record.job_id, status_url=f"/admin/jobs/{record.job_id}", state=record.state,
                           queued_behind=ahead, message=message)

    @router.get("/jobs", response_model=list[JobRecord], summary="All fine-tune jobs, oldest first")
    async def list_jobs() -> list[JobRecord]:
        return jobs.all()

    @router.get("/jobs/{job_id}", response_model=JobRecord, summary="One job: state, progress, metrics")
    async def get_job(job_id: str) -> JobRecord:
        try:
            return jobs.get(job_id)
        except KeyError:
            raise ClientError(404, "unknown_job", f"no job {job_id!r}") from None

    @router.get("/models", response_model=list[ModelEntry], summary="Published versions; which is active")
    async def list_models() -> list[ModelEntry]:
        active = registry.active_version()
        return [ModelEntry(version=m.version, arch=m.arch, parent=m.parent, created=m.created,
                           active=m.version == active, job_id=m.job_id,
                           metrics={k: v for k, v in m.metrics.items() if k != "history"})
                for m in registry.list_versions()]

    @router.post("/models/{version}/activate", response_model=ActivateResponse,
                 summary="Roll back or forward: every worker serves this version within seconds")
    async def activate(version: str) -> ActivateResponse:
        previous = registry.active_version()
        try:
            await asyncio.to_thread(registry.activate, version)
        except RegistryError as exc:
            raise ClientError(404, "unknown_version", str(exc)) from None
        return ActivateResponse(active=version, previous=previous)

    app.include_router(router)
