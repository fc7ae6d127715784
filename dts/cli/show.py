"""``dts show JOB``: a job's job.json, where it is, and its history."""

from __future__ import annotations

import json

import click

from ..jobrecord import JobRecord
from ..spool import Job
from . import StationContext, pass_ctx
from .common import json_option, print_json


def delivery_lines(data: JobRecord) -> list[str]:
    """One line per destination: status, counts, storage commitment and verification."""
    from ..commitment import summary

    lines = []
    for name, state in (data.get("destinations") or {}).items():
        text = (f"{name}: {state.get('status', 'not tried')}, {len(state.get('sent', []))} sent"
                + (f", {len(state['failed'])} refused" if state.get("failed") else ""))
        if state.get("commitment"):
            counts = summary(state)
            text += "; commitment: " + ", ".join(f"{n} {k}" for k, n in counts.items() if n)
            text += f" ({len(state['commitment'])} transaction(s))"
        if state.get("verified_at"):
            text += f"; verified by C-FIND at {state['verified_at']}"
        if state.get("error"):
            text += f"; {state['error']}"
        lines.append(text)
    return lines


@click.command(name="show")
@click.argument("job_id", metavar="JOB")
@json_option
@pass_ctx
def command(ctx: StationContext, job_id: str, as_json: bool) -> None:
    """Print a job's job.json and history.

    \b
    Example:
      dts show 20261126T105700.123456Z-3f9a1c2e
      dts show --json JOB | jq .job.destinations
    """
    loc, path = ctx.station.spool.find(job_id)
    job = Job(path)
    data, events = job.read(), job.events()
    if as_json:
        print_json({"location": str(loc), "path": str(path), "job": data, "events": events})
        return
    click.echo(f"# {job_id} in {loc} ({path})")
    info = data.get("slurm")
    if info:
        node = f" on {info['node']}" if info.get("node") else ""
        click.echo(f"# slurm job {info.get('job_id') or '-'} ({info.get('name')}): "
                   f"{info.get('state') or '?'}{node}")
    click.echo(json.dumps(data, indent=2, default=str))
    if data.get("destinations"):
        click.echo("# delivery")
        for line in delivery_lines(data):
            click.echo(line)
    click.echo("# history")
    for ev in events:
        click.echo(f"{ev.get('time', '')}  {ev.get('stage', ''):<8} {ev.get('status', ''):<7} "
                   f"{ev.get('event', ''):<20} {ev.get('message', '')}")
