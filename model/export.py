"""ONNX export of the serving contract (uint8 pixels in, probabilities out), with a parity check.

The exported graph is :class:`model.nets.ProbabilityHead` around the net, so ONNX Runtime and
torch.compile share one definition of normalisation and softmax. The contract (names, metadata)
and ONNX Runtime sessions are :mod:`model.onnx_serving`'s, which serving uses without torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from model.nets import ProbabilityHead
from model.onnx_serving import CONTRACT, INPUT_NAME, OUTPUT_NAME, ort_session

PARITY_MAX_ABS_DIFF = 1e-5


class ExportError(RuntimeError):
    pass


def export_onnx(model: nn.Module, path: Path, version: str, arch: str) -> None:
    """Write model.onnx: input ``pixels`` uint8 [batch,28,28], output ``probabilities`` [batch,10]."""
    head = ProbabilityHead(model.eval().cpu()).eval()
    example = torch.zeros(2, 28, 28, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(
        head,
        (example,),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: batch},),
        dynamo=True,
        verbose=False,
    )
    proto = program.model_proto
    del proto.metadata_props[:]
    for key, value in {"version": version, "arch": arch, "contract": CONTRACT}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def check_parity(model: nn.Module, path: Path, images_uint8: torch.Tensor) -> float:
    """Run torch and ONNX Runtime on the same images; raise unless probabilities and argmax agree."""
    with torch.no_grad():
        expected = ProbabilityHead(model.eval()).eval()(images_uint8).numpy()
    session = ort_session(path, providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: images_uint8.numpy()})[0]
    diff = float(np.abs(got - expected).max())
    mismatched = int((got.argmax(1) != expected.argmax(1)).sum())
    if diff > PARITY_MAX_ABS_DIFF or mismatched:
        raise ExportError(
            f"ONNX parity failed on {len(images_uint8)} images: max |dp| = {diff:.2e} "
            f"(limit {PARITY_MAX_ABS_DIFF:.0e}), {mismatched} different digits"
        )
    return diff


def export_with_parity(
    model: nn.Module, path: Path, version: str, arch: str, parity_images: torch.Tensor
) -> float:
    export_onnx(model, path, version, arch)
    return check_parity(model, path, parity_images)
