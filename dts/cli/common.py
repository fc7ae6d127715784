"""Options and output helpers shared by the commands."""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterable

import click

if TYPE_CHECKING:  # only named here: importing it costs every command's --help
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
        for outcome in ("submitted", "done", "failed", "retry"):
            for job_id in getattr(tally, outcome):
                click.echo(f"{job_id}\t{outcome}")
    ctx = click.get_current_context()
    ctx.exit(tally.exit_code)


@contextmanager
def stop_on_signals(enabled: bool = True,
                    again: Callable[[], None] | None = None) -> Iterator[threading.Event]:
    """An event that SIGTERM and SIGINT set while the block runs; the previous handlers
    are back after it. ``again`` runs on every signal after the first (dts watch: do not
    wait for the grace period). Not ``enabled``, or outside the main thread (where Python
    cannot take signals), the event is only set by whoever else holds it."""
    stop = threading.Event()
    previous: dict[signal.Signals, Any] = {}

    def on_signal(signum: int, frame: Any) -> None:
        if stop.is_set() and again is not None:
            again()
        stop.set()

    if enabled and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
