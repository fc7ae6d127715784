"""Owns the fast path of dts's C-STORE SCU: C-STORE requests and responses exchanged over
an established association's socket by dts itself.

pynetdicom 3.0 hands every 16 KiB fragment of a data set as its own primitive from the
caller's thread to its DUL thread, through a queue and its state machine, and every
response back the same way, decoded with pydicom; on a 2-core machine that costs more
than the network and the peer together. Exchanging P-DATA-TF PDUs does not change the
state of an established association, so for a batch of C-STOREs ``Sender`` takes the
socket over: the association's reactor is parked at its checkpoint (so it cannot take
a response off the DIMSE queue either: pynetdicom 3.0 occasionally does that between
two ``send_c_store`` calls and then waits for the DIMSE timeout), the DUL thread is kept
off the socket as on the SCP side (``takeover.hold_socket``), each request is encoded
here as whole PDUs with the data set read from its file into place, and each response
is read and decoded here (a command set of a few elements). Everything else
(association, release, abort) stays pynetdicom's. Used only with a supported pynetdicom
(``patches.version_ok()``); the caller uses ``send_c_store`` otherwise.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Protocol

from pydicom.dataset import Dataset
from pynetdicom.association import Association
from pynetdicom.dsutils import split_dataset

from . import ae as dicom_ae
from . import dimse, filemeta, patches, takeover, wire

_SEND_CHUNK = 1 << 20
_IOV_MAX = 1024  # buffers one readv may fill (Linux IOV_MAX)


class Request(Protocol):
    """One object to C-STORE as encoded in its file (``store.Item`` is one)."""

    @property
    def path(self) -> Path: ...

    @property
    def sop_uid(self) -> str: ...

    @property
    def sop_class(self) -> str: ...


class FileError(Exception):
    """A file to send could not be read (a fault of the job, not of the network)."""


class Sender:
    """C-STORE requests and responses straight over an established association's socket
    (see the module docstring); ``held`` says whether the socket is ours."""

    def __init__(self, assoc: Association, timeout: float,
                 gap: float | None = None) -> None:
        self.assoc = assoc
        self.sock: socket.socket | None = None
        self.max_pdu = int(assoc.acceptor.maximum_length or 0)
        self.local_max_pdu = int(assoc.requestor.maximum_length or 0)  # what we accept
        self.msg_id = 0
        self.timeout = timeout  # for a response to start (the DIMSE timeout)
        self.gap = timeout if gap is None else gap  # in one PDU (the network timeout)
        self.held = False
        self._next: tuple[tuple[str, int], memoryview] | None = None
        # Two message buffers, used in turn: the one being sent and the next one being
        # read. Kept, not made for each object: a new 0.5 MB buffer costs its page faults
        # again for every image (about as much as reading the file).
        self._buffers = [bytearray(), bytearray()]
        self._turn = 0

    def __enter__(self) -> Sender:
        self.take()
        return self

    def __exit__(self, *exc: object) -> None:
        self.give()

    def take(self) -> None:
        """Park the association's reactor and keep the DUL thread off the socket."""
        if not patches.version_ok():
            return  # internals of another pynetdicom: leave everything to it
        assoc = self.assoc
        assoc._reactor_checkpoint.clear()
        sock = takeover.hold_socket(assoc) if dicom_ae.wait_parked(assoc) else None
        if sock is None:
            assoc._reactor_checkpoint.set()
            return
        self.sock = sock
        self.sock.settimeout(self.timeout)
        self.held = True

    def give(self) -> None:
        """Hand the socket back to pynetdicom (between two complete exchanges)."""
        if not self.held:
            return
        self.held = False
        takeover.release_socket(self.assoc)
        if self.sock is not None:
            try:
                self.sock.settimeout(None)
            except OSError:
                pass
        self.assoc.dul._idle_timer.restart()  # it saw none of our traffic
        self.assoc._reactor_checkpoint.set()

    def _buffer(self, size: int) -> bytearray:
        """The next of the two message buffers, at least ``size`` bytes."""
        self._turn ^= 1
        buf = self._buffers[self._turn]
        if len(buf) < size:  # a new one: the old may still be viewed (never resized)
            buf = self._buffers[self._turn] = bytearray(size + size // 8)
        return buf

    def _message(self, item: Request, cx_id: int, msg_id: int) -> memoryview:
        """The whole C-STORE-RQ as P-DATA-TF PDUs: command, then the data set read
        from the file straight into place (no decoding, no extra copy) with one
        ``readv`` into the spaces between the PDU headers."""
        with open(item.path, "rb") as fh:
            meta = filemeta.read(fh)
            offset = meta.dataset_offset if meta is not None else split_dataset(item.path)[1]
            size = os.fstat(fh.fileno()).st_size - offset
            command = dimse.c_store_command(msg_id, item.sop_class, item.sop_uid)
            # each PDU holds one PDV: the two headers, then the fragment
            pack, head = wire.PDU_PDV_HEADER.pack_into, wire.PDU_PDV_HEADER.size
            step = self.max_pdu - 6 if self.max_pdu > 6 else max(size, len(command), 1)
            frags = max(1, -(-size // step))
            total = -(-len(command) // step) * head + len(command) + frags * head + size
            buf = self._buffer(total)
            view = memoryview(buf)
            pos = 0
            for start in range(0, len(command), step):
                part = command[start:start + step]
                flags = wire.PDV_COMMAND | (wire.PDV_LAST if start + step >= len(command) else 0)
                pack(buf, pos, wire.P_DATA_TF, 0, len(part) + 6, len(part) + 2, cx_id, flags)
                buf[pos + head:pos + head + len(part)] = part
                pos += head + len(part)
            parts = []
            for k in range(frags):
                part_len = min(step, size - k * step)
                pack(buf, pos, wire.P_DATA_TF, 0, part_len + 6, part_len + 2, cx_id,
                     wire.PDV_LAST if k == frags - 1 else 0)
                pos += head
                if part_len:
                    parts.append(view[pos:pos + part_len])
                pos += part_len
            got = 0
            fd = fh.fileno()
            while parts:  # readv fills them in order; more than IOV_MAX: in batches
                batch = parts[:_IOV_MAX]
                n = os.preadv(fd, batch, offset + got)
                want = sum(len(b) for b in batch)
                got += n
                if n != want:
                    raise OSError(f"{item.path} changed while being sent")
                for b in batch:
                    b.release()
                del parts[:_IOV_MAX]
        return view[:total]

    def store(self, item: Request, cx_id: int,
              after: tuple[Request, int] | None = None) -> Dataset:
        """C-STORE ``item`` (its file as encoded) on context ``cx_id``; the response's
        status elements, or an empty Dataset when none came (timeout, abort).
        ``after``: the object that comes next, prepared while the peer works on this one."""
        assert self.sock is not None
        self.msg_id = self.msg_id % 65535 + 1
        msg_id = self.msg_id
        if self._next is not None and self._next[0] == (item.sop_uid, cx_id):
            buf = self._next[1]
        else:
            try:
                buf = self._message(item, cx_id, msg_id)
            except OSError as exc:
                raise FileError(str(exc)) from None
        self._next = None
        view = memoryview(buf)
        for start in range(0, len(buf), _SEND_CHUNK):
            self.sock.sendall(view[start:start + _SEND_CHUNK])
        view.release()
        if after is not None:
            try:
                nxt = self._message(after[0], after[1], msg_id % 65535 + 1)
                self._next = ((after[0].sop_uid, after[1]), nxt)
            except (OSError, ValueError, EOFError):
                pass  # found again, and reported, when its turn comes
        return self._response(msg_id)

    def _response(self, msg_id: int) -> Dataset:
        """Read PDUs up to the end of the C-STORE-RSP to ``msg_id``; its status elements.
        Anything else from the peer (an A-ABORT, a release request) ends the batch."""
        assert self.sock is not None
        command = bytearray()
        fields: dict[int, bytes] | None = None
        while True:
            # the peer's response may wait for our ACK (Nagle): QUICKACK before each read
            pdu_type, length = wire.pdu_header(
                wire.read_exact(self.sock, wire.PDU_HEADER_LEN, ack=True))
            limit = wire.pdu_limit(pdu_type, self.local_max_pdu)
            if limit is not None and length > limit:
                raise ConnectionError(f"the peer announced {wire.pdu_name(pdu_type)} of "
                                      f"{length} bytes, more than the {limit} accepted")
            # A peer silent in the middle of its PDU is gone: network_timeout, not the
            # DIMSE timeout (which is for the response to start).
            self.sock.settimeout(self.gap)
            try:
                body = wire.read_exact(self.sock, length, ack=True)
            finally:
                self.sock.settimeout(self.timeout)
            if pdu_type != wire.P_DATA_TF:
                raise ConnectionError(f"the peer sent {wire.pdu_name(pdu_type)} instead of a "
                                      "C-STORE response")
            finished = False
            try:
                for _cx, flags, fragment in wire.pdvs(body):
                    if flags & wire.PDV_COMMAND:
                        command += fragment
                        if flags & wire.PDV_LAST:
                            fields = dimse.command_fields(bytes(command))
                            finished = (dimse.u16(fields, dimse.COMMAND_DATA_SET_TYPE)
                                        == dimse.NO_DATA_SET)
                    elif flags & wire.PDV_LAST:
                        finished = True  # the last fragment of a data set we do not need
            except wire.BrokenPDU as exc:
                raise ConnectionError(f"the peer sent {exc}") from None
            if finished and fields is not None:
                break
        status = Dataset()
        if (dimse.u16(fields, dimse.COMMAND_FIELD) == dimse.C_STORE_RSP
                and dimse.u16(fields, dimse.MESSAGE_ID_BEING_RESPONDED_TO) == msg_id
                and dimse.STATUS in fields):
            status.Status = dimse.u16(fields, dimse.STATUS)
            comment = fields.get(dimse.ERROR_COMMENT)
            if comment:
                status.ErrorComment = comment.decode("ascii", "replace").strip(" \0")
            return status
        raise ConnectionError(f"the peer answered C-STORE {msg_id} with something else")
