"""Fixtures every test shares: a clean environment and a spool of its own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Real peers started by fixtures: dcmtk and Orthanc (peers), podman (engine), PostgreSQL
# (database). Each is started on free loopback ports and stopped by its PID.
pytest_plugins = ["tests.plugins.peers", "tests.plugins.engine", "tests.plugins.database"]


@pytest.fixture(autouse=True)
def _clean_dts_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("DTS_"):
            monkeypatch.delenv(key)


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def base_config(tmp_path: Path) -> Path:
    """A minimal station configuration of the test's own (no streams)."""
    rules = Path(__file__).resolve().parent.parent / "configuration" / "classifyRules.json"
    path = tmp_path / "dts.toml"
    path.write_text(f"""
[station]
ae_title = "DTS"
host = "127.0.0.1"
port = 0
spool = "{tmp_path / 'spool'}"
stable_seconds = 1
min_free_mb = 0
classify_rules = "{rules}"
""")
    return path
