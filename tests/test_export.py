"""ONNX export: checker, metadata, dynamic batch, parity; every publish exports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from model.export import ExportError, check_parity, export_with_parity
from model.nets import build
from model.onnx_serving import CONTRACT, INPUT_NAME, OUTPUT_NAME, ensure_onnx, has_current_contract, ort_session
from model.publish import PARITY_IMAGES, export_version, publish_model
from model.registry import Registry


def test_export_parity_metadata_and_dynamic_batch(base_registry, mnist_test, tmp_path: Path) -> None:
    model, manifest = base_registry.load_model()
    path = tmp_path / "model.onnx"
    diff = export_with_parity(model, path, manifest.version, manifest.arch, mnist_test[0][:1000])
    assert diff <= 1e-5
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["version"] == manifest.version and meta["contract"] == CONTRACT
    assert [i.name for i in proto.graph.input] == [INPUT_NAME]
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [o.name for o in proto.graph.output] == [OUTPUT_NAME]
    session = ort_session(path)
    for batch in (1, 3, 64):
        out = session.run([OUTPUT_NAME], {INPUT_NAME: mnist_test[0][:batch].numpy()})[0]
        assert out.shape == (batch, 10)
        np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)  # probabilities, softmax inside


def test_parity_check_fails_loudly_on_a_different_model(base_registry, mnist_test, tmp_path: Path) -> None:
    model, manifest = base_registry.load_model()
    path = tmp_path / "model.onnx"
    export_with_parity(model, path, manifest.version, manifest.arch, mnist_test[0][:100])
    with pytest.raises(ExportError, match="parity failed"):
        check_parity(build(manifest.arch), path, mnist_test[0][:100])


def test_a_published_version_has_an_onnx_that_passes_parity(registry_copy: Registry, mnist_test) -> None:
    model, manifest = registry_copy.load_model()
    with torch.no_grad():
        model.classifier[-1].bias += 0.5  # a different model than the one imported
    published = publish_model(registry_copy, model, manifest.arch, mnist_test[0][:PARITY_IMAGES], parent="v0001")
    assert registry_copy.verify_artifact(published.version, "model.onnx")
    stored, _ = registry_copy.load_model(published.version)
    path = registry_copy.onnx_path(published.version)
    assert has_current_contract(path)
    assert check_parity(stored, path, mnist_test[0][1000:2000]) <= 1e-5  # images the publish did not check


def test_missing_or_corrupt_onnx_is_re_exported(registry_copy: Registry, data_dir: Path) -> None:
    version = registry_copy.active_version()
    onnx_path = registry_copy.onnx_path(version)
    onnx_path.write_bytes(b"garbage")
    assert not registry_copy.verify_artifact(version, "model.onnx")
    ensure_onnx(registry_copy, version, data_dir)
    assert registry_copy.verify_artifact(version, "model.onnx")
    onnx_path.unlink()
    path, diff = export_version(registry_copy, version, data_dir)
    assert path.is_file() and diff <= 1e-5
