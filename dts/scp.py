"""Owns the fast path of dts's C-STORE SCP: a stream of C-STOREs read off the socket here.

pynetdicom 3.0 receives a C-STORE through two polling threads: its DUL thread reads each
PDU, runs it through the state machine and hands every fragment to the DIMSE layer; the
association's reactor polls for the complete message, calls the store handler, encodes
the response with pydicom and queues it back to the DUL thread to be sent. On a 2-core
machine those hand-overs cost more per instance than writing it durably.

Exchanging P-DATA-TF PDUs leaves an established association in the state it is in, so
once pynetdicom has delivered the first C-STORE of an association (and the peer, waiting
for its response, is silent) the reactor thread keeps the socket for itself:

- the DUL thread is kept off the socket (it still sends what it is given: an A-ABORT);
- each following PDU is looked at before it is read (``MSG_PEEK``): anything but a
  P-DATA-TF (a release request, an A-ABORT) is left for pynetdicom, the socket is
  handed back and pynetdicom goes on exactly as it would have;
- a C-STORE-RQ's data set is streamed into a file in the spool's ``tmp/`` behind the
  same file meta pynetdicom writes, the handler is called with the file, and the
  C-STORE-RSP is encoded and sent here; when the file cannot be written (disk full)
  the rest of the data set is read and dropped, and the handler is called with the
  error, so that the peer gets the handler's failure status, not a broken association;
- any other request (a C-ECHO) is handed to pynetdicom's DIMSE layer as it came, with
  the socket, and served by pynetdicom.

Used only with the pinned pynetdicom (``dicomnet.version_ok()``) and on plain TCP; a TLS
association is served by pynetdicom alone.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pynetdicom
from pynetdicom import association, dul, transport
from pynetdicom.pdu_primitives import P_DATA

from . import dimse

LOGGER = logging.getLogger(__name__)

P_DATA_TF = 0x04
MAX_COMMAND = 64 * 1024  # a command set is a few hundred bytes; more is not a peer we serve
CHUNK = 1 << 20
HANDLER_FAILED = 0xC211  # what pynetdicom answers when its handler raised
POLL = 0.5  # how often a wait for the next PDU looks whether the association was ended

_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


@dataclass
class StoreRequest:
    """What the store handler gets: the request's identity and the received file."""

    AffectedSOPClassUID: str
    AffectedSOPInstanceUID: str
    MessageID: int
    transfer_syntax: str
    path: str
    _dataset_file: Any  # open until the handler returns (it may fsync it)
    error: str | None = None  # the data set could not be written (path and file unusable)


StoreHandler = Callable[[Any, StoreRequest], int]


class QuietSocket(transport.AssociationSocket):
    """An association's socket while dts reads from it: pynetdicom's DUL thread finds
    nothing to read (and naps 2 ms instead of polling) until the socket is handed back.
    Primitives it is given to send (an abort) still go out."""

    @property
    def ready(self) -> bool:
        time.sleep(0.002)
        return False


def enable(ae: Any, store: StoreHandler, receive_dir: str) -> None:
    """Serve the C-STOREs of ``ae``'s accepted associations on the fast path: ``store``
    is called with each request once its data set is in a file under ``receive_dir``."""
    ae._dts_store = (store, receive_dir)


# -- what dicomnet.tune() installs ---------------------------------------------------------

_original_serve: Callable[..., None] | None = None
_original_transport_event: Callable[..., bool] | None = None


def install() -> None:
    """Hook the fast path into pynetdicom (by ``dicomnet.tune()``, pinned version only)."""
    global _original_serve, _original_transport_event
    if _original_serve is not None:
        return
    _original_serve = association.Association._serve_request
    _original_transport_event = dul.DULServiceProvider._is_transport_event
    association.Association._serve_request = _serve_request  # type: ignore[method-assign]
    dul.DULServiceProvider._is_transport_event = _is_transport_event  # type: ignore


def _rx_lock(provider: Any) -> threading.Lock:
    lock = provider.__dict__.get("_dts_rx")
    if lock is None:
        lock = provider.__dict__.setdefault("_dts_rx", threading.Lock())
    return lock  # type: ignore[no-any-return]


