from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.settings import Settings


def test_defaults_env_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("DIGITS_"):
            monkeypatch.delenv(name)
    defaults = Settings()
    assert (defaults.host, defaults.port, defaults.registry) == ("127.0.0.1", 8000, Path("registry"))
    assert defaults.admin_token is None and defaults.buckets() == [1, 2, 4, 8, 16]
    monkeypatch.setenv("DIGITS_PORT", "9001")
    monkeypatch.setenv("DIGITS_MAX_BATCH_SIZE", "12")
    from_env = Settings()
    assert from_env.port == 9001 and from_env.buckets() == [1, 2, 4, 8, 12]
    from_flags = Settings(_cli_parse_args=["--port", "9002", "--runtime", "onnx", "--api-servers", "3"])
    assert (from_flags.port, from_flags.runtime, from_flags.api_servers) == (9002, "onnx", 3)


def test_admin_token_from_file_and_threads(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    settings = Settings(admin_token_file=token_file, worker_threads=None, api_servers=1)
    assert settings.admin_token_value() == "s3cret" and "s3cret" not in repr(settings)
    assert settings.inference_threads() == max(1, len(os.sched_getaffinity(0)) - 1)
    assert Settings(worker_threads=3).inference_threads() == 3


def test_invalid_values_are_refused() -> None:
    with pytest.raises(ValueError):
        Settings(port=0)
    with pytest.raises(ValueError):
        Settings(runtime="tensorflow")
