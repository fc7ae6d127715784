"""``dts status``: queue counts and ages, live services, recent failures."""

from __future__ import annotations

import click

from ..config import parse_duration
from ..errors import UsageError
from ..status import needs_attention, station_status
from . import StationContext, pass_ctx
from .common import json_option, print_json


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


@click.command(name="status")
@json_option
@click.option("--check", is_flag=True,
              help="Exit 1 when something needs a person (failed jobs, a queue too old, "
                   "results waiting in review/ longer than [station] review_alert_after).")
@click.option("--max-age", default="1h", show_default=True,
              help="With --check: how old the oldest waiting job may be.")
@pass_ctx
def command(ctx: StationContext, as_json: bool, check: bool, max_age: str) -> None:
    """Show every queue's count and oldest age, and whether the receiver runs.

    \b
    Example:
      dts status
      dts status --json | jq .queues.failed.count
      dts status --check --max-age 30m || notify-admin
    """
    try:
        max_age_s = parse_duration(max_age)
    except ValueError as exc:
        raise UsageError(f"--max-age: {exc}") from None
    st = station_status(ctx.station.spool)
    reasons = needs_attention(st, max_age_s, ctx.station.config.station.review_alert_after) \
        if check else []
    if as_json:
        if check:
            st["attention"] = reasons
        print_json(st)
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"dts spool {st['spool']}", title_justify="left")
        for col in ("queue", "new", "cur", "count", "oldest"):
            table.add_column(col, justify="right" if col != "queue" else "left")
        for name, q in st["queues"].items():
            if name == "incoming":
                table.add_row(name, "", "", str(q["studies"]), "")
            elif "new" in q:
                table.add_row(name, str(q["new"]), str(q["cur"]), "", _age(q["oldest_seconds"]))
                if q.get("slurm"):
                    table.add_row(f"{name}/slurm", "", "", str(q["slurm"]), "")
            else:
                table.add_row(name, "", "", str(q["count"]), _age(q["oldest_seconds"]))
        console = Console()
        console.print(table)
        for svc in ("receiver", "watch", "web"):
            s = st[svc]
            state = f"running (pid {s.get('pid')})" if s["running"] else "not running"
            extra = f" on port {s['port']}" if s.get("running") and s.get("port") else ""
            if svc == "receiver" and s.get("running") and s.get("workers"):
                pids = ", ".join(str(w["pid"]) for w in s["workers"])
                extra += f", {len(s['workers'])} worker process(es): {pids}"
            console.print(f"{svc}: {state}{extra}")
        n = st["notify"]
        if n["pending"] or n["gave_up"]:
            console.print(f"webhooks: {n['pending']} pending (oldest {_age(n['oldest_seconds'])})"
                          f", {n['gave_up']} given up (spool/notify/gave-up/)")
        for j in st["slurm"]["jobs"]:
            where = f" on {j['node']}" if j.get("node") else ""
            console.print(f"slurm: {j['job']}  job {j.get('slurm_job_id') or '-'} "
                          f"{j.get('state') or '?'}{where}")
        console.print(f"errors in the last 24 h: {st['errors_24h']}   free: {st['free_mb']} MB")
        for r in reasons:
            click.echo(f"attention: {r}", err=True)
    if reasons:
        click.get_current_context().exit(1)
