"""``dts log``: the station journal, filtered; ``--follow``; ``--db`` reads the database."""

from __future__ import annotations

from typing import Any, Iterable

import click

from ..errors import UsageError
from ..journal import Event, EventFilter, Stage, Status, follow_events, parse_since, read_events
from . import StationContext, pass_ctx
from .common import print_json_lines


def _line(ev: dict[str, Any]) -> str:
    parts = [str(ev.get("time", "")), f"{ev.get('stage', ''):<8}", f"{ev.get('status', ''):<7}",
             f"{ev.get('event', ''):<20}", str(ev.get("job") or "-")]
    if ev.get("accession"):
        parts.append(f"acc={ev['accession']}")
    if ev.get("stream"):
        parts.append(f"stream={ev['stream']}")
    if ev.get("destination"):
        parts.append(f"dest={ev['destination']}")
    parts.append(str(ev.get("message", "")))
    return "  ".join(parts)


@click.command(name="log")
@click.option("--job", help="Only this job (and its fan-out children).")
@click.option("--study", help="Only this StudyInstanceUID.")
@click.option("--accession", help="Only this accession number.")
@click.option("--stream", help="Only this stream.")
@click.option("--stage", type=click.Choice([s.value for s in Stage]), help="Only this stage.")
@click.option("--event", type=click.Choice([e.value for e in Event]), metavar="EVENT",
              help="Only this kind of event (e.g. committed, commit-failed, send-failed).")
@click.option("--status", "statuses", multiple=True,
              type=click.Choice([s.value for s in Status]), help="Only this status (repeatable).")
@click.option("--since", help="ISO-8601 time or a duration back from now (2h, 7d).")
@click.option("--until", help="ISO-8601 time or a duration back from now.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new events as they happen.")
@click.option("--db", is_flag=True, help="Read from the journal database ([journal] url).")
@click.option("--sync-db", is_flag=True,
              help="Copy events not yet in the journal database into it, then exit "
                   "(cron set-ups; dts watch does it by itself). 75: database unreachable.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@pass_ctx
def command(ctx: StationContext, job: str | None, study: str | None, accession: str | None,
            stream: str | None, stage: str | None, event: str | None,
            statuses: tuple[str, ...],
            since: str | None, until: str | None, follow: bool, db: bool, as_json: bool,
            sync_db: bool = False) -> None:
    """Print the station journal, oldest first.

    \b
    Example:
      dts log --accession 12345
      dts log --since 2h --status error
      dts log --event commit-failed --since 1d
      dts log --follow --json | jq -r .message
      dts log --sync-db            # cron: mirror new events into [journal] url
    """
    try:
        flt = EventFilter(job=job, study=study, accession=accession, stream=stream,
                          stage=stage, event=event, status=statuses,
                          since=parse_since(since) if since else None,
                          until=parse_since(until) if until else None)
    except ValueError as exc:
        raise UsageError(f"--since/--until: {exc}") from None
    station = ctx.station
    if sync_db:
        from ..journaldb import sync

        shipped = sync(station.spool, station.config)
        click.echo(f"{shipped.inserted} new event(s) in the journal database "
                   f"({shipped.read} read{', another shipper busy' if shipped.skipped else ''})",
                   err=True)
        return
    events: Iterable[dict[str, Any]]
    if db:
        if follow:
            raise UsageError("--follow reads the spool's journal; it does not combine with --db")
        from ..journaldb import read_db_events

        events = read_db_events(station.config, flt)
    elif follow:
        events = follow_events(station.spool, flt)
    else:
        events = read_events(station.spool, flt)
    try:
        _print(events, as_json)
    except KeyboardInterrupt:
        pass


def _print(events: Iterable[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print_json_lines(events)
    else:
        for ev in events:
            click.echo(_line(ev))
