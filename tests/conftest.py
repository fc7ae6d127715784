"""Fixtures every test shares: a clean environment and a spool of its own."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import station_config

# Real peers started by fixtures: dcmtk and Orthanc (peers), podman (engine), PostgreSQL
# (database), a one-node Slurm cluster (slurm). Each is started on free loopback ports and
# stopped by its PID.
pytest_plugins = ["tests.plugins.peers", "tests.plugins.engine", "tests.plugins.database",
                  "tests.plugins.slurm"]

# The fixtures that start a real peer; a test using one is marked ``peers`` by itself.
# Tests that run a peer program directly (dcmtk, Orthanc, systemd-analyze, logrotate, cron)
# carry ``@pytest.mark.peers``. `pytest -m "not peers"` runs the rest: no root, no apt.
PEER_FIXTURES = {"orthanc", "orthanc_factory", "storescp", "storescp_factory", "engine",
                 "docker_host", "postgres", "slurm"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if PEER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.peers)


@pytest.fixture(autouse=True)
def _clean_dts_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("DTS_"):
            monkeypatch.delenv(key)


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Path]:
    """The configuration builder (``tests.helpers.station_config``) for this test's folder."""
    return functools.partial(station_config, tmp_path)


@pytest.fixture
def base_config(make_config: Callable[..., Path]) -> Path:
    """A minimal station configuration of the test's own (no streams)."""
    return make_config(station={"ae_title": "DTS", "host": "127.0.0.1", "port": 0,
                                "stable_seconds": 1})
