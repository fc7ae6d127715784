"""``dts notify``: deliver the webhooks (``[[notify]]``): once for cron, or until stopped."""

from __future__ import annotations

import click

from ..errors import TemporaryFailure, UsageError
from . import StationContext, pass_ctx
from .common import json_option, print_json, stop_on_signals


@click.command(name="notify")
@click.option("--once", is_flag=True, help="One round (journal -> outbox -> POST), then exit.")
@click.option("--now", "all_now", is_flag=True,
              help="With --once: also try the deliveries whose next try is later.")
@json_option
@pass_ctx
def command(ctx: StationContext, once: bool, all_now: bool, as_json: bool) -> None:
    """Post webhooks for failed, delivered, stuck and review events ([[notify]]).

    Follows the journal with its own cursor (spool/notify/cursor.json), keeps one
    file per pending delivery in spool/notify/, retries failures with backoff and
    gives up on a 4xx answer (kept in spool/notify/gave-up/). dts watch does the same
    by itself. Exit 0, or 75 when deliveries failed and wait for a later try.

    \b
    Example:
      * * * * *  dts notify --once
      dts notify --once --now --json | jq .pending
    """
    from ..notify import Notifier

    station = ctx.station
    if not station.config.notify:
        raise UsageError("no [[notify]] webhooks in the configuration")
    notifier = Notifier(station)
    if not once:
        with stop_on_signals() as stop:
            notifier.run(stop)
        return
    result = notifier.run_once(all_now=all_now)
    if as_json:
        print_json(result.as_dict())
    else:
        click.echo(f"queued {result.queued}, delivered {result.delivered}, failed "
                   f"{result.failed}, given up {result.gave_up}, pending {result.pending}")
    if result.failed:
        raise TemporaryFailure(f"{result.failed} webhook deliveries failed; tried again later")
