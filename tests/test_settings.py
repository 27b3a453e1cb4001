"""Settings read from the environment: defaults and validation naming the variable."""
from __future__ import annotations

import os

import pytest

from app.settings import ConfigError, Settings


def test_grpc_workers_default_to_the_cores_and_must_be_positive() -> None:
    assert Settings.from_env({}).resolved_grpc_workers == (os.cpu_count() or 1)
    assert Settings.from_env({"KURA_GRPC_WORKERS": "3"}).resolved_grpc_workers == 3
    for bad in ("0", "-2", "many"):
        with pytest.raises(ConfigError, match="KURA_GRPC_WORKERS"):
            Settings.from_env({"KURA_GRPC_WORKERS": bad})
