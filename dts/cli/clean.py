"""``dts clean --older-than 7d``: remove finished jobs and stale scratch (retention)."""

from __future__ import annotations

import click

from ..config import parse_duration
from ..errors import UsageError
from ..retention import clean
from ..spool import Queue
from . import StationContext, pass_ctx
from .common import json_option, print_json


@click.command(name="clean")
@click.option("--older-than", "older_than", required=True,
              help="Remove jobs whose last activity is older than this (7d, 36h, seconds).")
@click.option("--done/--no-done", default=True, show_default=True, help="Clean done/.")
@click.option("--unmatched/--no-unmatched", default=True, show_default=True,
              help="Clean unmatched/.")
@click.option("--failed/--no-failed", default=False, show_default=True,
              help="Clean failed/ too.")
@click.option("-n", "--dry-run", is_flag=True, help="Only list what would be removed.")
@json_option
@pass_ctx
def command(ctx: StationContext, older_than: str, done: bool, unmatched: bool, failed: bool,
            dry_run: bool, as_json: bool) -> None:
    """Remove finished jobs older than a duration, and stale tmp/ entries.

    A job's age counts from its last activity (the newest change of its folder,
    job.json or events.jsonl), so a job requeued yesterday is one day old. Jobs a
    worker holds are never touched; tmp/ entries are removed after a day unless
    locked. Entries of produced/ (the record of results this station sent, so that
    they are not processed again when they come back) go once their job is gone
    and they are older than 30 days. `[station] retention` makes `dts watch` do
    this by itself.

    \b
    Example:
      dts clean --older-than 7d --dry-run
      dts clean --older-than 30d --failed --json | jq '.removed | length'
    """
    try:
        seconds = parse_duration(older_than)
    except ValueError as exc:
        raise UsageError(f"--older-than: {exc}") from None
    queues = [q for q, on in ((Queue.DONE, done), (Queue.UNMATCHED, unmatched),
                              (Queue.FAILED, failed)) if on]
    report = clean(ctx.station, seconds, queues=queues, dry_run=dry_run)
    if as_json:
        print_json(report.as_dict())
        return
    verb = "would remove" if dry_run else "removed"
    for r in report.removed:
        click.echo(f"{r.queue}/{r.job}\t{r.age_seconds / 86400:.1f}d\t{r.bytes}")
    for name in report.tmp_removed:
        click.echo(f"tmp/{name}")
    for name in report.priors_removed:
        click.echo(f"priors/{name}")
    click.echo(f"{verb} {len(report.removed)} job(s), {report.bytes / 1e6:.1f} MB, "
               f"{len(report.tmp_removed)} tmp/ entries, "
               f"{len(report.produced_removed)} produced/ entries"
               + (f"; {len(report.busy)} busy, kept" if report.busy else ""), err=True)
