"""ONNX export with a parity check against the torch model."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from model.data import MNIST_MEAN, MNIST_STD, normalize

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
PARITY_MAX_ABS_DIFF = 1e-4


class ExportError(RuntimeError):
    pass


def ort_threads() -> int:
    """The CPUs this process may run on (cgroup/affinity aware), for ONNX Runtime's pool."""
    return max(1, len(os.sched_getaffinity(0)))


def ort_session(path: Path, providers: list[str] | None = None, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or ort_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    available = ort.get_available_providers()
    wanted = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return ort.InferenceSession(str(path), sess_options=options, providers=wanted)


def export_onnx(model: nn.Module, path: Path, version: str, arch: str) -> None:
    """Write model.onnx: input ``image`` [batch,1,28,28] normalized float32, output ``logits``."""
    model = model.eval().cpu()
    example = torch.zeros(2, 1, 28, 28)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(
        model,
        (example,),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: batch},),
        dynamo=True,
        verbose=False,
    )
    proto = program.model_proto
    metadata = {
        "version": version,
        "arch": arch,
        "normalization": f"x = (pixel/255 - {MNIST_MEAN}) / {MNIST_STD}",
        "input_layout": "NCHW [batch,1,28,28] float32, white digit on black as in MNIST",
    }
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def check_parity(model: nn.Module, path: Path, images_uint8: torch.Tensor) -> float:
    """Run torch and ONNX Runtime on the same images; raise unless logits and argmax agree."""
    x = normalize(images_uint8)
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    session = ort_session(path, providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    diff = float(np.abs(got - expected).max())
    mismatched = int((got.argmax(1) != expected.argmax(1)).sum())
    if diff > PARITY_MAX_ABS_DIFF or mismatched:
        raise ExportError(
            f"ONNX parity failed on {len(x)} images: max |dlogit| = {diff:.2e} "
            f"(limit {PARITY_MAX_ABS_DIFF:.0e}), {mismatched} different digits"
        )
    return diff


def export_with_parity(
    model: nn.Module, path: Path, version: str, arch: str, parity_images: torch.Tensor
) -> float:
    export_onnx(model, path, version, arch)
    return check_parity(model, path, parity_images)
