"""Owns everything dts does to pynetdicom: tuning its internals, building AEs, C-ECHO.

pynetdicom 3.0 polls: its DUL thread sleeps ``_run_loop_delay`` (1 ms) whenever a
loop finds nothing to do, and ``Association._run_reactor`` sleeps 1 ms before every
look for a complete DIMSE message. It sets neither ``TCP_NODELAY`` nor
``TCP_QUICKACK``, so against a sender that leaves Nagle's algorithm on (Debian's
dcmtk by default) every small message waits for a delayed ACK (~40 ms), and it
reads the socket 4 KiB at a time. ``tune()`` fixes all of that for the pinned
version only; ``tests/test_dicomnet.py`` fails when the installed pynetdicom
stops looking like the one these changes were written against.

Receiving into files: ``set_receive_directory()`` makes pynetdicom write every
C-STORE data set straight to a file in the given folder (the spool's ``tmp/``) as
its fragments arrive, so a receiver never holds a whole instance in memory and
never joins fragments; the store handler finds it at ``event.dataset_path``.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import secrets
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pynetdicom
from pynetdicom import AE, _config, association, dimse_messages, dul, transport
from pynetdicom.presentation import PresentationContext

LOGGER = logging.getLogger(__name__)

PINNED_VERSION = "3.0.4"
# Polling delay of both reactor threads once tuned (pynetdicom's default: 1 ms).
FAST_DELAY = 0.0001
# How long an association counts as busy after its last activity, and how long an
# idle reactor loop takes at most (a longer one did some work).
LINGER = 0.5
BUSY_LOOP = 0.0003
# The read size of one recv() call; pynetdicom reads 4 KiB at a time.
RECV_CHUNK = 1 << 20
# What we advertise when configured with 0 (unlimited): peers then send large
# P-DATA PDUs, far fewer per image (dcmtk fragments by the receiver's maximum).
DEFAULT_MAX_PDU = 0

_tuned = False
_tune_lock = threading.Lock()
_HAS_QUICKACK = hasattr(socket, "TCP_QUICKACK")


class NetworkError(Exception):
    """Something on the network went wrong (peer unreachable, association refused)."""


def version_ok() -> bool:
    return str(pynetdicom.__version__) == PINNED_VERSION


def is_tuned() -> bool:
    return _tuned


def _set_nodelay(sock: socket.socket | None) -> None:
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:  # not a TCP socket (e.g. closed meanwhile): nothing to tune
        pass


def _quickack(sock: socket.socket) -> None:
    # Not sticky: Linux falls back to delayed ACKs after a while, so re-arm per read.
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    except OSError:
        pass


class _ShortSleepTime:
    """Stands in for the ``time`` module inside ``pynetdicom.association``: only the
    reactor's 1 ms poll changes. It becomes ``FAST_DELAY`` while the association is
    busy (a loop that took longer than an idle one did some work within ``LINGER``)
    and stays 1 ms on an idle association, which would otherwise cost CPU for nothing."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self._local = threading.local()

    def sleep(self, seconds: float) -> None:
        if seconds != 0.001:
            time.sleep(seconds)
            return
        local = self._local
        now = time.monotonic()
        if now - getattr(local, "woke", 0.0) > BUSY_LOOP:
            local.busy_until = now + LINGER
        time.sleep(self.delay if now < getattr(local, "busy_until", 0.0) else seconds)
        local.woke = time.monotonic()

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def _dul_delay(self: dul.DULServiceProvider) -> float:
    """``DULServiceProvider._run_loop_delay``: short while PDUs arrive, 1 ms when idle."""
    last = getattr(self.socket, "_dts_last_rx", 0.0)
    return FAST_DELAY if time.monotonic() - last < LINGER else 0.001


def _ignore_delay(self: dul.DULServiceProvider, value: float) -> None:
    pass  # pynetdicom's __init__ assigns its 1 ms; the property decides


