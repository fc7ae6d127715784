"""A DICOM peer made by hand for tests: a TCP connection that writes PDUs as bytes
(PS3.8 9.3), so a test can send what no real implementation would (a header announcing
4 GB), and reads what comes back until the receiver closes the connection."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

from dts.dicom import dimse, filemeta, wire

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.9.7433.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _uid(uid: str) -> bytes:
    return uid.encode("ascii")


def associate_rq(called: str, calling: str, abstract: tuple[str, ...] = (CT_IMAGE, VERIFICATION),
                 max_pdu: int = 16384) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing each of ``abstract`` (explicit little endian)."""
    items = _item(0x10, _uid(APPLICATION_CONTEXT))
    for i, syntax in enumerate(abstract):
        items += _item(0x20, bytes((2 * i + 1, 0, 0, 0)) + _item(0x30, _uid(syntax))
                       + _item(0x40, _uid(EXPLICIT_LE)))
    items += _item(0x50, _item(0x51, struct.pack(">I", max_pdu))
                   + _item(0x52, _uid(IMPLEMENTATION_UID)))
    body = (struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode()
            + bytes(32) + items)
    return wire.PDU_HEADER.pack(wire.A_ASSOCIATE_RQ, 0, len(body)) + body


class RawPeer:
    """One connection to ``port`` on 127.0.0.1 (from ``source``, another loopback address
    when a test needs a second peer host); every read has a deadline."""

    def __init__(self, port: int, timeout: float = 10.0, source: str | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.timeout = timeout

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_pdu(self) -> tuple[int, bytes]:
        """(type, body) of the next PDU the receiver sends."""
        head = self._exact(wire.PDU_HEADER_LEN)
        pdu_type, length = wire.pdu_header(head)
        return pdu_type, self._exact(length)

    def _exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError(f"closed after {len(data)} of {n} bytes")
            data += chunk
        return data

    def associate(self, called: str = "DTS", calling: str = "HOSTILE") -> dict[str, int]:
        """Associate (CT Image Storage, Verification); {abstract syntax: context id} of
        what the receiver accepted."""
        self.send(associate_rq(called, calling))
        pdu_type, body = self.read_pdu()
        assert pdu_type == wire.A_ASSOCIATE_AC, f"not accepted: PDU 0x{pdu_type:02X} {body!r}"
        proposed = {2 * i + 1: s for i, s in enumerate((CT_IMAGE, VERIFICATION))}
        accepted: dict[str, int] = {}
        pos = 68
        while pos < len(body):
            item_type, _r, n = struct.unpack_from(">BBH", body, pos)
            if item_type == 0x21 and body[pos + 6] == 0:  # presentation context: acceptance
                accepted[proposed[body[pos + 4]]] = body[pos + 4]
            pos += 4 + n
        return accepted

    def c_store(self, cx: int, path: Path) -> int:
        """C-STORE the data set of DICOM file ``path`` on context ``cx``; the status."""
        raw = path.read_bytes()
        meta = filemeta.parse(raw)
        assert meta is not None and meta.sop_class and meta.sop_instance
        sop_class, sop_uid = meta.sop_class, meta.sop_instance
        command = dimse.c_store_command(7, sop_class, sop_uid)
        self.send(dimse.p_data_command(cx, command)
                  + wire.p_data(cx, wire.PDV_LAST, raw[meta.dataset_offset:]))
        pdu_type, body = self.read_pdu()
        assert pdu_type == wire.P_DATA_TF, f"PDU 0x{pdu_type:02X} instead of a C-STORE-RSP"
        fields = dimse.command_fields(b"".join(bytes(f) for _c, _f, f in wire.pdvs(body)))
        status = dimse.u16(fields, dimse.STATUS)
        assert status is not None
        return status

    def until_closed(self, deadline: float) -> bytes:
        """Everything the receiver sends until it closes the connection (a reset counts
        as closed); AssertionError when it has not by ``deadline`` (time.monotonic())."""
        got = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the connection is still open ({got!r} received)")
            self.sock.settimeout(min(left, 0.2))
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                return got
            if not chunk:
                return got
            got += chunk
