"""Request and response models: what /docs shows and what every endpoint validates against."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from model.finetune_options import FinetuneOptions
from model.registry import VERSION_ID
from service.finetune.jobs import JobState
from service.http.labels import Label


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
    input_png: str | None = Field(
        None, description="with ?explain=true: base64 PNG of the 28x28 digit the model was given (white on black)"
    )


class ErrorBody(BaseModel):
    error: str = Field(..., description="machine-readable problem code")
    detail: str | list = Field(..., description="what is wrong and how to fix it")
    request_id: str | None = None


class FeedbackResponse(BaseModel):
    stored: str = Field(..., description="id of the stored sample")
    label: int
    model_version: str | None = Field(None, description="the version this corrects, as the request named it")
    feedback_samples: int = Field(..., description="feedback samples collected so far")


class LabelledImageJSON(BaseModel):
    """An image with its true digit: one sample of a fine-tune (and POST /feedback's body, as FeedbackJSON)."""

    model_config = ConfigDict(extra="forbid")
    image: str = Field(..., min_length=1, description="base64 (standard or url-safe) image or data URL")
    label: Label


class FeedbackJSON(LabelledImageJSON):
    """The JSON body of POST /feedback: a labelled image and, optionally, the version it corrects."""

    model_version: str | None = Field(
        None, pattern=VERSION_ID,
        description="the `model_version` of the answer this corrects (from the /predict response): it counts "
                    "toward that version's feedback rate, which GET /admin/canary compares between live and canary")


class FinetuneJSON(FinetuneOptions):
    """JSON body of POST /admin/finetune: inline samples, ``source: feedback`` (the stored corrections) or
    ``source: review`` (the review queue's labelled items no job has used yet)."""

    samples: list[LabelledImageJSON] | None = None
    source: Literal["upload", "feedback", "review"] = "upload"


class JobAccepted(BaseModel):
    job_id: str
    status_url: str
    state: JobState
    queued_behind: int = Field(..., description="jobs ahead of this one")
    message: str


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
    converged: bool = Field(description="every model holder of this server serves `active` (200); false: 202")
    behind: list[str] = Field(description="holders ('role index') not serving `active` when the wait ended")
    waited_seconds: float


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with its ``$defs`` inlined, for an OpenAPI ``requestBody`` written
    by hand (a ``#/$defs/...`` reference would not resolve there)."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(definitions[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return resolve(schema)
