"""Owns serving the page: ``dts web`` as a process of its own (uvicorn), never inside the
receiver's, so the page cannot slow what it shows.

It holds the service lock ``web`` (``tmp/.run/web.pid``: one page per spool, shown as a
service on the overview), binds its socket itself (a port in use is a clear error, and
port 0 works), refuses a host beyond loopback when there is no users file (exit 2:
the page would be open to anyone), serves HTTPS with ``[web] certificate`` and
``private_key``, and stops on SIGTERM/SIGINT (uvicorn's handlers).
"""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn

from ..config import is_loopback
from ..errors import TemporaryFailure, UsageError
from ..journal import Event, Stage, Status
from ..station import Station
from ..status import hold_service, update_service
from .app import create_app
from .users import UserFile


class _Server(uvicorn.Server):
    """uvicorn's server, exiting 0 after SIGTERM/SIGINT like every dts service (uvicorn
    raises the signal again once it has shut down, which would end the process by it)."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise TemporaryFailure(f"dts web cannot listen on {host}:{port}: "
                               f"{exc.strerror or exc}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(station: Station, *, host: str | None = None, port: int | None = None,
          on_ready: Callable[[str], None] | None = None) -> None:
    """Serve the page until SIGTERM/SIGINT."""
    cfg = station.config.web
    host = host or cfg.host
    port = cfg.port if port is None else port
    if not is_loopback(host) and not UserFile(cfg.users_file).any():
        raise UsageError(f"dts web: no users in {cfg.users_file}, so the page would be open "
                         f"to anyone on {host}: listen on 127.0.0.1, or add a user first "
                         "(dts web user add NAME --role admin)")
    # A SIGTERM before uvicorn has its own handlers (it installs them in run()) must not
    # kill the process mid-start: dts watch stops a page that has only just bound.
    stop_early = threading.Event()
    servers: list[uvicorn.Server] = []

    def early(_sig: int, _frame: FrameType | None) -> None:
        stop_early.set()
        for started in servers:  # in run() before its own handlers: it exits at once
            started.should_exit = True

    in_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, early)
                for sig in (signal.SIGTERM, signal.SIGINT)} if in_main else {}
    lock = hold_service(station.spool, "web", host=host, port=port)
    if lock is None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        raise UsageError(f"dts web is already running on spool {station.spool.root}")
    try:
        sock = bind(host, port)
        port = sock.getsockname()[1]
        scheme = "https" if cfg.tls else "http"
        shown = f"[{host}]" if ":" in host else host
        url = f"{scheme}://{shown}:{port}/"
        update_service(lock, {"port": port, "url": url})
        app = create_app(station)
        stop_syncing = threading.Event()
        app.state.web.start_syncing(stop_syncing)
        if station.config.stow.enabled:  # studies received by STOW-RS, published when quiet
            app.state.stow.start(stop_syncing)
        options: dict[str, Any] = {}
        if cfg.certificate is not None and cfg.private_key is not None:
            options = {"ssl_certfile": str(cfg.certificate), "ssl_keyfile": str(cfg.private_key)}
        server = _Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                               lifespan="off", server_header=False,
                                               proxy_headers=False, **options))
        station.journal.emit(Stage.WEB, Event.WEB_STARTED, Status.INFO,
                             f"dts web serves {url}", url=url)
        if on_ready is not None:
            on_ready(url)
        servers.append(server)
        try:
            if not stop_early.is_set():
                server.run(sockets=[sock])
        finally:
            stop_syncing.set()
            sock.close()
            station.journal.emit(Stage.WEB, Event.WEB_STOPPED, Status.INFO,
                                 f"dts web stopped ({url})", url=url)
    finally:
        lock.release()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