def _recv(self: transport.AssociationSocket, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv`` reading large chunks straight into the result buffer
    and re-arming TCP_QUICKACK before each read. Same contract as the original:
    blocks until ``nr_bytes`` are read, returns less only when the peer closed."""
    sock = self.socket
    assert sock is not None
    self._dts_last_rx = time.monotonic()  # type: ignore[attr-defined]
    buf = bytearray(nr_bytes)
    view = memoryview(buf)
    nr_read = 0
    try:
        while nr_read < nr_bytes:
            if _HAS_QUICKACK:
                _quickack(sock)
            n = sock.recv_into(view[nr_read:], min(nr_bytes - nr_read, RECV_CHUNK))
            if not n:
                break
            nr_read += n
    finally:
        view.release()
    if nr_read < nr_bytes:
        del buf[nr_read:]
    return buf


def _patch_socket_init(original: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(original)
    def __init__(self: transport.AssociationSocket, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        # Requestor sockets are tuned before connect(), accepted ones right away;
        # TLS wraps the same descriptor, so the options survive the handshake.
        _set_nodelay(self.socket)

    __init__._dts_tuned = True  # type: ignore[attr-defined]
    return __init__


def tune() -> bool:
    """Apply dts's changes to pynetdicom once per process; True when applied.

    With another pynetdicom version than the pinned one nothing is changed (the
    station still works, only slower) and a warning says so.
    """
    global _tuned
    with _tune_lock:
        if _tuned:
            return True
        if not version_ok():
            LOGGER.warning("pynetdicom %s is installed, dts is tuned for %s: running "
                           "without its network tuning", pynetdicom.__version__, PINNED_VERSION)
            return False
        association.time = _ShortSleepTime(FAST_DELAY)  # type: ignore[assignment]
        dul.DULServiceProvider._run_loop_delay = property(  # type: ignore[assignment]
            _dul_delay, _ignore_delay)
        transport.AssociationSocket.__init__ = _patch_socket_init(  # type: ignore[method-assign]
            transport.AssociationSocket.__init__)
        transport.AssociationSocket.recv = _recv  # type: ignore[method-assign]
        from . import scp

        scp.install()
        _tuned = True
        return True


class ReceiveFile:
    """What pynetdicom writes a received data set into (it expects a NamedTemporaryFile:
    ``write``, ``file.flush()``, ``name``, ``close()``), made cheaper: an unbuffered file
    with a short unique name and no wrapper (pynetdicom writes whole PDU fragments)."""

    _counter = itertools.count()
    _prefix = f".rx-{os.getpid()}-{secrets.token_hex(3)}-"

    def __init__(self, folder: str) -> None:
        self.name = os.path.join(folder, f"{self._prefix}{next(self._counter)}.dcm")
        self.file = open(self.name, "xb", buffering=0)  # noqa: SIM115 (closed by pynetdicom)
        self.closed = False

    def write(self, data: bytes) -> int:
        return self.file.write(data) or 0

    def fileno(self) -> int:
        return self.file.fileno()

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True
        self.file.close()


def set_receive_directory(path: Path | None) -> None:
    """Have pynetdicom write received C-STORE data sets into files under ``path``
    (the spool's ``tmp/``: same filesystem, so the handler can rename them into
    place); None goes back to holding them in memory. Process-wide."""
    if path is None:
        _config.STORE_RECV_CHUNKED_DATASET = False
        dimse_messages.NamedTemporaryFile = tempfile.NamedTemporaryFile  # type: ignore
        return
    folder = str(path)

    def factory(*args: Any, **kwargs: Any) -> ReceiveFile:
        return ReceiveFile(folder)

    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = factory  # type: ignore


def make_ae(ae_title: str, *, max_pdu: int = DEFAULT_MAX_PDU, acse_timeout: float = 30.0,
            dimse_timeout: float = 60.0, network_timeout: float = 60.0,
            connection_timeout: float | None = 10.0, max_associations: int = 16) -> AE:
    """An AE with dts's defaults (tuned pynetdicom, timeouts, maximum PDU)."""
    tune()
    ae = AE(ae_title=ae_title)
    ae.maximum_pdu_size = max_pdu
    ae.acse_timeout = acse_timeout
    ae.dimse_timeout = dimse_timeout
    ae.network_timeout = network_timeout
    ae.connection_timeout = connection_timeout
    ae.maximum_associations = max_associations
    return ae


def storage_contexts() -> list[PresentationContext]:
    """Every storage SOP class with every transfer syntax pynetdicom knows (compressed
    ones included: a receiver stores the bytes as they come, it never decodes)."""
    return [pynetdicom.build_context(str(cx.abstract_syntax), pynetdicom.ALL_TRANSFER_SYNTAXES)
            for cx in pynetdicom.AllStoragePresentationContexts]


def add_scp_contexts(ae: AE) -> None:
    for cx in storage_contexts():
        ae.add_supported_context(str(cx.abstract_syntax), cx.transfer_syntax)
    ae.add_supported_context(pynetdicom.sop_class.Verification,  # type: ignore[attr-defined]
                             pynetdicom.ALL_TRANSFER_SYNTAXES[:4])


def server_ssl_context(certificate: Path, private_key: Path, ca_certificates: Path | None,
                       require_client_certificate: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(certificate), str(private_key))
    if ca_certificates is not None:
        ctx.load_verify_locations(str(ca_certificates))
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_certificate else ssl.CERT_NONE
    return ctx


def client_ssl_context(ca_certificates: Path | None = None, certificate: Path | None = None,
                       private_key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                     cafile=str(ca_certificates) if ca_certificates else None)
    if ca_certificates is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if certificate is not None and private_key is not None:
        ctx.load_cert_chain(str(certificate), str(private_key))
    return ctx


def destination_ssl_context(ca_certificates: Path | None, certificate: Path | None,
                            private_key: Path | None, verify_peer: bool) -> ssl.SSLContext:
    """TLS towards a destination: its certificate checked against ``ca_certificates``
    (or the system's), and ours presented when given. ssl.SSLError/OSError on bad files."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                     cafile=str(ca_certificates) if ca_certificates else None)
    if not verify_peer:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if certificate is not None and private_key is not None:
        ctx.load_cert_chain(str(certificate), str(private_key))
    return ctx


def tls_problem(host: str, port: int, ctx: ssl.SSLContext, server_name: str,
                timeout: float = 10.0) -> str | None:
    """Why a TLS handshake with ``host:port`` fails (None if it succeeds or the peer is
    not reachable at all): pynetdicom only logs it, an operator needs to read it."""
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return None
    try:
        with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            tls.do_handshake()
            # TLS 1.3: a refused client certificate shows only at the first read
            tls.settimeout(0.5)
            try:
                if tls.recv(1) == b"":
                    return "the peer closed the TLS connection (does it accept our client " \
                           "certificate?)"
            except (TimeoutError, socket.timeout):
                pass
        return None
    except ssl.SSLCertVerificationError as exc:
        return f"TLS: the peer's certificate is not trusted: {exc.verify_message}"
    except ssl.SSLError as exc:
        return f"TLS handshake failed: {exc.reason or exc}"
    except OSError as exc:
        return f"TLS handshake failed: {exc.strerror or exc}"
    finally:
        raw.close()


def wait_parked(assoc: Any, timeout: float = 5.0) -> bool:
    """Wait until an association's reactor blocks on its (closed) checkpoint: seen paused
    twice, a few ms apart (pynetdicom sets ``_is_paused`` just before it waits, so one
    look can catch a reactor that is passing through)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if assoc._is_paused:
            time.sleep(0.004)
            if assoc._is_paused:
                return True
        time.sleep(0.0002)
    return False


class _HeldCheckpoint(threading.Event):
    """An association's reactor checkpoint that stays closed while ``holding``."""

    def __init__(self) -> None:
        super().__init__()
        self.holding = True

    def set(self) -> None:
        if not self.holding:
            super().set()


def park_reactor(assoc: Any, timeout: float = 5.0) -> bool:
    """Keep a requestor association's reactor away from the DIMSE queue until
    ``release()`` or ``abort()``; True if it is parked.

    pynetdicom 3.0.4's ``send_*()`` pause the reactor with a check that can pass while
    the reactor is about to look at the queue, and open it again after every call: with
    a peer that answers within microseconds (as dts's receiver does) the reactor now and
    then takes the response meant for the caller, who then waits for the DIMSE timeout.
    A requestor that only sends (dts echo, a test's SCU) does not need its reactor.
    """
    if not version_ok():
        return False
    held = _HeldCheckpoint()
    assoc._reactor_checkpoint = held
    parked = wait_parked(assoc, timeout)

    def let_go(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            held.holding = False
            held.set()
            return method(*args, **kwargs)
        return call

    assoc.release = let_go(assoc.release)
    assoc.abort = let_go(assoc.abort)
    if not parked:
        held.holding = False
        held.set()
    return parked


def echo(host: str, port: int, *, called_ae: str, calling_ae: str = "DTS",
         timeout: float = 10.0, tls: ssl.SSLContext | None = None,
         server_name: str | None = None) -> int:
    """C-ECHO ``called_ae`` at ``host:port``; the status (0 = success).

    Raises NetworkError when no association could be made or no answer came.
    """
    ae = make_ae(calling_ae, acse_timeout=timeout, dimse_timeout=timeout,
                 network_timeout=timeout, connection_timeout=timeout)
    ae.add_requested_context(pynetdicom.sop_class.Verification)  # type: ignore[attr-defined]
    tls_args = (tls, server_name or host) if tls is not None else None
    assoc = ae.associate(host, port, ae_title=called_ae, tls_args=tls_args)
    if assoc.is_rejected:
        raise NetworkError(f"{called_ae} at {host}:{port} rejected the association")
    if not assoc.is_established:
        problem = tls_problem(host, port, tls, server_name or host) if tls else None
        raise NetworkError(f"cannot reach {called_ae} at {host}:{port}"
                           + (f": {problem}" if problem else ""))
    try:
        park_reactor(assoc)
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    if status is None or "Status" not in status:
        raise NetworkError(f"{called_ae} at {host}:{port} did not answer the C-ECHO")
    return int(status.Status)


def peer_of(assoc: Any) -> tuple[str, int]:
    """(address, port) of the requestor of an accepted association."""
    info = assoc.requestor.address_info
    return str(info.address), int(info.port)


def requested_sop_classes(contexts: Sequence[PresentationContext]) -> list[str]:
    return sorted({str(cx.abstract_syntax) for cx in contexts})
