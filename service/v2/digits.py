"""The ``digits`` model as the V2 protocol sees it: its tensors, metadata, Triton-style config,
and the checks and conversions every transport (REST, gRPC) shares.

Inputs, one of: ``image`` BYTES [-1] (encoded image files, preprocessed exactly as /predict
does) or ``pixels`` UINT8 [-1,28,28] (MNIST-style, white on black). Outputs: ``probabilities``
FP32 [-1,10] and ``digit`` INT64 [-1].
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path

import numpy as np
from fastapi import FastAPI

from model.registry import open_registry
from service.http.errors import echo
from service.http.inputs import digit_from_bytes_async
from service.inference import readiness
from service.inference.predictor import Prediction, Predictor
from service.settings import Settings
from service.v2.errors import ProtocolError, as_protocol_error, bad_request
from service.v2.schemas import ModelMetadata, ServerMetadata, TensorMetadata

MODEL_NAME = "digits"
SERVER_NAME = "digit-service"
PLATFORM = "digit-service"
EXTENSIONS = ["binary_tensor_data", "model_configuration"]
SIDE = 28


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]

    def metadata(self) -> TensorMetadata:
        return TensorMetadata(name=self.name, datatype=self.datatype, shape=list(self.shape))


IMAGE = TensorSpec("image", "BYTES", (-1,))
PIXELS = TensorSpec("pixels", "UINT8", (-1, SIDE, SIDE))
PROBABILITIES = TensorSpec("probabilities", "FP32", (-1, 10))
DIGIT = TensorSpec("digit", "INT64", (-1,))
INPUTS = {spec.name: spec for spec in (IMAGE, PIXELS)}
OUTPUTS = {spec.name: spec for spec in (PROBABILITIES, DIGIT)}
INPUT_CHOICES = "'image' (BYTES [-1], encoded image files) or 'pixels' (UINT8 [-1,28,28])"


def max_batch(settings: Settings) -> int:
    """Most images in one V2 request: four full batches of the batching path."""
    return settings.max_batch_size * 4


@functools.cache
def server_metadata() -> ServerMetadata:
    return ServerMetadata(name=SERVER_NAME, version=package_version("digit-service"), extensions=EXTENSIONS)


def metadata_for(app: FastAPI, served: str) -> ModelMetadata:
    """The model's metadata: the versions its holders serve now (``served`` before any has said)."""
    return model_metadata(readiness.report(app)["serving_versions"] or [served])


def model_metadata(serving_versions: list[str]) -> ModelMetadata:
    """``versions``: what this server's model holders serve now (two only while a swap converges)."""
    return ModelMetadata(
        name=MODEL_NAME, versions=serving_versions, platform=PLATFORM,
        inputs=[spec.metadata() for spec in INPUTS.values()],
        outputs=[spec.metadata() for spec in OUTPUTS.values()],
    )


def model_config(settings: Settings) -> dict:
    """Triton's model-config shape: dims exclude the batch dimension; a per-item scalar is
    dims [1] reshaped to []."""
    scalar = {"dims": [1], "reshape": {"shape": []}}
    return {
        "name": MODEL_NAME,
        "platform": PLATFORM,
        "max_batch_size": max_batch(settings),
        "input": [
            {"name": IMAGE.name, "data_type": "TYPE_STRING", "format": "FORMAT_NONE", **scalar},
            {"name": PIXELS.name, "data_type": "TYPE_UINT8", "format": "FORMAT_NONE", "dims": [SIDE, SIDE]},
        ],
        "output": [
            {"name": PROBABILITIES.name, "data_type": "TYPE_FP32", "dims": [10]},
            {"name": DIGIT.name, "data_type": "TYPE_INT64", **scalar},
        ],
        "dynamic_batching": {
            "preferred_batch_size": settings.buckets(),
            "max_queue_delay_microseconds": round(settings.batch_timeout * 1e6),
        },
    }


def check_model(name: str) -> None:
    if name != MODEL_NAME:
        raise ProtocolError(404, f"unknown model {echo(name)}; this server serves '{MODEL_NAME}'")


def served_version(predictor: Predictor, registry_root: Path, model_name: str, version: str = "") -> str:
    """The version that answers now, after checking the model name and a requested version. A
    worker-backed predictor learns its version from its first answer; until then, ACTIVE says."""
    check_model(model_name)
    served = predictor.model_version or open_registry(registry_root).active_version() or ""
    check_version(version, served, registry_root)
    return served


