"""``dts review``: results of review streams waiting in review/ for a person."""

from __future__ import annotations

from typing import Any

import click

from ..requeue import who
from . import StationContext, is_terminal, pass_ctx
from .common import json_option, print_json


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _produced(counts: dict[str, int]) -> str:
    """``1 sr, 2 seg, 1 other file(s)``"""
    return ", ".join(f"{n} other file(s)" if kind == "files" else f"{n} {kind}"
                     for kind, n in counts.items()) or "nothing"


@click.group(name="review", invoke_without_command=True)
@json_option
@click.pass_context
def command(click_ctx: click.Context, as_json: bool) -> None:
    """List, approve or reject results waiting in review/ for a person.

    A stream with `review = true` puts its validated results into review/ instead of
    sending them. Without a subcommand: the list (as `dts review list`). Approving
    moves a job on to send/new/, rejecting ends it in failed/ with the reason; who
    decided and when go into job.json (`review`) and the journal. A job that is not
    in review/ is refused (exit 2) naming where it is.

    \b
    Example:
      dts review
      dts review approve 20261126T105700.123456Z-3f9a1c2e.vibe
      dts review reject 20261126T105700.123456Z-3f9a1c2e.vibe --reason "wrong side"
    """
    if click_ctx.invoked_subcommand is None:
        click_ctx.invoke(list_command, as_json=as_json)


@command.command(name="list")
@json_option
@pass_ctx
def list_command(ctx: StationContext, as_json: bool) -> None:
    """List the jobs waiting in review/, the longest-waiting first.

    \b
    Example:
      dts review list --json | jq -r '.[] | select(.stream == "vibe") | .job'
    """
    from .. import review

    station = ctx.station
    review.recover(station)
    rows = [w.as_dict() for w in review.waiting(station)]
    if as_json:
        print_json(rows)
        return
    if not is_terminal():
        for r in rows:
            click.echo("\t".join([r["job"], r["study_uid"] or "-", r["accession"] or "-",
                                  r["stream"] or "-", _produced(r["produced"]),
                                  _age(r["waiting_seconds"])]))
        return
    _table(rows)


def _table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(rows)} job(s) waiting for review", title_justify="left")
    for col in ("job", "study", "accession", "stream", "produced", "results", "waiting"):
        table.add_column(col, justify="right" if col in ("results", "waiting") else "left")
    for r in rows:
        table.add_row(r["job"] + (" (being decided)" if r["state"] == "cur" else ""),
                      r["study_uid"] or "-", r["accession"] or "-", r["stream"] or "-",
                      _produced(r["produced"]), str(r["results"]), _age(r["waiting_seconds"]))
    Console().print(table)


def _by_option(f: Any) -> Any:
    return click.option("--by", default=None, metavar="NAME",
                        help="Who decides (default: the Unix user; the sudo caller under "
                             "sudo).")(f)


@command.command(name="approve")
@click.argument("job_id", metavar="JOB")
@_by_option
@click.option("--reason", default=None, help="A note kept with the approval.")
@json_option
@pass_ctx
def approve_command(ctx: StationContext, job_id: str, by: str | None, reason: str | None,
                    as_json: bool) -> None:
    """Approve a job's results: it moves on to send/new/ and is delivered.

    \b
    Example:
      dts review approve 20261126T105700.123456Z-3f9a1c2e.vibe --by dr.house
    """
    from .. import review

    review.recover(ctx.station)
    done = review.approve(ctx.station, job_id, by=by or who(), reason=reason)
    _say(done.as_dict(), as_json)


@command.command(name="reject")
@click.argument("job_id", metavar="JOB")
@click.option("--reason", required=True, help="Why the results must not be sent.")
@_by_option
@json_option
@pass_ctx
def reject_command(ctx: StationContext, job_id: str, reason: str, by: str | None,
                   as_json: bool) -> None:
    """Reject a job's results: it ends in failed/ with the reason; nothing is sent.

    \b
    Example:
      dts review reject 20261126T105700.123456Z-3f9a1c2e.vibe --reason "left and right swapped"
    """
    from .. import review

    review.recover(ctx.station)
    done = review.reject(ctx.station, job_id, by=by or who(), reason=reason)
    _say(done.as_dict(), as_json)


def _say(done: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(done)
    else:
        click.echo(f"{done['job']}\t{done['decision']} by {done['by']} -> {done['to']}")
