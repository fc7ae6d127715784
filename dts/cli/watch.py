"""``dts watch``: the receiver and every stage in one process, until SIGTERM/SIGINT."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import click

from ..config import parse_duration
from ..errors import UsageError
from ..watch import Watch
from ..worker import Outcome
from . import StationContext, is_terminal, pass_ctx
from .common import stop_on_signals


def _stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())


def _status_line(snap: dict[str, Any]) -> str:
    q = snap["queues"]
    parts = [f"incoming {q['incoming']['studies']}"]
    for name in ("classify", "run", "send"):
        st = snap["stages"][name]
        active = f" ({', '.join(a[-8:] for a in st['active'])})" if st["active"] else ""
        parts.append(f"{name} {q[name]['new']}+{len(st['active'])}{active}")
    parts.append(f"done {q['done']['count']}  failed {q['failed']['count']}  "
                 f"unmatched {q['unmatched']['count']}")
    if snap["journal_db"] is False:
        parts.append("journal db DOWN")
    return "  ".join(parts)


@click.command(name="watch")
@click.option("--host", help="Receiver address (default: [station] host).")
@click.option("--port", type=click.IntRange(0, 65535), help="Receiver port (default: [station] port).")
@click.option("--receive/--no-receive", default=True, show_default=True,
              help="Run the receiver too (--no-receive when `dts receive` runs separately).")
@click.option("--web/--no-web", default=None,
              help="Start the page (dts web) as a supervised child process "
                   "(default: [web] enabled).")
@click.option("--grace", default="30s", show_default=True,
              help="On SIGTERM: how long running processing may finish before it is stopped "
                   "and its job put back.")
@pass_ctx
def command(ctx: StationContext, host: str | None, port: int | None, receive: bool,
            web: bool | None, grace: str) -> None:
    """Run the whole station: receive, classify, run and send, until stopped.

    Each stage starts the moment work appears in its queue (and rescans every
    [station] rescan_seconds anyway). Jobs of workers that died are recovered at
    start. SIGTERM or SIGINT stops accepting, lets in-flight work finish (up to
    --grace, then running processing is stopped and its job put back), exits 0;
    a second SIGINT skips the grace period. On a terminal a live status line is
    shown, otherwise one line per finished job on stderr. With [web] enabled
    (or --web) the page runs beside it as a child process (dts web), restarted
    if it dies.

    \b
    Example:
      dts --config /etc/dts/dts.toml watch
      systemctl start dts-watch      # the unit in configuration/systemd/
    """
    try:
        grace_s = parse_duration(grace)
    except ValueError as exc:
        raise UsageError(f"--grace: {exc}") from None
    station = ctx.station
    live = is_terminal() and sys.stderr.isatty()

    def on_result(stage: str, job: str, outcome: Outcome) -> None:
        if not live:
            click.echo(f"{_stamp()} {stage:<8} {outcome.value:<7} {job}", err=True)

    def on_event(message: str) -> None:
        click.echo(f"{_stamp()} dts watch: {message}", err=True)

    w = Watch(station, host=host, port=port, receive=receive, grace=grace_s, web=web,
              on_result=on_result, on_event=on_event)
    # asked twice: do not wait for the grace period
    with stop_on_signals(again=w.cancel.set) as stop:
        _serve(w, stop, live)


def _serve(w: Watch, stop: threading.Event, live: bool) -> None:
    if not live:
        w.run(stop)
        return
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    errors: list[BaseException] = []

    def body() -> None:
        try:
            w.run(stop)
        except BaseException as exc:
            errors.append(exc)
            stop.set()
    runner = threading.Thread(target=body, name="dts-watch", daemon=True)
    runner.start()
    with Live(console=Console(stderr=True), refresh_per_second=2, transient=True) as view:
        while runner.is_alive():
            view.update(Text(_status_line(w.snapshot())))
            runner.join(0.5)
    if errors:
        raise errors[0]
