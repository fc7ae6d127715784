"""PDU framing and parsing, and the exact read (dts.dicom.wire)."""

from __future__ import annotations

import struct
import threading
import tracemalloc

import pytest

from dts.dicom import wire
from tests.helpers import tcp_pair


def _pdv(cx: int, flags: int, data: bytes) -> bytes:
    return struct.pack(">IBB", len(data) + 2, cx, flags) + data


def test_p_data_is_one_pdu_with_one_item() -> None:
    pdu = wire.p_data(3, wire.PDV_COMMAND | wire.PDV_LAST, b"abcd")
    assert pdu == struct.pack(">BBI", 0x04, 0, 10) + _pdv(3, 0x03, b"abcd")
    assert wire.pdu_header(pdu[:6]) == (wire.P_DATA_TF, 10)
    assert [(cx, fl, bytes(fr)) for cx, fl, fr in wire.pdvs(pdu[6:])] == [(3, 0x03, b"abcd")]
    buf = bytearray(12)
    wire.PDU_PDV_HEADER.pack_into(buf, 0, wire.P_DATA_TF, 0, 10, 6, 3, 0x03)
    assert bytes(buf) == pdu[:12]


def test_pdvs_of_a_body_with_several_items() -> None:
    body = _pdv(1, 0x01, b"cmd") + _pdv(1, 0x03, b"") + _pdv(5, 0x02, b"\x00" * 10)
    assert [(cx, fl, bytes(fr)) for cx, fl, fr in wire.pdvs(body)] == [
        (1, 0x01, b"cmd"), (1, 0x03, b""), (5, 0x02, b"\x00" * 10)]


@pytest.mark.parametrize("body", [
    struct.pack(">IBB", 100, 1, 0x02),            # an item longer than the PDU
    struct.pack(">IBB", 1, 1, 0x02),              # an item too short for its own header
    _pdv(1, 0x03, b"cmd") + b"\x00\x00\x00",      # bytes after the last item
    b"\x00\x00",                                  # not even an item header
])
def test_a_broken_p_data_body_is_refused(body: bytes) -> None:
    with pytest.raises(wire.BrokenPDU):
        list(wire.pdvs(body))


def test_pdv_header_checks_against_what_is_left() -> None:
    head = struct.pack(">IBB", 12, 7, 0x02)
    assert wire.pdv_header(head, 16) == (10, 7, 0x02)
    with pytest.raises(wire.BrokenPDU):
        wire.pdv_header(head, 15)
    with pytest.raises(wire.BrokenPDU):
        wire.pdv_header(head, 5)


def test_exact_reads_across_segments_and_a_closed_peer() -> None:
    left, right = tcp_pair()
    try:
        sender = threading.Thread(target=lambda: [left.sendall(b"x" * 70000),
                                                  left.sendall(b"y" * 10)])
        sender.start()
        assert wire.read_exact(right, 70005, ack=True) == b"x" * 70000 + b"y" * 5
        sender.join()
        left.close()
        assert wire.recv_exact(right, 10) == b"y" * 5  # short: the peer closed
        with pytest.raises(ConnectionError):
            wire.read_exact(right, 1)
    finally:
        left.close()
        right.close()


def test_a_read_grows_with_what_arrives_not_with_what_was_announced() -> None:
    left, right = tcp_pair()
    try:
        left.sendall(b"z" * 3000)
        left.close()
        tracemalloc.start()
        data = wire.recv_exact(right, 4 << 30)  # 4 GiB announced, 3,000 bytes sent
        _now, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert data == b"z" * 3000
        assert peak < 4 * wire.RECV_CHUNK
    finally:
        right.close()


def test_a_long_read_is_whole() -> None:
    left, right = tcp_pair()
    payload = bytes(range(256)) * (3 * wire.RECV_CHUNK // 256 + 7)
    sender = threading.Thread(target=left.sendall, args=(payload,))
    sender.start()
    try:
        assert wire.recv_exact(right, len(payload)) == payload
    finally:
        sender.join()
        left.close()
        right.close()


def test_what_dts_accepts() -> None:
    for pdu_type in wire.PDU_TYPES - {wire.P_DATA_TF}:
        assert wire.pdu_limit(pdu_type, 0) == wire.pdu_limit(pdu_type, 16384) \
            == wire.MAX_CONTROL_PDU
    assert wire.pdu_limit(wire.P_DATA_TF, 16384) == 16384
    assert wire.pdu_limit(wire.P_DATA_TF, 16384, streamed=True) == 16384
    assert wire.pdu_limit(wire.P_DATA_TF, 0) == wire.MAX_BUFFERED_PDU
    assert wire.pdu_limit(wire.P_DATA_TF, 0, streamed=True) is None
    assert wire.a_abort() == b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x06"
    assert wire.a_associate_rj() == b"\x03\x00\x00\x00\x00\x04\x00\x01\x03\x02"
