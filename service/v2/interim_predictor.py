"""INTERIM, until main has service/predictor.py: an in-process ONNX Runtime predictor with the
contract's shape (``async predict``, ``ready()``, ``model_version``), set on app.state only
where the server has not set one. To be deleted when the lead's predictor lands."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from fastapi import FastAPI

from model.registry import Registry
from service.runtimes import OnnxRuntime, open_onnx
from service.settings import Settings


@dataclass(frozen=True)
class Prediction:
    probabilities: np.ndarray
    model_version: str
    runtime: str


class InProcessOnnxPredictor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = Registry(settings.registry)
        self.marker = None
        self.runtime: OnnxRuntime | None = None
        self._swap_if_activated()

    @property
    def model_version(self) -> str:
        self._swap_if_activated()
        return self.runtime.version

    def ready(self) -> bool:
        return self.runtime is not None

    def _swap_if_activated(self) -> None:
        marker = self.registry.active_marker()
        if marker != self.marker:
            version = self.registry.active_version()
            if self.runtime is None or version != self.runtime.version:
                self.runtime = open_onnx(self.registry, version, 1, "cpu", self.settings.data_dir)
            self.marker = marker

    async def predict(self, pixels: np.ndarray) -> Prediction:
        self._swap_if_activated()
        runtime = self.runtime
        return Prediction(runtime.probabilities(pixels).astype(np.float32), runtime.version, runtime.name)


def ensure_predictor(app: FastAPI, settings: Settings) -> None:
    if getattr(app.state, "predictor", None) is None:
        app.state.predictor = InProcessOnnxPredictor(settings)
