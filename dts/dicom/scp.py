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
- a P-DATA-TF longer than the maximum length dts advertised (``wire.pdu_limit``) is
  answered with an A-ABORT and the connection closed at once, before its body is read,
  and so is a peer that sends nothing for ``network_timeout`` in the middle of a PDU;
  memory never depends on a length the peer announces (a command set is held, at most
  ``MAX_COMMAND``; a data set goes through one ``CHUNK`` buffer);
- a C-STORE-RQ's data set is streamed into a file in the spool's ``tmp/`` behind the
  same file meta pynetdicom writes (``filemeta.encode``), the handler is called with
  the file, and the C-STORE-RSP is encoded and sent here; when the file cannot be
  written (disk full) the rest of the data set is read and dropped, and the handler is
  called with the error, so that the peer gets the handler's failure status, not a
  broken association;
- any other request (a C-ECHO) is handed to pynetdicom's DIMSE layer as it came, with
  the socket, and served by pynetdicom.

The socket is taken over as on the requestor side (``takeover.hold_socket``). Hooked
into pynetdicom by ``dts.dicom.patches`` (supported versions only) and used on plain TCP;
a TLS association is served by pynetdicom alone. ``ReceiveFile`` is the file a received
data set is written into, on this path and on pynetdicom's.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynetdicom import association
from pynetdicom.pdu_primitives import P_DATA

from . import dimse, filemeta, takeover, wire

LOGGER = logging.getLogger(__name__)

MAX_COMMAND = 64 * 1024  # a command set is a few hundred bytes; more is not a peer we serve
CHUNK = 1 << 20
HANDLER_FAILED = 0xC211  # what pynetdicom answers when its handler raised
POLL = 0.5  # how often a wait for the next PDU looks whether the association was ended


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
        self.error: str | None = None  # why the data set could not be written (then dropped)

    def write(self, data: bytes) -> int:
        """Write ``data``; on a write error (a full disk) keep the reason and drop this and
        every later fragment, so that pynetdicom still reads the whole data set and the
        handler can answer with a status (0xA700) instead of the association breaking."""
        if self.error is None:
            try:
                self.file.write(data)
            except OSError as exc:
                self.error = f"cannot write: {exc.strerror or exc}"
        return len(data)

    def fileno(self) -> int:
        return self.file.fileno()

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True
        self.file.close()


def enable(ae: Any, store: StoreHandler, receive_dir: str) -> None:
    """Serve the C-STOREs of ``ae``'s accepted associations on the fast path: ``store``
    is called with each request once its data set is in a file under ``receive_dir``."""
    ae._dts_store = (store, receive_dir)


def discard_partial(assoc: Any) -> None:
    """Remove the file of a data set pynetdicom was still receiving (or could not make a
    request of) when ``assoc``'s connection ended: it was never acknowledged, and nothing
    else would ever remove it from ``tmp/``."""
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    rx = getattr(message, "_data_set_file", None)
    if isinstance(rx, ReceiveFile):
        rx.close()
        _unlink(rx.name)


# -- the loop ------------------------------------------------------------------------------

class _HandBack(Exception):
    """Stop the fast path; pynetdicom carries on with the association."""


class _Abort(Exception):
    """The peer broke the protocol: the association is aborted."""


class _Refuse(Exception):
    """The peer announced a PDU longer than accepted: A-ABORT, the connection closed."""


def take(assoc: association.Association, msg: Any) -> _Loop | None:
    """The fast path for the rest of ``assoc`` once ``msg`` is served, or None when it
    does not apply (see ``_Loop.take``)."""
    return _Loop.take(assoc, msg)


