"""``dts receive``: serve DICOM C-STORE/C-ECHO until SIGTERM or SIGINT."""

from __future__ import annotations

import os
import re
import socket
import time

import click

from ..errors import TemporaryFailure, UsageError
from ..status import hold_service, update_service
from . import StationContext, pass_ctx
from .common import stop_on_signals


@click.command(name="receive")
@click.option("--host", help="Address to listen on (default: [station] host).")
@click.option("--port", type=click.IntRange(0, 65535),
              help="Port to listen on (default: [station] port; 0 picks a free one).")
@click.option("--worker", hidden=True, metavar="K/N@PID:FD",
              help="Internal: serve as worker K of N of the receiver PID, which hands it "
                   "connections over the Unix socket FD.")
@pass_ctx
def command(ctx: StationContext, host: str | None, port: int | None,
            worker: str | None) -> None:
    """Receive studies over DICOM into the spool until stopped.

    Every instance is on disk before success is answered; a study that was
    quiet for [station] stable_seconds, with no open association carrying it,
    becomes a job in classify/new/. Studies still arriving when the receiver
    stops are published after the next start. [station] receive_workers
    processes (default: one per core) serve the port together; `dts status`
    lists them.

    \b
    Example:
      dts receive --port 11112 &
      storescu -aet PACS -aec DTS +sd +r localhost 11112 /data/exam
    """
    if worker is not None:
        return _serve_as_worker(ctx, host, port, worker)
    from ..receivepool import make_receiver

    station = ctx.station
    cfg = station.config.station
    receiver = make_receiver(station, host=host, port=port)
    lock = hold_service(station.spool, "receiver", port=receiver.port, ae_title=cfg.ae_title,
                        host=receiver.host)
    if lock is None:
        raise TemporaryFailure(f"another receiver is already running on spool {station.spool.root}")
    with stop_on_signals() as stop:
        try:
            receiver.start()
            details = {"port": receiver.port}
            if hasattr(receiver, "pids"):
                details["workers"] = receiver.pids()
                receiver.on_change = lambda pids: update_service(lock, {"workers": pids})
            update_service(lock, details)
            click.echo(f"dts receive: {cfg.ae_title} listening on {receiver.host}:"
                       f"{receiver.port}", err=True)
            while not stop.wait(1.0):
                pass
            click.echo("dts receive: stopping", err=True)
            receiver.stop()
        finally:
            lock.release()


def _serve_as_worker(ctx: StationContext, host: str | None, port: int | None,
                     worker: str) -> None:
    """One of ``dts.receivepool``'s workers: the supervisor holds the port and the
    ``receiver`` lock; this process listens beside the others until SIGTERM, or until
    its supervisor is gone."""
    from ..receivepool import die_with_parent
    from ..receiver import Receiver

    match = re.fullmatch(r"(\d+)/(\d+)@(\d+):(\d+)", worker)
    if match is None or not int(match[1]) < int(match[2]) or port is None:
        raise UsageError("--worker K/N@PID:FD (K < N) with --port: started by dts receive "
                         "itself")
    parent = int(match[3])
    if not die_with_parent(parent):
        raise TemporaryFailure("the receiver that started this worker is gone")
    channel = _channel(int(match[4]))
    station = ctx.station
    index, workers = int(match[1]), int(match[2])
    # the worker of a supervisor killed a moment ago may still be dying (its kernel-sent
    # SIGKILL is on the way): wait for its lock a little before giving up
    deadline = time.monotonic() + 15
    while (lock := hold_service(station.spool, f"receiver-worker-{index}",
                                worker=index)) is None:
        if time.monotonic() > deadline:
            raise TemporaryFailure(f"receive worker {index} is already running")
        time.sleep(0.1)
    receiver = Receiver(station, host=host, port=port, workers=workers, channel=channel)
    with stop_on_signals() as stop:
        try:
            receiver.start()
            update_service(lock, {"port": receiver.port, "listening": True})
            while not stop.wait(0.5):
                if os.getppid() != parent:
                    break  # the supervisor died: so does this worker (its jobs are safe)
            receiver.stop()
        finally:
            lock.release()


def _channel(fd: int) -> socket.socket:
    """The worker's end of the socket pair its supervisor hands connections over."""
    try:
        channel = socket.socket(fileno=fd)
    except OSError as exc:
        raise UsageError(f"--worker: descriptor {fd} is no socket: {exc.strerror or exc}") \
            from None
    if channel.family != socket.AF_UNIX or channel.type != socket.SOCK_SEQPACKET:
        channel.detach()
        raise UsageError(f"--worker: descriptor {fd} is not the receiver's socket pair")
    return channel