def _is_transport_event(self: dul.DULServiceProvider) -> bool:
    """pynetdicom's, under a lock, so that taking the socket can wait out a read."""
    assert _original_transport_event is not None
    with _rx_lock(self):
        return _original_transport_event(self)


def _serve_request(self: association.Association, msg: Any, context_id: int) -> None:
    assert _original_serve is not None
    loop = _Loop.take(self, msg)
    try:
        _original_serve(self, msg, context_id)
    except BaseException:
        if loop is not None:
            loop.give()
        raise
    if loop is not None:
        loop.run()


# -- the loop ------------------------------------------------------------------------------

class _HandBack(Exception):
    """Stop the fast path; pynetdicom carries on with the association."""


class _Abort(Exception):
    """The peer broke the protocol: the association is aborted."""


class _Loop:
    def __init__(self, assoc: association.Association, sock: socket.socket,
                 store: StoreHandler, receive_dir: str) -> None:
        self.assoc = assoc
        self.sock = sock
        self.store = store
        self.receive_dir = receive_dir
        self.timeout = assoc.network_timeout
        self.saved_timeout = sock.gettimeout()
        self.buf = bytearray(CHUNK)
        self.held = True
        self.spare: Any = None  # the next data set's file, made while the peer is busy

    @classmethod
    def take(cls, assoc: association.Association, msg: Any) -> _Loop | None:
        """Keep the DUL thread off the socket while ``msg`` (a C-STORE-RQ whose peer now
        waits for the response) is served; None when the fast path does not apply."""
        hook = getattr(assoc.ae, "_dts_store", None)
        if hook is None or type(msg).__name__ != "C_STORE" or not assoc.is_acceptor:
            return None
        if not assoc.is_established or assoc._kill:
            return None
        wrapper = assoc.dul.socket
        sock = getattr(wrapper, "socket", None)
        if type(wrapper) is not transport.AssociationSocket or sock is None \
                or isinstance(sock, ssl.SSLSocket):
            return None
        wrapper.__class__ = QuietSocket
        with _rx_lock(assoc.dul):
            pass  # a read that started before the swap is over
        if assoc.dimse.message is not None or not assoc.dimse.msg_queue.empty():
            wrapper.__class__ = transport.AssociationSocket  # more came in: pynetdicom's
            return None
        store, receive_dir = hook
        return cls(assoc, sock, store, receive_dir)

    def give(self) -> None:
        """Hand the socket back to pynetdicom (between two complete PDUs)."""
        if not self.held:
            return
        self.held = False
        wrapper = self.assoc.dul.socket
        if type(wrapper) is QuietSocket:
            wrapper.__class__ = transport.AssociationSocket  # type: ignore[assignment]
        try:
            self.sock.settimeout(self.saved_timeout)
        except OSError:
            pass

    def run(self) -> None:
        try:
            self.sock.settimeout(self.timeout)
            while self._next_is_p_data():
                self._message()
        except _HandBack:
            pass
        except _Abort as exc:
            LOGGER.warning("aborting the association from %s: %s",
                           self.assoc.requestor.address, exc)
            self.give()
            self.assoc.abort()
            return
        except OSError as exc:  # the connection broke: pynetdicom notices it too
            LOGGER.info("association from %s: %s", self.assoc.requestor.address, exc)
        except Exception:  # a bug of ours must not leave the peer hanging
            LOGGER.exception("fast C-STORE path failed; aborting the association")
            self.give()
            self.assoc.abort()
        finally:
            self.give()
            if self.spare is not None:
                self.spare.close()
                _unlink(self.spare.name)
                self.spare = None

    # -- reading -------------------------------------------------------------------------
    def _next_is_p_data(self) -> bool:
        """Wait for the next PDU (within the network timeout); True if it is a P-DATA-TF.
        Nothing is consumed: whatever else comes is pynetdicom's to read. The wait looks
        every ``POLL`` seconds whether the association was ended meanwhile."""
        assoc, sock = self.assoc, self.sock
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        sock.settimeout(POLL)  # between two timeouts: no system call, data is read at once
        try:
            while True:
                try:
                    head = sock.recv(1, socket.MSG_PEEK)
                except TimeoutError:
                    if assoc._kill or not assoc.is_established or not assoc.dul.is_alive():
                        return False
                    if deadline is not None and time.monotonic() > deadline:
                        return False  # quiet for network_timeout: pynetdicom's timer says so
                    continue
                assoc.dul._idle_timer.restart()
                return bool(head) and head[0] == P_DATA_TF  # else pynetdicom's (or closed)
        finally:
            sock.settimeout(self.timeout)

    def _read(self, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        try:
            while got < n:
                k = self.sock.recv_into(view[got:], n - got)
                if not k:
                    raise ConnectionError("the peer closed the connection")
                got += k
        finally:
            view.release()
        return buf

    def _copy(self, n: int, fd: int | None) -> OSError | None:
        """Stream ``n`` bytes from the socket into file descriptor ``fd`` (None: read and
        drop them); the write error, if writing failed (the rest is then dropped)."""
        view = memoryview(self.buf)
        failed: OSError | None = None
        try:
            while n:
                k = self.sock.recv_into(view, min(n, CHUNK))
                if not k:
                    raise ConnectionError("the peer closed the connection")
                written = 0
                while fd is not None and written < k:
                    try:
                        written += _write(fd, view[written:k])
                    except OSError as exc:
                        failed, fd = exc, None
                n -= k
        finally:
            view.release()
        return failed

    def _quickack(self) -> None:
        if _QUICKACK is not None:  # not sticky: re-armed for every message
            try:
                self.sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            except OSError:
                pass

    # -- one message ---------------------------------------------------------------------
    def _message(self) -> None:
        """Read one whole C-STORE-RQ (the next PDU is a P-DATA-TF), store it, answer it."""
        command = bytearray()
        raw: list[tuple[int, bytes]] = []  # the command's PDVs, in case it is not ours
        fields: dict[int, bytes] | None = None
        context_id = 0
        rx: Any = None
        error: str | None = None  # the data set cannot be written: read, dropped, refused
        try:
            first = True
            while True:
                if not first and not self._next_is_p_data():
                    raise _HandBack()  # cut off (an A-ABORT, a close): pynetdicom's to tell
                first = False
                self._quickack()
                head = self._read(6)
                if head[0] != P_DATA_TF:
                    raise _Abort(f"PDU type 0x{head[0]:02X} in the middle of a message")
                left = struct.unpack_from(">I", head, 2)[0]
                while left:
                    if left < 6:
                        raise _Abort("a P-DATA-TF PDU with a broken item")
                    pdv_len, cx, flags = struct.unpack(">IBB", self._read(6))
                    n = pdv_len - 2
                    if n < 0 or pdv_len + 4 > left:
                        raise _Abort("a P-DATA-TF PDU with a broken item")
                    left -= pdv_len + 4
                    if flags & 0x01:  # command
                        if fields is not None or len(command) + n > MAX_COMMAND:
                            raise _Abort("a command set out of place or too long")
                        data = self._read(n)
                        command += data
                        raw.append((cx, bytes((flags,)) + data))
                        if flags & 0x02:
                            fields = dimse.command_fields(bytes(command))
                            context_id = cx
                            if not self._ours(fields, cx):
                                self._hand_over(raw, left)
                            try:
                                rx = self._open(fields, cx)
                            except OSError as exc:
                                error = f"cannot write: {exc.strerror or exc}"
                        continue
                    if fields is None or (rx is None and error is None):
                        raise _Abort("a data set without its command")
                    failed = self._copy(n, rx.fileno() if error is None else None)
                    if failed is not None and error is None:
                        error = f"cannot write: {failed.strerror or failed}"
                    if flags & 0x02:
                        if left:
                            raise _Abort("data after the last fragment of a data set")
                        self._answer(fields, context_id, rx, error)
                        rx = None
                        return
        finally:
            if rx is not None:  # cut off: never acknowledged
                rx.close()
                _unlink(rx.name)

    def _ours(self, fields: dict[int, bytes], cx: int) -> bool:
        if dimse.u16(fields, 0x0100) != dimse.C_STORE_RQ:
            return False
        if dimse.u16(fields, 0x0800) in (None, dimse.NO_DATA_SET):
            return False
        context = self.assoc._accepted_cx.get(cx)
        return context is not None and bool(context.transfer_syntax)

    def _hand_over(self, raw: list[tuple[int, bytes]], left: int) -> None:
        """Give a request that is not a C-STORE to pynetdicom's DIMSE layer, as it came
        (with the rest of its PDU), and the socket with it."""
        pdvs: list[list[Any]] = [[cx, data] for cx, data in raw]
        while left:
            pdv_len, cx, flags = struct.unpack(">IBB", self._read(6))
            if pdv_len < 2 or pdv_len + 4 > left or pdv_len > MAX_COMMAND:
                raise _Abort("a P-DATA-TF PDU with a broken item")
            left -= pdv_len + 4
            pdvs.append([cx, bytes((flags,)) + self._read(pdv_len - 2)])
        primitive = P_DATA()
        primitive.presentation_data_value_list = pdvs  # type: ignore[assignment]
        self.give()
        self.assoc.dimse.receive_primitive(primitive)
        raise _HandBack()

    def _open(self, fields: dict[int, bytes], cx: int) -> Any:
        from .dicomnet import ReceiveFile  # dicomnet installs this module

        context = self.assoc._accepted_cx[cx]
        rx, self.spare = self.spare, None
        if rx is None:
            rx = ReceiveFile(self.receive_dir)
        try:
            rx.write(file_meta(dimse.text(fields, 0x0002), dimse.text(fields, 0x1000),
                               str(context.transfer_syntax[0])))
        except BaseException:
            rx.close()
            _unlink(rx.name)
            raise
        return rx

    def _answer(self, fields: dict[int, bytes], cx: int, rx: Any, error: str | None) -> None:
        context = self.assoc._accepted_cx[cx]
        msg_id = dimse.u16(fields, 0x0110) or 0
        req = StoreRequest(AffectedSOPClassUID=dimse.text(fields, 0x0002),
                           AffectedSOPInstanceUID=dimse.text(fields, 0x1000),
                           MessageID=msg_id, transfer_syntax=str(context.transfer_syntax[0]),
                           path=rx.name if rx is not None else "", _dataset_file=rx,
                           error=error)
        try:
            status = int(self.store(self.assoc, req))
        except Exception:
            LOGGER.exception("the C-STORE handler failed")
            status = HANDLER_FAILED
        finally:
            if rx is not None:
                rx.close()
                _unlink(rx.name)  # refused, or the handler moved it away already
        rsp = dimse.c_store_response(msg_id, fields.get(0x0002, b""), fields.get(0x1000, b""),
                                     status)
        self.sock.sendall(dimse.p_data_command(cx, rsp))
        # Creating a file costs as much as a sixth of an instance: done now, while the
        # peer reads its response and sends the next request, not after it arrived.
        from .dicomnet import ReceiveFile

        try:
            self.spare = ReceiveFile(self.receive_dir)
        except OSError:
            self.spare = None  # the next _open() says what is wrong


_write = os.write  # what _copy writes with (a test makes it fail: a disk full mid-file)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# -- the file meta pynetdicom writes before a received data set ----------------------------

def _explicit(elem: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB",):
        return struct.pack("<HH2sHI", 0x0002, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, elem, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def file_meta(sop_class: str, sop_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group, as pydicom writes them for
    pynetdicom's ``create_file_meta`` (tests compare the two)."""
    body = b"".join((
        _explicit(0x0001, b"OB", b"\x00\x01"),
        _explicit(0x0002, b"UI", _padded(sop_class, b"\0")),
        _explicit(0x0003, b"UI", _padded(sop_uid, b"\0")),
        _explicit(0x0010, b"UI", _padded(transfer_syntax, b"\0")),
        _explicit(0x0012, b"UI", _padded(str(pynetdicom.PYNETDICOM_IMPLEMENTATION_UID), b"\0")),
        _explicit(0x0013, b"SH", _padded(pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
    ))
    return b"\0" * 128 + b"DICM" + _explicit(0x0000, b"UL", struct.pack("<I", len(body))) + body


__all__ = ["QuietSocket", "StoreRequest", "enable", "file_meta", "install"]
