"""``dts replay``: studies already processed, run through one stream again."""

from __future__ import annotations

import click

from ..errors import UsageError
from ..journal import parse_since
from ..requeue import who
from . import StationContext, pass_ctx
from .common import json_option, print_json


@click.command(name="replay")
@click.argument("job_ids", nargs=-1, metavar="[JOB]...")
@click.option("--stream", "stream_name", required=True, metavar="NAME",
              help="The stream to run the studies through.")
@click.option("--since", default=None, metavar="WHEN",
              help="Every study in done/ that arrived since then (a duration like 30d, or "
                   "an ISO-8601 time), instead of JOBs.")
@click.option("--live", is_flag=True,
              help="A live run: its results go on to review/ or send/ as the stream says "
                   "(default: a shadow run, kept in done/, nothing sent).")
@json_option
@pass_ctx
def command(ctx: StationContext, job_ids: tuple[str, ...], stream_name: str,
            since: str | None, live: bool, as_json: bool) -> None:
    """Run studies already processed (their input kept in done/) through a stream again.

    Each study becomes a new run job of that stream in run/new/ (a new job id, its
    input hard-linked from the finished job, its study.json reused), a shadow run
    unless --live; no other stream is classified and the original jobs are left as
    they are. `dts run` (or `dts watch`) then runs it; `dts compare` shows how its
    results differ. A named job whose input was removed, or that the stream does not
    match, exits 1 naming it (the others are still replayed).

    \b
    Example:
      dts replay --stream vibe-v2 --since 30d && dts run --once
      dts replay --stream vibe-v2 20261126T105700.123456Z-3f9a1c2e
      dts compare vibe vibe-v2
    """
    from ..replay import replay

    when = None
    if since is not None:
        try:
            when = parse_since(since)
        except ValueError as exc:
            raise UsageError(f"--since: {exc}") from None
    report = replay(ctx.station, stream_name, job_ids=list(job_ids), since=when, live=live,
                    by=who())
    if as_json:
        print_json(report.as_dict())
    else:
        for m in report.made:
            click.echo(f"{m['job']}\t{'shadow' if m['shadow'] else 'live'} replay of "
                       f"{m['replay_of']}")
        for s in report.skipped:
            click.echo(f"skipped: {s['reason']}", err=True)
        for f in report.failed:
            click.echo(f"failed: {f['reason']}", err=True)
    if report.failed:
        click.get_current_context().exit(1)
