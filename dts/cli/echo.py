"""``dts echo [DEST]``: C-ECHO the station itself or a peer; exit 0 reachable, 75 not."""

from __future__ import annotations

import time

import click

from ..config import valid_ae_title
from ..errors import TemporaryFailure, UsageError
from . import StationContext, pass_ctx
from .common import json_option, print_json


@click.command(name="echo")
@click.argument("dest", required=False)
@click.option("--ae-title", help="Called AE title for HOST:PORT (default: ANY-SCP).")
@click.option("--calling-ae", help="Our AE title (default: [station] ae_title).")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds to wait.")
@json_option
@pass_ctx
def command(ctx: StationContext, dest: str | None, ae_title: str | None,
            calling_ae: str | None, timeout: float, as_json: bool) -> None:
    """Check with a DICOM C-ECHO that a peer answers (exit 0) or not (exit 75).

    DEST is a [[destination]] name or HOST:PORT; without it the station's own
    receiver is checked (127.0.0.1 and [station] port). A STOW-RS destination
    (url) is checked with a QIDO-RS request instead.

    \b
    Example:
      dts echo && dts echo pacs && dts echo 10.0.0.5:104 --ae-title PACS
    """
    from .. import dicomweb
    from ..dicom import ae as dicom_ae
    from ..sender import tls_context

    config = ctx.station.config
    tls = None
    server_name: str | None = None
    if dest is None:
        host = config.station.host if config.station.host not in ("0.0.0.0", "::", "") \
            else "127.0.0.1"
        port, called, name = config.station.port, ae_title or config.station.ae_title, "station"
        if config.station.tls is not None:
            tls = dicom_ae.client_ssl_context()
    elif dest in config.destinations and config.destinations[dest].is_web:
        found = dicomweb.echo(config.destinations[dest], timeout)
        if as_json:
            print_json({"dest": dest, "url": found.url, "reachable": True,
                        "ms": round(found.ms, 1)})
        else:
            click.echo(f"{dest}: {found.url} answered QIDO-RS in {found.ms:.0f} ms")
        return
    elif dest in config.destinations:
        d = config.destinations[dest]
        if d.is_folder or not (d.host and d.port and d.ae_title):
            raise UsageError(f"destination {dest!r} is a folder, not a DICOM peer")
        host, port, called, name = d.host, d.port, ae_title or d.ae_title, dest
        tls = tls_context(d)
        server_name = d.tls.server_name if d.tls else None
    elif ":" in dest:
        host, _, port_text = dest.rpartition(":")
        if not port_text.isdigit() or not host:
            raise UsageError(f"not HOST:PORT or a destination name: {dest!r}")
        port, called, name = int(port_text), ae_title or "ANY-SCP", dest
    else:
        raise UsageError(f"unknown destination {dest!r} (configured: "
                         f"{', '.join(sorted(config.destinations)) or 'none'}; or HOST:PORT)")
    calling = calling_ae or config.station.ae_title
    for title in (called, calling):
        if not valid_ae_title(title):
            raise UsageError(f"not a valid AE title: {title!r}")
    t0 = time.monotonic()
    try:
        status = dicom_ae.echo(host, port, called_ae=called, calling_ae=calling,
                               timeout=timeout, tls=tls, server_name=server_name)
    except dicom_ae.NetworkError as exc:
        raise TemporaryFailure(str(exc)) from None
    ms = (time.monotonic() - t0) * 1000
    if status != 0:
        raise TemporaryFailure(f"{called} at {host}:{port} answered C-ECHO with 0x{status:04X}")
    if as_json:
        print_json({"dest": name, "ae_title": called, "host": host, "port": port,
                    "reachable": True, "ms": round(ms, 1)})
    else:
        click.echo(f"{name}: {called} at {host}:{port} answered in {ms:.0f} ms")
