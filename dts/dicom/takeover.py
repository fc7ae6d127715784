"""Owns keeping pynetdicom's own threads away from an established association while dts
exchanges P-DATA-TF PDUs on its socket itself (the fast paths of ``scp`` and ``scu``).

An association runs two pynetdicom threads: the DUL thread reads each PDU off the
socket, the reactor takes complete DIMSE messages off the DIMSE queue.

- ``hold_socket`` keeps the DUL thread off the socket, the same way for both fast paths:
  the socket's wrapper becomes a ``QuietSocket`` (nothing is ever ready to read), then
  the DUL's receive lock is taken once. ``dts.dicom.patches`` makes the DUL look at the
  socket and read a PDU only under that lock (``locked_transport_event``), so once the
  lock was had, a read that started before the swap is over, whole PDUs are all it
  took, and every later look sees the quiet socket. No sleep, no guess.
- ``park_reactor``/``wait_parked`` keep a requestor's reactor at its checkpoint, away
  from the DIMSE queue.

Everything here relies on pynetdicom internals that ``dts.dicom.patches`` checks.
"""

from __future__ import annotations

import functools
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from pynetdicom import transport

# How long hold_socket() waits for a DUL read in progress: a whole PDU at most, and none
# is expected (each side holds the socket only while its peer waits for it).
HOLD_WAIT = 1.0


class QuietSocket(transport.AssociationSocket):
    """An association's socket while dts reads from it: pynetdicom's DUL thread finds
    nothing to read (and naps 2 ms instead of polling) until the socket is handed back.
    Primitives it is given to send (an abort) still go out."""

    @property
    def ready(self) -> bool:
        time.sleep(0.002)
        return False


def _rx_lock(provider: Any) -> threading.Lock:
    lock = provider.__dict__.get("_dts_rx")
    if lock is None:
        lock = provider.__dict__.setdefault("_dts_rx", threading.Lock())
    return lock  # type: ignore[no-any-return]


def locked_transport_event(original: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """``DULServiceProvider._is_transport_event`` (look at the socket, read a PDU if one
    is there) under the provider's receive lock, so that ``hold_socket`` can wait out a
    read."""

    @functools.wraps(original)
    def _is_transport_event(self: Any) -> bool:
        with _rx_lock(self):
            return original(self)

    _is_transport_event._dts_locked = True  # type: ignore[attr-defined]
    return _is_transport_event


def hold_socket(assoc: Any) -> socket.socket | None:
    """Keep ``assoc``'s DUL thread off its socket; the plain TCP socket to use, or None
    when the fast path does not apply (TLS, a socket pynetdicom did not make, the lock
    not installed or a read not over within ``HOLD_WAIT``): pynetdicom carries on."""
    provider = assoc.dul
    wrapper = provider.socket
    sock = getattr(wrapper, "socket", None)
    if type(wrapper) is not transport.AssociationSocket or sock is None \
            or isinstance(sock, ssl.SSLSocket):
        return None
    if not getattr(type(provider)._is_transport_event, "_dts_locked", False):
        return None  # not tuned: nothing makes the swap below safe
    wrapper.__class__ = QuietSocket
    lock = _rx_lock(provider)
    if not lock.acquire(timeout=HOLD_WAIT):
        wrapper.__class__ = transport.AssociationSocket
        return None
    lock.release()  # a read that started before the swap is over; later ones see nothing
    return sock


def release_socket(assoc: Any) -> None:
    """Let the DUL thread read ``assoc``'s socket again (call between two whole PDUs)."""
    wrapper = assoc.dul.socket
    if type(wrapper) is QuietSocket:
        wrapper.__class__ = transport.AssociationSocket  # type: ignore[assignment]


# -- the reactor ---------------------------------------------------------------------------

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
    ``release()`` or ``abort()``; True if it is parked (never without dts's patches).

    pynetdicom 3.0's ``send_*()`` pause the reactor with a check that can pass while
    the reactor is about to look at the queue, and open it again after every call: with
    a peer that answers within microseconds (as dts's receiver does) the reactor now and
    then takes the response meant for the caller, who then waits for the DIMSE timeout.
    A requestor that only sends (dts echo, a test's SCU) does not need its reactor.
    """
    if not getattr(type(assoc.dul)._is_transport_event, "_dts_locked", False):
        return False  # another pynetdicom than the one checked: leave it alone
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
