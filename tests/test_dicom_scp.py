"""The fast C-STORE SCP path (dts.dicom.scp) against a real pynetdicom requestor.

The SCP is a tuned pynetdicom AE with the fast path enabled, in this process, so that
the test sees which path served each request: pynetdicom's handler (EVT_C_STORE) or
the fast path's handler.
"""

from __future__ import annotations

import io
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import evt
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from dts.dicom import ae as dicom_ae
from dts.dicom import dimse, patches, scp
from tests.helpers import free_port, make_instance, wait_for


class Recorder:
    """What the SCP saw: (path of the handler, data set bytes) per C-STORE."""

    def __init__(self, rx: Path) -> None:
        self.rx = rx
        self.stored: list[tuple[str, str, bytes]] = []
        self.status = 0
        self.raise_in_handler = False
        self.lock = threading.Lock()

    def on_store(self, event: Any) -> int:  # pynetdicom's path
        path = Path(event.dataset_path)
        with self.lock:
            self.stored.append(("pynetdicom", str(event.request.AffectedSOPInstanceUID),
                                path.read_bytes()))
        return self.status

    def fast_store(self, assoc: Any, req: scp.StoreRequest) -> int:
        if req.error is not None:
            with self.lock:
                self.stored.append(("error", req.AffectedSOPInstanceUID, req.error.encode()))
            return 0xA700
        assert Path(req.path).parent == self.rx
        if self.raise_in_handler:
            raise RuntimeError("handler failed")
        with self.lock:
            self.stored.append(("fast", req.AffectedSOPInstanceUID,
                                Path(req.path).read_bytes()))
        return self.status

    def paths(self) -> list[str]:
        return [p for p, _u, _d in self.stored]


@pytest.fixture
def fast_scp(tmp_path: Path) -> Iterator[tuple[int, Recorder]]:
    rx = tmp_path / "rx"
    rx.mkdir()
    rec = Recorder(rx)
    ae = dicom_ae.make_ae("FASTSCP", network_timeout=5)
    dicom_ae.add_scp_contexts(ae)
    patches.set_receive_directory(rx)
    scp.enable(ae, rec.fast_store, str(rx))
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, rec.on_store),
                                           (evt.EVT_C_ECHO, lambda e: 0)])
    yield port, rec
    server.shutdown()
    patches.set_receive_directory(None)


