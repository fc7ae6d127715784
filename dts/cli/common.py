"""Options and output helpers shared by the commands."""

from __future__ import annotations

import json
import sys
from typing import Any, Callable, Iterable

import click

from ..worker import Tally

F = Callable[..., Any]


def once_option(f: F) -> F:
    return click.option("--once", is_flag=True,
                        help="Process what is queued, then exit (for cron).")(f)


def job_ids_argument(f: F) -> F:
    return click.argument("job_ids", nargs=-1, metavar="[JOB]...")(f)


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True,
                        help="Machine-readable output (JSON).")(f)


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def print_json_lines(records: Iterable[Any]) -> None:
    for rec in records:
        sys.stdout.write(json.dumps(rec, default=str, separators=(",", ":")) + "\n")
        sys.stdout.flush()


def finish(tally: Tally, as_json: bool = False) -> None:
    """Print what a stage run did (one line per job) and exit with its status."""
    if as_json:
        print_json(tally.as_dict())
    else:
        for outcome in ("done", "failed", "retry"):
            for job_id in getattr(tally, outcome):
                click.echo(f"{job_id}\t{outcome}")
    ctx = click.get_current_context()
    ctx.exit(tally.exit_code)
