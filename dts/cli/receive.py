"""``dts receive``: serve DICOM C-STORE/C-ECHO until SIGTERM or SIGINT."""

from __future__ import annotations

import click

from ..errors import TemporaryFailure
from ..receiver import Receiver
from ..status import hold_service
from . import StationContext, pass_ctx
from .common import stop_on_signals


@click.command(name="receive")
@click.option("--host", help="Address to listen on (default: [station] host).")
@click.option("--port", type=click.IntRange(0, 65535),
              help="Port to listen on (default: [station] port; 0 picks a free one).")
@pass_ctx
def command(ctx: StationContext, host: str | None, port: int | None) -> None:
    """Receive studies over DICOM into the spool until stopped.

    Every instance is on disk before success is answered; a study that was
    quiet for [station] stable_seconds, with no open association carrying it,
    becomes a job in classify/new/. Studies still arriving when the receiver
    stops are published after the next start.

    \b
    Example:
      dts receive --port 11112 &
      storescu -aet PACS -aec DTS +sd +r localhost 11112 /data/exam
    """
    station = ctx.station
    cfg = station.config.station
    receiver = Receiver(station, host=host, port=port)
    lock = hold_service(station.spool, "receiver", port=receiver.port, ae_title=cfg.ae_title,
                        host=receiver.host)
    if lock is None:
        raise TemporaryFailure(f"another receiver is already running on spool {station.spool.root}")
    with stop_on_signals() as stop:
        try:
            receiver.start()
            click.echo(f"dts receive: {cfg.ae_title} listening on {receiver.host}:"
                       f"{receiver.port}", err=True)
            while not stop.wait(1.0):
                pass
            click.echo("dts receive: stopping", err=True)
            receiver.stop()
        finally:
            lock.release()
