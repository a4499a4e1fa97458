"""Request and response models: what /docs shows and what every endpoint validates against."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from model.finetune import FinetuneOptions


class PredictJSON(BaseModel):
    """JSON body of POST /predict. ``image`` may be a bare base64 string or a data URL
    (``data:image/png;base64,...``, what a canvas's ``toDataURL()`` gives)."""

    model_config = ConfigDict(extra="forbid")
    image: str = Field(..., min_length=1, description="base64-encoded PNG/JPEG/BMP/GIF/WebP/TIFF")


class PredictResponse(BaseModel):
    digit: int = Field(..., ge=0, le=9)
    confidence: float = Field(..., ge=0, le=1, description="probability of the predicted digit")
    probabilities: list[float] = Field(..., min_length=10, max_length=10)
    model_version: str
    runtime: str = Field(..., description="torch-compile or onnxruntime")
    request_id: str


class ErrorBody(BaseModel):
    error: str = Field(..., description="machine-readable problem code")
    detail: str | list = Field(..., description="what is wrong and how to fix it")
    request_id: str | None = None


class FeedbackResponse(BaseModel):
    stored: str = Field(..., description="id of the stored sample")
    label: int
    feedback_samples: int = Field(..., description="feedback samples collected so far")


class FinetuneSampleJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str = Field(..., min_length=1, description="base64 image or data URL")
    label: int = Field(..., ge=0, le=9)


class FinetuneJSON(FinetuneOptions):
    """JSON body of POST /admin/finetune: inline samples, or ``source: feedback``."""

    samples: list[FinetuneSampleJSON] | None = None
    source: Literal["upload", "feedback"] = "upload"


class JobAccepted(BaseModel):
    job_id: str
    status_url: str
    state: str
    queued_behind: int = Field(..., description="jobs ahead of this one")
    message: str


class JobRecord(BaseModel):
    job_id: str
    state: Literal["queued", "running", "succeeded", "rejected", "failed"]
    created: float
    updated: float
    samples: int
    source: str
    options: FinetuneOptions
    parent_version: str | None = None
    produced_version: str | None = None
    progress: dict = Field(default_factory=dict, description="epoch, epochs, loss")
    metrics_before: dict = Field(default_factory=dict)
    metrics_after: dict = Field(default_factory=dict)
    message: str = ""


class ModelEntry(BaseModel):
    version: str
    arch: str
    parent: str | None
    created: float
    active: bool
    job_id: str | None
    metrics: dict


class ActivateResponse(BaseModel):
    active: str
    previous: str | None
