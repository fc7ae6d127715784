"""``dts show JOB``: a job's job.json, where it is, and its history."""

from __future__ import annotations

import json

import click

from ..spool import Job
from . import StationContext, pass_ctx
from .common import json_option, print_json


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
    click.echo("# history")
    for ev in events:
        click.echo(f"{ev.get('time', '')}  {ev.get('stage', ''):<8} {ev.get('status', ''):<7} "
                   f"{ev.get('event', ''):<20} {ev.get('message', '')}")