def _scu(port: int, syntax: str = ExplicitVRLittleEndian) -> Any:
    ae = dicom_ae.make_ae("SCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="FASTSCP")
    assert assoc.is_established
    assert dicom_ae.park_reactor(assoc)  # see its docstring: pynetdicom's own race
    return assoc


def _unpark(assoc: Any) -> None:
    """Let the SCU's reactor run again: it is what notices an abort or a closed socket."""
    assoc._reactor_checkpoint.holding = False
    assoc._reactor_checkpoint.set()


def _instances(tmp_path: Path, n: int, rows: int = 64) -> list[Path]:
    study, series = generate_uid(), generate_uid()
    return [make_instance(tmp_path / f"i{i}.dcm", study_uid=study, series_uid=series,
                          rows=rows, cols=rows, instance_number=i + 1) for i in range(n)]


def _rx_files(rec: Recorder) -> list[str]:
    return sorted(os.listdir(rec.rx))


def test_a_stream_of_c_stores_is_served_by_the_fast_path(fast_scp: Any, tmp_path: Path) -> None:
    port, rec = fast_scp
    files = _instances(tmp_path, 6, rows=300)  # 180 KB each: many PDUs per data set
    assoc = _scu(port)
    try:
        for f in files:
            assert assoc.send_c_store(f).Status == 0
    finally:
        assoc.release()
    # the first one by pynetdicom (the fast path takes over while it is answered)
    assert rec.paths() == ["pynetdicom"] + ["fast"] * 5
    for (_p, uid, data), f in zip(rec.stored, files):
        sent = pydicom.dcmread(f)
        got = pydicom.dcmread(io.BytesIO(data))
        assert uid == sent.SOPInstanceUID == got.SOPInstanceUID
        assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert got.PixelData == sent.PixelData
    # the handler's files, and the one made ready for a next data set, are gone
    wait_for(lambda: _rx_files(rec) == [], 5, what="no file left in the receive folder")


def test_echo_between_stores_goes_to_pynetdicom_and_back(fast_scp: Any, tmp_path: Path) -> None:
    port, rec = fast_scp
    files = _instances(tmp_path, 5)
    assoc = _scu(port)
    try:
        assert assoc.send_c_store(files[0]).Status == 0
        assert assoc.send_c_store(files[1]).Status == 0
        assert assoc.send_c_echo().Status == 0  # handed over, with the socket
        for f in files[2:]:
            assert assoc.send_c_store(f).Status == 0
    finally:
        assoc.release()
    assert assoc.is_released
    assert rec.paths() == ["pynetdicom", "fast", "pynetdicom", "fast", "fast"]


def test_statuses_and_a_failing_handler(fast_scp: Any, tmp_path: Path) -> None:
    port, rec = fast_scp
    files = _instances(tmp_path, 4)
    assoc = _scu(port)
    try:
        assert assoc.send_c_store(files[0]).Status == 0
        rec.status = 0xA700
        assert assoc.send_c_store(files[1]).Status == 0xA700
        rec.status = 0
        rec.raise_in_handler = True
        assert assoc.send_c_store(files[2]).Status == scp.HANDLER_FAILED
        rec.raise_in_handler = False
        assert assoc.send_c_store(files[3]).Status == 0
    finally:
        assoc.release()
    assert rec.paths() == ["pynetdicom", "fast", "fast"]
    wait_for(lambda: _rx_files(rec) == [], 5, what="no file left in the receive folder")


def _raw_pdu(cx: int, flags: int, data: bytes) -> bytes:
    pdv = struct.pack(">IBB", len(data) + 2, cx, flags) + data
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def _cx_id(assoc: Any) -> int:
    return next(cx.context_id for cx in assoc.accepted_contexts
                if cx.abstract_syntax == CTImageStorage)


def test_a_broken_pdu_aborts_the_association_and_nothing_is_kept(fast_scp: Any,
                                                                  tmp_path: Path) -> None:
    port, rec = fast_scp
    files = _instances(tmp_path, 2)
    assoc = _scu(port)
    assert assoc.send_c_store(files[0]).Status == 0
    assert assoc.send_c_store(files[1]).Status == 0
    sock: socket.socket = assoc.dul.socket.socket
    cx = _cx_id(assoc)
    uid = generate_uid()
    command = dimse.c_store_command(3, str(CTImageStorage), uid)
    sock.sendall(_raw_pdu(cx, 0x03, command) + _raw_pdu(cx, 0x00, b"\x08\x00" * 64))
    # a PDU whose item claims more than the PDU holds
    sock.sendall(struct.pack(">BBI", 0x04, 0, 6) + struct.pack(">IBB", 100, cx, 0x02))
    _unpark(assoc)
    wait_for(lambda: assoc.is_aborted or not assoc.is_established, 10,
             what="the SCP to abort the association")
    assert [u for _p, u, _d in rec.stored] == [pydicom.dcmread(f).SOPInstanceUID
                                               for f in files]
    wait_for(lambda: _rx_files(rec) == [], 5, what="the partial data set to be removed")
    # the SCP still serves
    again = _scu(port)
    try:
        assert again.send_c_store(files[0]).Status == 0
    finally:
        again.release()


def test_a_peer_that_aborts_halfway_leaves_nothing(fast_scp: Any, tmp_path: Path) -> None:
    port, rec = fast_scp
    files = _instances(tmp_path, 1)
    assoc = _scu(port)
    assert assoc.send_c_store(files[0]).Status == 0
    sock: socket.socket = assoc.dul.socket.socket
    cx = _cx_id(assoc)
    command = dimse.c_store_command(2, str(CTImageStorage), generate_uid())
    sock.sendall(_raw_pdu(cx, 0x03, command) + _raw_pdu(cx, 0x00, b"\x08\x00" * 512))
    wait_for(lambda: len(_rx_files(rec)) >= 1, 10, what="a data set being received")
    assoc.abort()
    wait_for(lambda: _rx_files(rec) == [], 10, what="the cut-off data set to be removed")
    assert len(rec.stored) == 1


def test_a_silent_peer_meets_the_network_timeout(fast_scp: Any, tmp_path: Path) -> None:
    port, _rec = fast_scp
    files = _instances(tmp_path, 2)
    assoc = _scu(port)
    assert assoc.send_c_store(files[0]).Status == 0
    assert assoc.send_c_store(files[1]).Status == 0  # the fast path holds the socket now
    _unpark(assoc)
    t0 = time.monotonic()
    wait_for(lambda: not assoc.is_established, 15,
             what="the SCP to end the association after network_timeout (5 s)")
    assert time.monotonic() - t0 > 1  # not at once: it waited for the peer


def test_a_disk_that_fails_is_answered_with_a_status_and_the_association_goes_on(
        fast_scp: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write error (here: ENOSPC, which no real disk gives on demand) mid-data set and
    when the file is created: the rest of the data set is read and dropped, the handler
    decides the status, and the association goes on."""
    import errno

    port, rec = fast_scp
    files = _instances(tmp_path, 6, rows=300)  # several PDUs per data set

    def disk_full(*_args: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    assoc = _scu(port)
    try:
        assert assoc.send_c_store(files[0]).Status == 0
        assert assoc.send_c_store(files[1]).Status == 0
        monkeypatch.setattr(scp.ReceiveFile, "__init__", disk_full)
        assert assoc.send_c_store(files[2]).Status == 0  # its file was made before
        assert assoc.send_c_store(files[3]).Status == 0xA700   # creating the file
        monkeypatch.undo()
        monkeypatch.setattr(scp, "_write", disk_full)
        assert assoc.send_c_store(files[4]).Status == 0xA700   # mid-file
        monkeypatch.undo()
        assert assoc.send_c_store(files[5]).Status == 0
    finally:
        assoc.release()
    assert rec.paths() == ["pynetdicom", "fast", "fast", "error", "error", "fast"]
    assert all(b"No space left" in d for p, _u, d in rec.stored if p == "error")
    got = pydicom.dcmread(io.BytesIO(rec.stored[-1][2]))
    assert got.PixelData == pydicom.dcmread(files[5]).PixelData  # the stream stayed in step
    wait_for(lambda: _rx_files(rec) == [], 5, what="no file left in the receive folder")
