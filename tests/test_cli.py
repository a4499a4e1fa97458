"""The model CLI, as people type it: evaluate and export on a registry copy."""

from __future__ import annotations

import re
import subprocess
import sys

from model.onnx_serving import has_current_contract
from tests.conftest import DATA_DIR, ROOT


def model_cli(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "model", "--data-dir", str(DATA_DIR), *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_evaluate_prints_accuracy_per_class_and_the_confusion_matrix(registry_copy) -> None:
    out = model_cli("--registry", str(registry_copy.root), "evaluate")
    accuracy = float(re.search(r"test accuracy: ([\d.]+)%", out).group(1))
    assert accuracy > 98.5
    assert out.count("per-class accuracy") == 1 and len(re.findall(r"^\s+\d (\s+\d+){10}$", out, re.M)) == 10


def test_export_rewrites_a_parity_checked_onnx(registry_copy) -> None:
    path = registry_copy.onnx_path("v0001")
    path.unlink()
    out = model_cli("--registry", str(registry_copy.root), "export", "--version", "v0001")
    assert "wrote" in out and float(re.search(r"max \|dp\| = ([\d.e+-]+)", out).group(1)) <= 1e-5
    assert registry_copy.verify_artifact("v0001", "model.onnx") and has_current_contract(path)


def test_a_bad_command_is_a_usage_error() -> None:
    result = subprocess.run([sys.executable, "-m", "model", "fly"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_evaluate_slices_prints_every_slice_for_both_preprocessings(registry_copy) -> None:
    from model.slices import SLICE_NAMES

    out = model_cli("--registry", str(registry_copy.root), "evaluate", "--slices", "--scale", "0.05")
    rows = {m.group(1): (float(m.group(2)), float(m.group(3)))
            for m in re.finditer(r"^(\w+)\s+\d+\s+([\d.]+)%\s+([\d.]+)%$", out, re.M)}
    assert set(rows) == set(SLICE_NAMES), out
    assert "this wave" in out and "first wave" in out and rows["mnist_png"][0] >= 90


def test_a_trained_base_model_records_its_slice_table(tmp_path) -> None:
    from model.registry import Registry
    from model.slices import SLICE_NAMES

    model_cli("--registry", str(tmp_path), "train", "--limit", "2000", "--epochs", "1")
    table = Registry(tmp_path).load_model()[1].metrics["slices"]
    assert set(table) == set(SLICE_NAMES) and table["mnist_png"]["n"] == 400
    assert all(0 <= row["accuracy"] <= 1 for row in table.values()) and table["mnist_png"]["accuracy"] > 0.8