def check_version(version: str, served: str, registry_root: Path) -> None:
    """No version, the served one or a canary's passes; another version in the registry is 400
    (not served); any other 404."""
    if not version or version == served:
        return
    registry = open_registry(registry_root)
    canary = registry.canary()
    if canary is not None and version == canary.version:
        return
    if registry.exists(version):
        raise bad_request(f"version {echo(version)} of model '{MODEL_NAME}' is not served; the served version is "
                          f"'{served}' (activate another with POST /admin/models/{{version}}/activate)")
    raise ProtocolError(404, f"model '{MODEL_NAME}' has no version {echo(version)}; the served version is '{served}'")


def check_input(inputs: list[TensorSpec], limit: int) -> tuple[TensorSpec, int]:
    """The model's spec of the request's one input (name, datatype and shape checked), and the batch size."""
    names = [spec.name for spec in inputs]
    unknown = [name for name in names if name not in INPUTS]
    if unknown:
        raise bad_request(f"unknown input {echo(unknown[0])}; model '{MODEL_NAME}' takes {INPUT_CHOICES}")
    if len(inputs) != 1:
        if not inputs:
            raise bad_request(f"the request has no input; send {INPUT_CHOICES}")
        raise bad_request(f"send one input, either 'image' or 'pixels', not {len(names):,}: {echo(names)}")
    spec = inputs[0]
    expected = INPUTS[spec.name]
    if spec.datatype != expected.datatype:
        raise bad_request(f"input '{spec.name}' must be {expected.datatype}, not {echo(spec.datatype)}")
    if len(spec.shape) != len(expected.shape) or list(spec.shape[1:]) != list(expected.shape[1:]):
        want = "[n]" if expected is IMAGE else "[n,28,28]"
        raise bad_request(f"input '{spec.name}' must have shape {want}, not {echo(list(spec.shape))}")
    batch = spec.shape[0]
    if batch < 1:
        raise bad_request(f"input '{spec.name}' must hold at least one image, not {batch}")
    if batch > limit:
        raise bad_request(f"input '{spec.name}' holds {batch} images; at most {limit} fit in one request "
                          f"(DIGITS_MAX_BATCH_SIZE x 4); split the batch")
    return expected, batch


def check_outputs(names: list[str] | None) -> list[TensorSpec]:
    """The outputs to answer with: those requested (in request order), or all."""
    if names is None:
        return list(OUTPUTS.values())
    unknown = [name for name in names if name not in OUTPUTS]
    if unknown:
        raise bad_request(f"unknown output {echo(unknown[0])}; model '{MODEL_NAME}' gives "
                          f"'probabilities' (FP32 [-1,10]) and 'digit' (INT64 [-1])")
    if len(set(names)) != len(names):
        raise bad_request("each output may be requested once")
    return [OUTPUTS[name] for name in names]


async def pixels_from_images(images: list[bytes], max_pixels: int) -> np.ndarray:
    """Encoded images -> uint8 [n,28,28], through the same preprocessing as /predict."""
    digits = []
    for index, data in enumerate(images):
        with as_protocol_error(f"input 'image' element {index}: ", status=400):
            digits.append(await digit_from_bytes_async(data, max_pixels))
    return np.stack(digits)


def pixel_count(batch: int) -> int:
    return batch * SIDE * SIDE


def pixels_from_array(values: np.ndarray, batch: int) -> np.ndarray:
    return values.reshape(batch, SIDE, SIDE)


async def predict(predictor: Predictor, pixels: np.ndarray, version: str = "") -> Prediction:
    """The predictor's answer (by the requested ``version``, checked by ``served_version``, if
    any); an HTTP error it raises (e.g. 503 while unavailable) keeps its status."""
    with as_protocol_error():
        return await predictor.predict(pixels, version or None)


def output_arrays(probabilities: np.ndarray, outputs: list[TensorSpec]) -> list[tuple[TensorSpec, np.ndarray]]:
    arrays = {
        PROBABILITIES.name: np.asarray(probabilities, dtype=np.float32),
        DIGIT.name: np.argmax(probabilities, axis=1).astype(np.int64),
    }
    return [(spec, arrays[spec.name]) for spec in outputs]
