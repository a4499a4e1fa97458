"""ONNX export: checker, metadata, dynamic batch, parity; every publish exports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from model.export import INPUT_NAME, OUTPUT_NAME, ExportError, check_parity, export_with_parity, ort_session
from model.nets import build
from model.publish import ensure_onnx, export_version
from model.registry import Registry


def test_export_parity_metadata_and_dynamic_batch(base_registry, mnist_test, tmp_path: Path) -> None:
    model, manifest = base_registry.load_model()
    path = tmp_path / "model.onnx"
    diff = export_with_parity(model, path, manifest.version, manifest.arch, mnist_test[0][:1000])
    assert diff <= 1e-4
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["version"] == manifest.version and "0.1307" in meta["normalization"]
    assert [i.name for i in proto.graph.input] == [INPUT_NAME]
    assert [o.name for o in proto.graph.output] == [OUTPUT_NAME]
    session = ort_session(path)
    for batch in (1, 3, 64):
        out = session.run([OUTPUT_NAME], {INPUT_NAME: np.zeros((batch, 1, 28, 28), np.float32)})[0]
        assert out.shape == (batch, 10)


def test_parity_check_fails_loudly_on_a_different_model(base_registry, mnist_test, tmp_path: Path) -> None:
    model, manifest = base_registry.load_model()
    path = tmp_path / "model.onnx"
    export_with_parity(model, path, manifest.version, manifest.arch, mnist_test[0][:100])
    with pytest.raises(ExportError, match="parity failed"):
        check_parity(build(manifest.arch), path, mnist_test[0][:100])


def test_every_published_version_has_a_parity_checked_onnx(base_registry) -> None:
    for manifest in base_registry.list_versions():
        assert "model.onnx" in manifest.files
        assert base_registry.verify_artifact(manifest.version, "model.onnx")


def test_missing_or_corrupt_onnx_is_re_exported(registry_copy: Registry, data_dir: Path) -> None:
    version = registry_copy.active_version()
    onnx_path = registry_copy.onnx_path(version)
    onnx_path.write_bytes(b"garbage")
    assert not registry_copy.verify_artifact(version, "model.onnx")
    ensure_onnx(registry_copy, version, data_dir)
    assert registry_copy.verify_artifact(version, "model.onnx")
    onnx_path.unlink()
    path, diff = export_version(registry_copy, version, data_dir)
    assert path.is_file() and diff <= 1e-4
