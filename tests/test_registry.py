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

from model.atomic import atomic_file, atomic_write_bytes
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


def test_opening_the_registry_clears_a_dead_publishers_staging_but_not_a_live_ones(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    leftover = Registry(root).staging_dir / "v0007.4242"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half-written")
    publishing = Registry(root)  # opened at start, with no publisher running: the leftover goes
    assert list(publishing.staging_dir.iterdir()) == []
    leftover.mkdir()
    with publishing.lock:  # a publisher at work: its staging directory stays
        assert list(Registry(root).staging_dir.iterdir()) == [leftover]


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "record.json"
    atomic_write_bytes(target, b"first")
    with pytest.raises(OSError), atomic_file(target) as tmp:
        tmp.write_bytes(b"half")
        raise OSError("disk gone")
    assert target.read_bytes() == b"first" and [p.name for p in tmp_path.iterdir()] == ["record.json"]
    with atomic_file(target) as tmp:
        tmp.write_bytes(b"second")
    assert target.read_bytes() == b"second" and [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_an_over_long_version_id_is_refused_not_looked_up(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "reg")
    for version in ("v" + "1" * 300, "v١٢٣٤"):
        assert not registry.exists(version)
        with pytest.raises(RegistryError, match="not a version id"):
            registry.get(version)
