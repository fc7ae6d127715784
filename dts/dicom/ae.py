"""Owns dts's pynetdicom application entities: set-up with dts's defaults, presentation
contexts, TLS contexts, C-ECHO, who the peer of an association is, and parking a
requestor's reactor (``park_reactor``; the SCU fast path waits for it with
``wait_parked``).

Every AE is made by ``make_ae``, which applies dts's changes to pynetdicom first
(``dts.dicom.patches.tune``).
"""

from __future__ import annotations

import functools
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pynetdicom
from pynetdicom import AE
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext

from . import patches, wire

# What an AE advertises, and accepts, unless told otherwise (wire.DEFAULT_MAX_PDU: as
# fast as "unlimited", and a length a peer announces above it is refused unread).
DEFAULT_MAX_PDU = wire.DEFAULT_MAX_PDU


class NetworkError(Exception):
    """Something on the network went wrong (peer unreachable, association refused)."""


def make_ae(ae_title: str, *, max_pdu: int = DEFAULT_MAX_PDU, acse_timeout: float = 30.0,
            dimse_timeout: float = 60.0, network_timeout: float = 60.0,
            connection_timeout: float | None = 10.0, max_associations: int = 16) -> AE:
    """An AE with dts's defaults (tuned pynetdicom, timeouts, maximum PDU)."""
    patches.tune()
    ae = AE(ae_title=ae_title)
    ae.maximum_pdu_size = max_pdu
    ae.acse_timeout = acse_timeout
    ae.dimse_timeout = dimse_timeout
    ae.network_timeout = network_timeout
    ae.connection_timeout = connection_timeout
    ae.maximum_associations = max_associations
    return ae


def associate(ae: AE, host: str, port: int, *, ae_title: str,
              tls_args: tuple[ssl.SSLContext, str] | None = None,
              evt_handlers: list[Any] | None = None) -> Any:
    """``ae.associate()``, with the peer's rejection even when pynetdicom lost it.

    pynetdicom 3.0's requestor looks whether its socket is still connected only after it
    sent the A-ASSOCIATE-RQ. A peer that rejects and closes at once (dcmtk's ``storescp
    --refuse`` does) may have been read and closed by the DUL thread by then: pynetdicom
    aborts, and the A-ASSOCIATE-RJ it received waits unread in the DUL's queue. Taken from
    there, a rejection for good is reported as one instead of as an unreachable peer."""
    assoc = ae.associate(host, port, ae_title=ae_title, tls_args=tls_args,
                         evt_handlers=evt_handlers)
    if not assoc.is_established and not assoc.is_rejected and patches.version_ok():
        rejection = next((p for p in list(assoc.dul.to_user_queue.queue)
                          if isinstance(p, A_ASSOCIATE) and p.result in (0x01, 0x02)), None)
        if rejection is not None:
            assoc.acceptor.primitive = rejection
            assoc.is_rejected, assoc.is_aborted = True, False
    return assoc


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

    pynetdicom 3.0's ``send_*()`` pause the reactor with a check that can pass while
    the reactor is about to look at the queue, and open it again after every call: with
    a peer that answers within microseconds (as dts's receiver does) the reactor now and
    then takes the response meant for the caller, who then waits for the DIMSE timeout.
    A requestor that only sends (dts echo, a test's SCU) does not need its reactor.
    """
    if not patches.version_ok():
        return False  # internals of another pynetdicom: leave them alone
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
    assoc = associate(ae, host, port, ae_title=called_ae, tls_args=tls_args)
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


def socket_of(assoc: Any) -> Any:
    """The connected socket of ``assoc`` (an ``ssl.SSLSocket`` under TLS), None once
    pynetdicom closed it."""
    return getattr(getattr(assoc.dul, "socket", None), "socket", None)


def cut(assoc: Any) -> None:
    """Shut ``assoc``'s connection down at once, with an A-ABORT if the kernel takes it
    without waiting: a thread blocked reading from a peer that sends nothing returns
    (with nothing), so that pynetdicom can end the association (``abort()``) without
    waiting for that peer."""
    sock = socket_of(assoc)
    if sock is None:
        return
    if not isinstance(sock, ssl.SSLSocket):
        try:
            sock.send(wire.a_abort(0), socket.MSG_DONTWAIT)
        except OSError:
            pass
    shut(sock)


def shut(sock: Any) -> None:
    """Shut a connection down both ways (its reader sees the end at once); the owner
    still closes it."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def reject(assoc: Any, result: int, source: int, diagnostic: int) -> None:
    """Reject an association request from an ``EVT_REQUESTED`` handler, and wait until
    the A-ASSOCIATE-RJ is out. pynetdicom closes the socket as soon as the handler
    returns, often before its DUL thread sent the rejection, so the peer saw a closed
    connection instead (no reason, no "transient"); this waits as pynetdicom does for
    its own rejections (``kill`` returns once the DUL is idle, bounded by its ARTIM
    timer, network_timeout)."""
    assoc.acse.send_reject(result, source, diagnostic)
    assoc.kill()


def widen_backlog(server: Any) -> None:
    """Let the kernel queue as many connections as it allows (socketserver listens with
    5): after a burst of connections, a real peer's SYN would be dropped and retried only
    seconds later (1, 3, 7, 15 s ...), so that a station under a flood answered late."""
    try:
        server.socket.listen(socket.SOMAXCONN)
    except OSError:
        pass


def peer_of(assoc: Any) -> tuple[str, int]:
    """(address, port) of the requestor of an accepted association."""
    info = assoc.requestor.address_info
    return str(info.address), int(info.port)


def requested_sop_classes(contexts: Sequence[PresentationContext]) -> list[str]:
    return sorted({str(cx.abstract_syntax) for cx in contexts})
