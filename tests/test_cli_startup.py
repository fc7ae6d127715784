"""A quick command line (issue 16): `dts --help` imports no command, and the commands that
need no DICOM (status, show, log, requeue, clean, config) start without pydicom,
pynetdicom, lark or SQLAlchemy. Checked by what Python imported (``-X importtime``), not
by the clock."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from pydicom.datadict import keyword_dict

from dts import rules
from dts.cli import COMMANDS, SHORT_HELP, cli
from tests.helpers import REPO, station_config

HEAVY = ("pydicom", "pynetdicom", "lark", "re2", "sqlalchemy", "docker", "numpy")


def _imported(args: list[str], config: Path | None = None) -> set[str]:
    """Top-level packages imported by ``dts ARGS`` (it must succeed or exit 1/2)."""
    cmd = [sys.executable, "-X", "importtime", "-m", "dts"]
    if config is not None:
        cmd += ["--config", str(config)]
    done = subprocess.run(cmd + args, capture_output=True, text=True, timeout=60, cwd=REPO,
                          check=False)
    assert done.returncode in (0, 1), done.stderr[-2000:]
    names = set()
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def test_every_command_has_its_own_line_for_help() -> None:
    assert set(SHORT_HELP) == set(COMMANDS)
    ctx = click.Context(cli)
    for name in COMMANDS:
        cmd = cli.get_command(ctx, name)
        assert cmd is not None
        assert SHORT_HELP[name] == cmd.get_short_help_str(limit=10_000), name


def test_the_listing_is_the_one_click_would_print() -> None:
    ctx = click.Context(cli)
    ours, clicks = click.HelpFormatter(width=80), click.HelpFormatter(width=80)
    cli.format_commands(ctx, ours)
    click.Group.format_commands(cli, ctx, clicks)
    assert ours.getvalue() == clicks.getvalue()
    assert "run" in ours.getvalue() and "watch" in ours.getvalue()


def test_help_imports_no_command() -> None:
    imported = _imported(["--help"])
    assert not imported & set(HEAVY), imported & set(HEAVY)


@pytest.mark.parametrize("args", [["status"], ["status", "--json"], ["log", "--since", "1h"],
                                  ["config", "check"], ["clean", "--older-than", "30d",
                                                        "--dry-run"]])
def test_commands_without_dicom_start_without_the_dicom_libraries(
        tmp_path: Path, args: list[str]) -> None:
    config = station_config(tmp_path, streams=[{"name": "s", "command": ["true"]}])
    imported = _imported(args, config)
    assert not imported & set(HEAVY), imported & set(HEAVY)


def test_every_commands_help_imports_no_heavy_library() -> None:
    """``dts X --help`` needs nothing of what X does (dts send --help took 0.5 s when the
    sender, and with it pynetdicom and pydicom, was imported for it)."""
    for name in COMMANDS:
        imported = _imported([name, "--help"])
        assert not imported & set(HEAVY), (name, imported & set(HEAVY))
        assert "starlette" not in imported and "uvicorn" not in imported, name


def test_a_ror_select_stream_still_loads_its_parser(tmp_path: Path) -> None:
    config = station_config(tmp_path, streams=[{
        "name": "s", "command": ["true"],
        "ror_select": 'SELECT series FROM study WHERE series HAS Modality == "MR"'}])
    assert "lark" in _imported(["config", "check"], config)


def test_the_shipped_keyword_table_is_pydicoms() -> None:
    shipped = json.loads((Path(rules.__file__).parent / "data" / rules.KEYWORDS_FILE)
                         .read_text())
    # after a pydicom upgrade: .venv/bin/python -c "import json, pydicom; from
    # pydicom.datadict import keyword_dict as k; print(json.dumps({'pydicom':
    # pydicom.__version__, 'keywords': dict(sorted(k.items()))}, separators=(',', ':')))"
    # > dts/data/dicom-keywords.json
    assert shipped["keywords"] == dict(keyword_dict), "regenerate dicom-keywords.json"
    assert rules.tag_for_keyword("SeriesDescription") == 0x0008103E
    assert rules.tag_for_keyword("NoSuchKeyword") is None
