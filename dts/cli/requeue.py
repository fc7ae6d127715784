"""``dts requeue JOB --to classify|run|send``: reprocess a job by hand, history kept."""

from __future__ import annotations

import click

from ..requeue import TARGETS, requeue
from ..spool import Queue
from . import StationContext, pass_ctx
from .common import json_option, print_json


@click.command(name="requeue")
@click.argument("job_ids", nargs=-1, required=True, metavar="JOB...")
@click.option("--to", "target", required=True, type=click.Choice([q.value for q in TARGETS]),
              help="Queue to put the job back into (its new/).")
@click.option("--resend-all", is_flag=True,
              help="With --to send: send every result again, also those already sent.")
@json_option
@pass_ctx
def command(ctx: StationContext, job_ids: tuple[str, ...], target: str, resend_all: bool,
            as_json: bool) -> None:
    """Put finished, failed or unmatched jobs back into a queue for another try.

    The job keeps its folder and history (events.jsonl); an event records who
    requeued it. Attempts, errors and retry times are reset; for --to send, failed
    destinations are tried again while instances already sent are kept (unless
    --resend-all); for --to run, the previous output/ and logs/ move to previous/.
    A job a worker is busy with is refused (exit 75). To reprocess a study from a
    folder: `dts import PATH`, then requeue or let the stages pick it up.

    \b
    Example:
      dts requeue 20261126T105700.123456Z-3f9a1c2e --to classify
      dts requeue "$(ls spool/failed | tail -1)" --to send
    """
    station = ctx.station
    done = [requeue(station, job_id, Queue(target), resend_all=resend_all).as_dict()
            for job_id in job_ids]
    if as_json:
        print_json(done)
    else:
        for r in done:
            click.echo(f"{r['job']}\t{r['from']} -> {r['to']}")
