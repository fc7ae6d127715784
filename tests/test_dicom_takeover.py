"""Taking an association's socket away from pynetdicom's DUL thread (dts.dicom.takeover):
proven by the receive lock, never by a sleep."""

from __future__ import annotations

import socket
import threading
from types import SimpleNamespace
from typing import Any

import pytest
from pynetdicom import transport

from dts.dicom import takeover
from tests.helpers import tcp_pair


class _Reading:
    """A DUL whose transport check reads a PDU until told to finish."""

    def __init__(self, sock: socket.socket) -> None:
        self.socket = transport.AssociationSocket.__new__(transport.AssociationSocket)
        self.socket.socket = sock
        self.started = threading.Event()
        self.finish = threading.Event()
        self.saw_ready: list[bool] = []

    def _look(self) -> bool:
        if not self.started.is_set():
            self.started.set()
            self.finish.wait(10)  # "reading a PDU"
            return True
        self.saw_ready.append(type(self.socket) is not takeover.QuietSocket)
        return False


class _LockedDUL(_Reading):
    _is_transport_event = takeover.locked_transport_event(_Reading._look)


class _UnlockedDUL(_Reading):
    _is_transport_event = _Reading._look


@pytest.fixture
def pair() -> Any:
    left, right = tcp_pair()
    yield left, right
    left.close()
    right.close()


def test_hold_waits_for_a_read_in_progress_and_later_looks_see_nothing(pair: Any) -> None:
    _left, right = pair
    dul = _LockedDUL(right)
    assoc = SimpleNamespace(dul=dul)
    reader = threading.Thread(target=dul._is_transport_event)
    reader.start()
    assert dul.started.wait(5)
    got: list[Any] = []
    holder = threading.Thread(target=lambda: got.append(takeover.hold_socket(assoc)))
    holder.start()
    holder.join(0.2)
    assert holder.is_alive(), "took the socket while the DUL was reading from it"
    assert type(dul.socket) is takeover.QuietSocket  # later looks find nothing to read
    dul.finish.set()
    holder.join(5)
    reader.join(5)
    assert got == [right]
    dul._is_transport_event()
    assert dul.saw_ready == [False]
    takeover.release_socket(assoc)
    assert type(dul.socket) is transport.AssociationSocket


def test_a_read_that_does_not_end_leaves_the_socket_to_pynetdicom(
        pair: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _left, right = pair
    monkeypatch.setattr(takeover, "HOLD_WAIT", 0.1)
    dul = _LockedDUL(right)
    reader = threading.Thread(target=dul._is_transport_event)
    reader.start()
    assert dul.started.wait(5)
    try:
        assert takeover.hold_socket(SimpleNamespace(dul=dul)) is None
        assert type(dul.socket) is transport.AssociationSocket
    finally:
        dul.finish.set()
        reader.join(5)


def test_without_the_lock_installed_nothing_is_taken(pair: Any) -> None:
    _left, right = pair
    dul = _UnlockedDUL(right)
    assert takeover.hold_socket(SimpleNamespace(dul=dul)) is None
    assert type(dul.socket) is transport.AssociationSocket
