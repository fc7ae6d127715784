"""``dts echo``: C-ECHO the station itself, a named destination or HOST:PORT; 0 or 75."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ECHOSCU, free_port, run_dts
from tests.test_receive import start_receiver, write_station_config  # noqa: F401


@pytest.mark.peers
def test_echo_station_destination_and_host_port(start_receiver: Any,  # noqa: F811
                                                 tmp_path: Path) -> None:
    rx = start_receiver()
    assert subprocess.run([ECHOSCU, "-aec", "DTS", "127.0.0.1", str(rx.port)],
                          capture_output=True, timeout=30, check=False).returncode == 0
    done = run_dts("echo", config=rx.config)
    assert done.returncode == 0, done.stderr
    assert f"127.0.0.1:{rx.port}" in done.stdout
    done = run_dts("echo", f"127.0.0.1:{rx.port}", "--ae-title", "DTS", config=rx.config)
    assert done.returncode == 0, done.stderr
    config = write_station_config(tmp_path, rx.port, extra=f"""
[[destination]]
name = "self"
ae_title = "DTS"
host = "127.0.0.1"
port = {rx.port}

[[destination]]
name = "down"
ae_title = "DOWN"
host = "127.0.0.1"
port = {free_port()}
""")
    assert run_dts("echo", "self", config=config).returncode == 0
    down = run_dts("echo", "down", "--timeout", "3", config=config)
    assert down.returncode == 75, down.stderr
    assert "cannot reach DOWN" in down.stderr


def test_echo_unreachable_is_75_and_bad_argument_is_2(tmp_path: Path) -> None:
    config = write_station_config(tmp_path, free_port())
    done = run_dts("echo", "--timeout", "3", config=config)
    assert done.returncode == 75
    done = run_dts("echo", f"127.0.0.1:{free_port()}", "--ae-title", "X", "--timeout", "3",
                   config=config)
    assert done.returncode == 75
    # one clear line from dts; pynetdicom's trail of the same failure only with -v
    assert "cannot reach X" in done.stderr and "pynetdicom" not in done.stderr, done.stderr
    loud = run_dts("-v", "echo", f"127.0.0.1:{free_port()}", "--timeout", "3", config=config)
    assert loud.returncode == 75 and "pynetdicom" in loud.stderr, loud.stderr
    assert run_dts("echo", "nosuchdest", config=config).returncode == 2