class _Loop:
    def __init__(self, assoc: association.Association, sock: socket.socket,
                 store: StoreHandler, receive_dir: str) -> None:
        self.assoc = assoc
        self.sock = sock
        self.store = store
        self.receive_dir = receive_dir
        self.timeout = assoc.network_timeout
        max_pdu = int(assoc.acceptor.maximum_length or 0)
        self.limit = wire.pdu_limit(wire.P_DATA_TF, max_pdu, streamed=True)
        self.held_limit = wire.pdu_limit(wire.P_DATA_TF, max_pdu)  # a PDU kept in memory
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
        sock = takeover.hold_socket(assoc)
        if sock is None:
            return None
        if assoc.dimse.message is not None or not assoc.dimse.msg_queue.empty():
            takeover.release_socket(assoc)  # more came in: pynetdicom's
            return None
        store, receive_dir = hook
        return cls(assoc, sock, store, receive_dir)

    def give(self) -> None:
        """Hand the socket back to pynetdicom (between two complete PDUs)."""
        if not self.held:
            return
        self.held = False
        takeover.release_socket(self.assoc)
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
        except _Refuse as exc:
            LOGGER.warning("aborting the association from %s: %s",
                           self.assoc.requestor.address, exc)
            self._refuse()
        except _Abort as exc:
            LOGGER.warning("aborting the association from %s: %s",
                           self.assoc.requestor.address, exc)
            self.give()
            self.assoc.abort()
            return
        except TimeoutError:
            # silent for network_timeout in the middle of a PDU: where the next PDU would
            # start is lost, so nobody can carry on with this connection
            LOGGER.warning("%s sent nothing for %ss in the middle of a PDU: aborting the "
                           "association", self.assoc.requestor.address, self.timeout)
            self._refuse()
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
                return bool(head) and head[0] == wire.P_DATA_TF  # else pynetdicom's (or closed)
        finally:
            sock.settimeout(self.timeout)

    def _refuse(self) -> None:
        """Answer with an A-ABORT and close the connection at once: pynetdicom then ends
        the association as for a peer that closed it, and reads nothing more of it."""
        try:
            self.sock.settimeout(1.0)  # a peer that does not read gets no answer
            self.sock.sendall(wire.a_abort())
        except OSError:
            pass
        wrapper = self.assoc.dul.socket
        if wrapper is not None:
            wrapper.close()

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
                # QUICKACK is not sticky: re-armed for every PDU
                pdu_type, left = wire.pdu_header(
                    wire.read_exact(self.sock, wire.PDU_HEADER_LEN, ack=True))
                if pdu_type != wire.P_DATA_TF:
                    raise _Abort(f"PDU type 0x{pdu_type:02X} in the middle of a message")
                if self.limit is not None and left > self.limit:
                    raise _Refuse(f"a P-DATA-TF of {left} bytes, more than the "
                                  f"{self.limit} accepted")
                while left:
                    n, cx, flags = self._pdv_header(left)
                    left -= wire.PDV_HEADER_LEN + n
                    if flags & wire.PDV_COMMAND:
                        if fields is not None or len(command) + n > MAX_COMMAND:
                            raise _Abort("a command set out of place or too long")
                        data = wire.read_exact(self.sock, n)
                        command += data
                        raw.append((cx, bytes((flags,)) + data))
                        if flags & wire.PDV_LAST:
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
                    if flags & wire.PDV_LAST:
                        if left:
                            raise _Abort("data after the last fragment of a data set")
                        self._answer(fields, context_id, rx, error)
                        rx = None
                        return
        finally:
            if rx is not None:  # cut off: never acknowledged
                rx.close()
                _unlink(rx.name)

    def _pdv_header(self, left: int) -> tuple[int, int, int]:
        """(fragment length, context id, flags) of the next PDV item; ``left``: what is
        left of its PDU."""
        if left < wire.PDV_HEADER_LEN:  # not even room for the header: do not read it
            raise _Abort("a P-DATA-TF PDU with a broken item")
        try:
            return wire.pdv_header(wire.read_exact(self.sock, wire.PDV_HEADER_LEN), left)
        except wire.BrokenPDU as exc:
            raise _Abort(str(exc)) from None

    def _ours(self, fields: dict[int, bytes], cx: int) -> bool:
        if dimse.u16(fields, dimse.COMMAND_FIELD) != dimse.C_STORE_RQ:
            return False
        if dimse.u16(fields, dimse.COMMAND_DATA_SET_TYPE) in (None, dimse.NO_DATA_SET):
            return False
        context = self.assoc._accepted_cx.get(cx)
        return context is not None and bool(context.transfer_syntax)

    def _hand_over(self, raw: list[tuple[int, bytes]], left: int) -> None:
        """Give a request that is not a C-STORE to pynetdicom's DIMSE layer, as it came
        (with the rest of its PDU), and the socket with it."""
        pdvs: list[list[Any]] = [[cx, data] for cx, data in raw]
        if self.held_limit is not None and left > self.held_limit:
            raise _Refuse(f"a request of {left} more bytes for pynetdicom to hold, more "
                          f"than the {self.held_limit} accepted")
        while left:
            n, cx, flags = self._pdv_header(left)
            if n > MAX_COMMAND:
                raise _Abort("a P-DATA-TF PDU with a broken item")
            left -= wire.PDV_HEADER_LEN + n
            pdvs.append([cx, bytes((flags,)) + wire.read_exact(self.sock, n)])
        primitive = P_DATA()
        primitive.presentation_data_value_list = pdvs  # type: ignore[assignment]
        self.give()
        self.assoc.dimse.receive_primitive(primitive)
        raise _HandBack()

    def _open(self, fields: dict[int, bytes], cx: int) -> Any:
        context = self.assoc._accepted_cx[cx]
        rx, self.spare = self.spare, None
        if rx is None:
            rx = ReceiveFile(self.receive_dir)
        try:
            rx.write(filemeta.encode(dimse.text(fields, dimse.AFFECTED_SOP_CLASS_UID),
                                     dimse.text(fields, dimse.AFFECTED_SOP_INSTANCE_UID),
                                     str(context.transfer_syntax[0])))
        except BaseException:
            rx.close()
            _unlink(rx.name)
            raise
        return rx

    def _answer(self, fields: dict[int, bytes], cx: int, rx: Any, error: str | None) -> None:
        context = self.assoc._accepted_cx[cx]
        msg_id = dimse.u16(fields, dimse.MESSAGE_ID) or 0
        req = StoreRequest(AffectedSOPClassUID=dimse.text(fields, dimse.AFFECTED_SOP_CLASS_UID),
                           AffectedSOPInstanceUID=dimse.text(fields,
                                                             dimse.AFFECTED_SOP_INSTANCE_UID),
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
        rsp = dimse.c_store_response(msg_id, fields.get(dimse.AFFECTED_SOP_CLASS_UID, b""),
                                     fields.get(dimse.AFFECTED_SOP_INSTANCE_UID, b""), status)
        self.sock.sendall(dimse.p_data_command(cx, rsp))
        # Creating a file costs as much as a sixth of an instance: done now, while the
        # peer reads its response and sends the next request, not after it arrived.
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


__all__ = ["ReceiveFile", "StoreRequest", "discard_partial", "enable", "take"]
