"""The registry: versions in safetensors + manifest, an atomic ACTIVE pointer, safe across processes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model.nets import build
from model.registry import Registry, RegistryError

PUBLISHER = Path(__file__).resolve().parent / "publisher.py"


def test_publish_list_get_activate_load(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "reg")
    assert registry.active_version() is None
    model = build("simplenet")
    first = registry.publish(model, "simplenet", metrics={"test_accuracy": 0.9}, data_hash="abc",
                             hyperparameters={"epochs": 1})
    second = registry.publish(build("simplenet"), "simplenet", parent=first.version, activate=False)
    assert [m.version for m in registry.list_versions()] == ["v0001", "v0002"]
    assert registry.active_version() == "v0001"
    assert registry.get("v0002").parent == "v0001"
    assert set(first.files) == {"model.safetensors"} and first.data_hash == "abc"
    loaded, manifest = registry.load_model()
    assert manifest.version == "v0001"
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    marker = registry.active_marker()
    registry.activate(second.version)
    assert registry.active_version() == "v0002" and registry.active_marker() != marker
    with pytest.raises(RegistryError):
        registry.activate("v0099")
    with pytest.raises(RegistryError):
        registry.get("../etc")


def test_weights_are_safetensors_not_pickles(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "reg")
    manifest = registry.publish(build("simplenet"), "simplenet")
    header = (registry.version_dir(manifest.version) / "model.safetensors").read_bytes()[:16]
    assert not header.startswith(b"\x80") and not header.startswith(b"PK")  # neither pickle nor torch zip


def test_concurrent_publishers_do_not_collide(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    Registry(root)
    procs = [subprocess.Popen([sys.executable, str(PUBLISHER), str(root), "3"], stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    printed = []
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0
        printed += out.split()
    registry = Registry(root)
    versions = [m.version for m in registry.list_versions()]
    assert sorted(printed) == versions == [f"v{i:04d}" for i in range(1, 13)]
    for version in versions:
        registry.load_model(version)  # every version complete and loadable
    assert registry.active_version() in versions


def test_publisher_killed_at_any_instant_leaves_the_previous_state(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    registry = Registry(root)
    registry.publish(build("simplenet"), "simplenet")
    rng = random.Random(0)
    for attempt in range(4):
        marker = tmp_path / "writing"
        marker.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, str(PUBLISHER), str(root), "1", "2.0"])
        deadline = time.monotonic() + 120
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.5))  # somewhere inside the slow publish
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert registry.active_version() == "v0001", attempt
        assert [m.version for m in registry.list_versions()] == ["v0001"], attempt
        registry.load_model()
    after = registry.publish(build("simplenet"), "simplenet")  # the lock was released by the kernel
    assert after.version == "v0002"
    assert list(registry.staging_dir.iterdir()) == []  # leftovers of the killed publishers are gone
