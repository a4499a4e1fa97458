"""User corrections: POST /feedback stores (image, true label) for a later fine-tune."""

from __future__ import annotations

import os
import time
import uuid

import numpy as np
import torch
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from model.registry import Registry
from service.inputs import (
    ClientError,
    decode_base64,
    digit_from_bytes_async,
    media_type,
    parse_json,
    read_form,
)
from service.schemas import FeedbackResponse


class FeedbackJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str = Field(..., min_length=1, description="base64 image or data URL")
    label: int = Field(..., ge=0, le=9, description="the true digit")


class FeedbackStore:
    def __init__(self, registry: Registry) -> None:
        self.directory = registry.feedback_dir

    def add(self, pixels: np.ndarray, label: int) -> str:
        sample_id = time.strftime("%Y%m%d%H%M%S") + uuid.uuid4().hex[:8]
        tmp = self.directory / f".{sample_id}.{os.getpid()}.tmp"
        save_file({"image": torch.from_numpy(np.ascontiguousarray(pixels)),
                   "label": torch.tensor([label], dtype=torch.int64)}, str(tmp))
        os.replace(tmp, self.directory / f"{sample_id}.safetensors")
        return sample_id

    def count(self) -> int:
        return sum(1 for _ in self.directory.glob("*.safetensors"))

    def load_all(self) -> tuple[np.ndarray, np.ndarray]:
        images, labels = [], []
        for path in sorted(self.directory.glob("*.safetensors")):
            tensors = load_file(str(path))
            images.append(tensors["image"].numpy())
            labels.append(int(tensors["label"][0]))
        return np.asarray(images, dtype=np.uint8).reshape(-1, 28, 28), np.asarray(labels, dtype=np.int64)


def parse_label(value: object, where: str = "label") -> int:
    text = str(value).strip()
    if len(text) != 1 or not text.isdigit():
        raise ClientError(422, "invalid_label", f"{where} must be a digit 0-9, got {text[:20]!r}")
    return int(text)


def install_feedback_route(app: FastAPI, registry: Registry) -> None:
    store = FeedbackStore(registry)

    @app.post("/feedback", status_code=201, response_model=FeedbackResponse, tags=["feedback"],
              summary="Correct a prediction: store an image with its true label for fine-tuning",
              openapi_extra={"requestBody": {"required": True, "content": {
                  "multipart/form-data": {"schema": {
                      "type": "object", "required": ["file", "label"],
                      "properties": {"file": {"type": "string", "format": "binary"}, "label": {"type": "integer"}}}},
                  "application/json": {"schema": FeedbackJSON.model_json_schema()}}}})
    async def feedback(request: Request) -> FeedbackResponse:
        settings = request.app.state.settings
        kind = media_type(request)
        if kind == "multipart/form-data":
            form = await read_form(request, settings.max_body_bytes, max_files=4)
            upload, label_field = form.get("file"), form.get("label")
            if upload is None or isinstance(upload, str):
                raise ClientError(422, "missing_file", "the multipart body needs a 'file' field holding the image")
            if label_field is None:
                raise ClientError(422, "missing_label", "the multipart body needs a 'label' field (0-9)")
            label, data = parse_label(label_field), await upload.read()
        elif kind == "application/json" or kind.endswith("+json"):
            payload = parse_json(await request.body(), FeedbackJSON)
            label, data = payload.label, decode_base64(payload.image)
        else:
            raise ClientError(415, "unsupported_media_type",
                              "send multipart/form-data (file, label) or application/json {image, label}")
        pixels = await digit_from_bytes_async(data, settings.max_pixels)
        sample_id = store.add(pixels, label)
        return FeedbackResponse(stored=sample_id, label=label, feedback_samples=store.count())
