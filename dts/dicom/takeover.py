"""Owns keeping pynetdicom's DUL thread off an established association's socket while dts
exchanges P-DATA-TF PDUs on it itself (the fast paths of ``scp`` and ``scu``).

The DUL thread reads each PDU off the socket. ``hold_socket`` keeps it away the same
way for both fast paths: the socket's wrapper becomes a ``QuietSocket`` (nothing is
ever ready to read), then the DUL's receive lock is taken once. ``dts.dicom.patches``
makes the DUL look at the socket and read a PDU only under that lock
(``locked_transport_event``), so once the lock was had, a read that started before the
swap is over (whole PDUs are all it took) and every later look sees the quiet socket.
No sleep, no guess. (The reactor thread is parked by the caller: the SCP runs in it,
the SCU parks it, see ``ae.wait_parked``.)

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
# How long the DUL thread naps at a held socket before it looks at its other work again
# (a primitive to send, such as an A-ABORT, its timers); handing the socket back wakes
# it at once.
QUIET_NAP = 0.05


class QuietSocket(transport.AssociationSocket):
    """An association's socket while dts reads from it: pynetdicom's DUL thread finds
    nothing to read, and naps until the socket is handed back (``QUIET_NAP`` at most:
    a primitive it is given to send, an abort, still goes out). It used to nap 2 ms,
    which woke the thread, and took the interpreter lock from the reader, 500 times a
    second for every association."""

    @property
    def ready(self) -> bool:
        wake = self.__dict__.get("_dts_wake")
        if wake is None:
            time.sleep(0.002)
        else:
            wake.wait(QUIET_NAP)
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
    wake = wrapper.__dict__.get("_dts_wake")
    if wake is None:
        wake = wrapper.__dict__.setdefault("_dts_wake", threading.Event())
    wake.clear()
    wrapper.__class__ = QuietSocket
    lock = _rx_lock(provider)
    if not lock.acquire(timeout=HOLD_WAIT):
        wrapper.__class__ = transport.AssociationSocket
        wake.set()
        return None
    lock.release()  # a read that started before the swap is over; later ones see nothing
    return sock


def release_socket(assoc: Any) -> None:
    """Let the DUL thread read ``assoc``'s socket again (call between two whole PDUs)."""
    wrapper = assoc.dul.socket
    if type(wrapper) is QuietSocket:
        wrapper.__class__ = transport.AssociationSocket  # type: ignore[assignment]
        wake = wrapper.__dict__.get("_dts_wake")
        if wake is not None:
            wake.set()
