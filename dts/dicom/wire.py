"""Owns DICOM upper-layer bytes on a TCP socket: exact reads, TCP_QUICKACK, PDU and PDV framing.

An upper-layer PDU is a 6-byte header (type, reserved, big-endian length) and a body; a
P-DATA-TF body is a list of presentation data value items, each a 4-byte length, a
context id, a control header (bit 0: command, bit 1: last fragment) and a fragment of a
command set or data set (PS3.8 9.3.1, 9.3.5, E.2). Both fast paths (``dts.dicom.scp``,
``dts.dicom.scu``) and the replaced ``AssociationSocket.recv`` (``dts.dicom.patches``)
read and frame through here.

It also says how long a PDU dts accepts (``pdu_limit``), so that a length a peer
announces costs memory only once its bytes are there: every PDU but a P-DATA-TF at most
``MAX_CONTROL_PDU``; a P-DATA-TF at most the maximum length dts advertised, and when that
is 0 (unlimited) at most ``MAX_BUFFERED_PDU`` where it is held in memory (pynetdicom's
path) and any length where it is streamed to disk (the SCP fast path). ``recv_exact``
grows its result as bytes arrive. docs/architecture.md, "Bounded memory", has the bound.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator

Bytes = bytes | bytearray | memoryview

# PDU types (PS3.8 9.3.1)
A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07
PDU_TYPES = frozenset(range(A_ASSOCIATE_RQ, A_ABORT + 1))

# The control header of a presentation data value (PS3.8 E.2)
PDV_COMMAND = 0x01  # else a data set fragment
PDV_LAST = 0x02     # the last fragment of its command set or data set

PDU_HEADER = struct.Struct(">BBI")     # type, reserved, length of the rest
PDV_HEADER = struct.Struct(">IBB")     # item length (id + flags + fragment), context id, flags
PDU_PDV_HEADER = struct.Struct(">BBIIBB")  # a P-DATA-TF PDU holding one PDV: both headers
PDU_HEADER_LEN = PDU_HEADER.size       # 6
PDV_HEADER_LEN = PDV_HEADER.size       # 6; the item length counts 2 of these bytes

# The most one recv() asks for; pynetdicom's own recv() reads 4 KiB at a time. A read
# of more grows its result chunk by chunk, as the bytes arrive.
RECV_CHUNK = 1 << 20

# The longest PDU body dts accepts (see pdu_limit). An A-ASSOCIATE-RQ with 128
# presentation contexts and user identity items is tens of KiB; the other PDUs but
# P-DATA-TF are 4 bytes long.
MAX_CONTROL_PDU = 1 << 20
# What dts advertises as its maximum PDU length unless configured otherwise: dcmtk sends
# PDUs of 128 KiB whatever is advertised above that, so a larger maximum gains nothing.
DEFAULT_MAX_PDU = 1 << 20
# The longest P-DATA-TF held in memory when dts advertised "unlimited" (max_pdu = 0).
MAX_BUFFERED_PDU = 64 << 20

# A-ABORT source and reason (PS3.8 9.3.8), A-ASSOCIATE-RJ result, source, reason (9.3.4)
ABORT_PROVIDER = 0x02
ABORT_INVALID_PARAMETER = 0x06   # invalid-PDU-parameter value: the length
RJ_PERMANENT = 0x01
RJ_PRESENTATION = 0x03           # service-provider, presentation related function
RJ_LOCAL_LIMIT = 0x02            # local-limit-exceeded

_HAS_QUICKACK = hasattr(socket, "TCP_QUICKACK")


class BrokenPDU(Exception):
    """The peer sent bytes that are not a well-formed PDU (a protocol error, not I/O)."""


def pdu_name(pdu_type: int) -> str:
    """How an error message names a PDU type."""
    return {A_ASSOCIATE_RQ: "an A-ASSOCIATE-RQ", A_ASSOCIATE_AC: "an A-ASSOCIATE-AC",
            A_ASSOCIATE_RJ: "an A-ASSOCIATE-RJ", A_RELEASE_RQ: "a release request",
            A_RELEASE_RP: "a release response", A_ABORT: "an A-ABORT",
            P_DATA_TF: "a P-DATA-TF"}.get(pdu_type, f"a PDU 0x{pdu_type:02X}")


# -- the socket ----------------------------------------------------------------------------

def quickack(sock: socket.socket) -> None:
    """Acknowledge what arrives at once, not ~40 ms later: a peer that leaves Nagle's
    algorithm on (Debian's dcmtk by default) sends the end of a message only once its
    start is acknowledged. Linux-only, and not sticky (the kernel falls back to delayed
    ACKs after a while), so callers re-arm it before they wait for the peer."""
    if _HAS_QUICKACK:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        except OSError:  # not a TCP socket (any more): nothing to tune
            pass


def set_nodelay(sock: socket.socket | None) -> None:
    """Turn Nagle's algorithm off: a PDU goes out whole, at once."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:  # not a TCP socket (e.g. closed meanwhile): nothing to tune
        pass


def recv_exact(sock: socket.socket, n: int, *, ack: bool = False,
               deadline: float | None = None) -> bytearray:
    """``n`` bytes from ``sock``, read straight into place in large chunks; fewer only
    when the peer closed the connection. Memory grows with what arrived (chunks of
    ``RECV_CHUNK``, joined at the end), never with what ``n`` announces. ``ack``: re-arm
    TCP_QUICKACK before each read (see ``quickack``). ``deadline`` (time.monotonic()):
    TimeoutError once it passed, however steadily bytes trickle in (the socket's own
    timeout bounds only the wait for the next one; it is lowered to the time left and
    not restored, which is the caller's to do)."""
    if n <= RECV_CHUNK:
        return _fill(sock, bytearray(n), ack, deadline)
    chunks: list[bytearray] = []
    got = 0
    while got < n:
        chunk = _fill(sock, bytearray(min(n - got, RECV_CHUNK)), ack, deadline)
        chunks.append(chunk)
        got += len(chunk)
        if len(chunk) < RECV_CHUNK and got < n:
            break  # the peer closed the connection
    return bytearray().join(chunks)


def _fill(sock: socket.socket, buf: bytearray, ack: bool,
          deadline: float | None = None) -> bytearray:
    """``buf`` filled from ``sock``; cut short where the peer closed the connection."""
    n = len(buf)
    view = memoryview(buf)
    got = 0
    timeout = sock.gettimeout() if deadline is not None else None
    try:
        while got < n:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("deadline passed")
                sock.settimeout(left if timeout is None else min(timeout, left))
            if ack:
                quickack(sock)
            k = sock.recv_into(view[got:], n - got)
            if not k:
                break
            got += k
    finally:
        view.release()
    if got < n:
        del buf[got:]
    return buf


def read_exact(sock: socket.socket, n: int, *, ack: bool = False) -> bytearray:
    """``recv_exact`` for a peer that must send ``n`` bytes: ConnectionError if it closed."""
    buf = recv_exact(sock, n, ack=ack)
    if len(buf) < n:
        raise ConnectionError("the peer closed the connection")
    return buf


# -- parsing -------------------------------------------------------------------------------

def pdu_header(head: Bytes) -> tuple[int, int]:
    """(PDU type, length of its body) of a 6-byte PDU header."""
    pdu_type, _reserved, length = PDU_HEADER.unpack_from(head)
    return pdu_type, length


def pdu_limit(pdu_type: int, max_pdu: int, *, streamed: bool = False) -> int | None:
    """The longest body dts accepts for a PDU of ``pdu_type``; ``max_pdu``: the maximum
    length it advertised (0: unlimited); ``streamed``: a P-DATA-TF's data set goes to disk
    as it arrives (only its command is held). None: no limit."""
    if pdu_type != P_DATA_TF:
        return MAX_CONTROL_PDU
    if max_pdu > 0:
        return max_pdu
    return None if streamed else MAX_BUFFERED_PDU


def a_abort(reason: int = ABORT_INVALID_PARAMETER) -> bytes:
    """An A-ABORT PDU from the service provider (dts's upper layer), for ``reason``."""
    return PDU_HEADER.pack(A_ABORT, 0, 4) + bytes((0, 0, ABORT_PROVIDER, reason))


def a_associate_rj(result: int = RJ_PERMANENT, source: int = RJ_PRESENTATION,
                   reason: int = RJ_LOCAL_LIMIT) -> bytes:
    """An A-ASSOCIATE-RJ PDU (by default: permanent, a local limit exceeded)."""
    return PDU_HEADER.pack(A_ASSOCIATE_RJ, 0, 4) + bytes((0, result, source, reason))


def pdv_header(head: Bytes, left: int) -> tuple[int, int, int]:
    """(fragment length, context id, flags) of a 6-byte PDV item header, ``left`` being
    what is left of its P-DATA-TF body including this header; BrokenPDU when the item
    does not fit there or is too short to hold its own header."""
    if left < PDV_HEADER_LEN:
        raise BrokenPDU("a P-DATA-TF PDU with a broken item")
    item_len, context_id, flags = PDV_HEADER.unpack_from(head)
    if item_len < 2 or item_len + 4 > left:
        raise BrokenPDU("a P-DATA-TF PDU with a broken item")
    return item_len - 2, context_id, flags


def pdvs(body: Bytes) -> Iterator[tuple[int, int, memoryview]]:
    """(context id, flags, fragment) of each item of a P-DATA-TF body; BrokenPDU when an
    item is broken or the body does not end with an item."""
    view = memoryview(body)
    pos, end = 0, len(body)
    while pos < end:
        n, context_id, flags = pdv_header(view[pos:pos + PDV_HEADER_LEN], end - pos)
        start = pos + PDV_HEADER_LEN
        yield context_id, flags, view[start:start + n]
        pos = start + n


# -- framing -------------------------------------------------------------------------------

def p_data(context_id: int, flags: int, fragment: bytes) -> bytes:
    """One P-DATA-TF PDU holding one presentation data value."""
    return PDU_PDV_HEADER.pack(P_DATA_TF, 0, len(fragment) + PDV_HEADER_LEN, len(fragment) + 2,
                               context_id, flags) + fragment

