"""``dts receive`` against a hostile peer (issue 17, bounded memory): a PDU header that
announces gigabytes costs the receiver nothing; it is refused at once (an A-ASSOCIATE-RJ
for an association request, else an A-ABORT), the connection is closed, and real peers
(dcmtk echoscu and storescu) are served right after.

Each peer is a ``tests.rawpeer.RawPeer`` writing hand-made PDUs to a real ``dts receive``
started as a subprocess; its memory is read from /proc/<pid>/status while the test waits.
The last test turns it round: a peer that answers dts's C-STORE with such a header.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pynetdicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import evt

from dts.dicom import ae as dicom_ae
from dts.dicom import dimse, filemeta, scu, wire
from tests.helpers import (
    ECHOSCU,
    STORESCU,
    free_port,
    make_instance,
    make_study,
    run_dts,
    start_dts,
    station_config,
    stop_process,
    wait_for,
    wait_port,
)
from tests.rawpeer import CT_IMAGE, EXPLICIT_LE, RawPeer, associate_rq

# What a refusal may cost the receiver: far less than what the header announces.
RSS_BOUND = 100 * 1024 * 1024
CLOSE_WITHIN = 5.0  # seconds from the header to the closed connection


@dataclass
class Receiver:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def rss(self) -> int:
        """The receiver's resident memory in bytes (VmRSS)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


@pytest.fixture
def start_receiver(tmp_path: Path) -> Iterator[Callable[..., Receiver]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(station_text: str = "", command: str = "receive", **station: Any) -> Receiver:
        port = free_port()
        config = station_config(tmp_path, station={"ae_title": "DTS", "host": "127.0.0.1",
                                                   "port": port, "stable_seconds": 1,
                                                   **station}, station_text=station_text)
        log = tmp_path / f"receiver-{len(procs)}.log"
        proc = start_dts(command, config=config, log=log)
        procs.append(proc)
        wait_port(port, 30)
        assert proc.poll() is None, log.read_text()
        return Receiver(proc, port, log)

    yield start
    for proc in procs:
        stop_process(proc)


def _refused(rx: Receiver, peer: RawPeer, header: bytes) -> bytes:
    """Send ``header``; what the receiver answered before it closed the connection,
    within CLOSE_WITHIN, its memory staying within RSS_BOUND of what it was."""
    before = rx.rss()
    peer.send(header)
    deadline = time.monotonic() + CLOSE_WITHIN
    answer = b""
    try:
        while True:
            grown = rx.rss() - before
            if grown > RSS_BOUND:
                rx.proc.kill()  # it is allocating what the peer announced: stop it now
                raise AssertionError(f"the receiver's memory grew by {grown >> 20} MiB")
            try:
                answer = peer.until_closed(min(deadline, time.monotonic() + 0.05))
                break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
    finally:
        peer.close()
    assert rx.rss() - before < RSS_BOUND
    return answer


def _serves_real_peers(rx: Receiver, tmp_path: Path) -> None:
    echo = subprocess.run([ECHOSCU, "-aet", "PACS", "-aec", "DTS", "127.0.0.1", str(rx.port)],
                          capture_output=True, text=True, timeout=30, check=False)
    assert echo.returncode == 0, echo.stderr
    path = make_instance(tmp_path / "in" / "a.dcm", study_uid=generate_uid(),
                         series_uid=generate_uid())
    store = subprocess.run([STORESCU, "-aet", "PACS", "-aec", "DTS", "127.0.0.1", str(rx.port),
                            str(path)], capture_output=True, text=True, timeout=30, check=False)
    assert store.returncode == 0, store.stderr
    assert "Status" not in store.stderr or "Success" in store.stderr


def _instance(tmp_path: Path, name: str = "x.dcm") -> Path:
    return make_instance(tmp_path / "raw" / name, study_uid=generate_uid(),
                         series_uid=generate_uid())


@pytest.mark.peers
def test_an_association_request_announcing_4_gb_is_rejected_at_once(
        start_receiver: Any, tmp_path: Path) -> None:
    rx = start_receiver()
    answer = _refused(rx, RawPeer(rx.port),
                      struct.pack(">BBI", wire.A_ASSOCIATE_RQ, 0, 0xFFFF_FFF0))
    assert answer == wire.a_associate_rj(), answer  # permanent, local limit exceeded
    _serves_real_peers(rx, tmp_path)
    assert "announces 4294967280 bytes" in rx.log.read_text()


@pytest.mark.peers
def test_a_first_p_data_announcing_2_gb_is_aborted_at_once(start_receiver: Any,
                                                           tmp_path: Path) -> None:
    rx = start_receiver()
    peer = RawPeer(rx.port)
    assert CT_IMAGE in peer.associate()
    answer = _refused(rx, peer, struct.pack(">BBI", wire.P_DATA_TF, 0, 0x8000_0000))
    assert answer == wire.a_abort(), answer
    _serves_real_peers(rx, tmp_path)


@pytest.mark.peers
def test_a_p_data_announcing_2_gb_on_the_fast_path_is_aborted_at_once(
        start_receiver: Any, tmp_path: Path) -> None:
    rx = start_receiver()
    peer = RawPeer(rx.port)
    cx = peer.associate()[CT_IMAGE]
    # pynetdicom serves the first C-STORE of an association, dts's own path the others
    assert peer.c_store(cx, _instance(tmp_path, "1.dcm")) == 0
    assert peer.c_store(cx, _instance(tmp_path, "2.dcm")) == 0
    answer = _refused(rx, peer, struct.pack(">BBI", wire.P_DATA_TF, 0, 0x8000_0000))
    assert answer == wire.a_abort(), answer
    _serves_real_peers(rx, tmp_path)


@pytest.mark.peers
def test_unlimited_still_caps_what_pynetdicom_holds(start_receiver: Any,
                                                     tmp_path: Path) -> None:
    """max_pdu = 0 advertises no limit; a PDU pynetdicom would hold in memory (the first
    C-STORE of an association) is still refused above wire.MAX_BUFFERED_PDU."""
    rx = start_receiver(max_pdu=0)
    peer = RawPeer(rx.port)
    assert CT_IMAGE in peer.associate()
    answer = _refused(rx, peer, struct.pack(">BBI", wire.P_DATA_TF, 0, 0x8000_0000))
    assert answer == wire.a_abort(), answer
    _serves_real_peers(rx, tmp_path)


@pytest.mark.peers
def test_unlimited_streams_a_huge_p_data_without_holding_it(start_receiver: Any,
                                                             tmp_path: Path) -> None:
    """max_pdu = 0: on the fast path a 2 GB P-DATA-TF is accepted, and its data set goes to
    disk as it arrives; memory does not follow what was announced or sent."""
    rx = start_receiver(max_pdu=0)
    peer = RawPeer(rx.port)
    cx = peer.associate()[CT_IMAGE]
    assert peer.c_store(cx, _instance(tmp_path, "1.dcm")) == 0
    assert peer.c_store(cx, _instance(tmp_path, "2.dcm")) == 0
    before = rx.rss()
    peer.send(dimse.p_data_command(cx, dimse.c_store_command(9, CT_IMAGE, generate_uid())))
    announced = 0x8000_0000
    peer.send(wire.PDU_PDV_HEADER.pack(wire.P_DATA_TF, 0, announced, announced - 4, cx,
                                       wire.PDV_LAST))
    chunk = bytes(4 << 20)
    for _ in range(64):  # 256 MiB really sent
        peer.send(chunk)
        assert rx.rss() - before < RSS_BOUND
    def receiving() -> list[Path]:
        return list((tmp_path / "spool" / "tmp").glob(".rx-*"))

    assert any(f.stat().st_size > 200 << 20 for f in receiving())  # on disk
    peer.close()
    wait_for(lambda: not receiving(), 10, what="the cut-off data set removed")
    _serves_real_peers(rx, tmp_path)



# -- every socket has a deadline -----------------------------------------------------------

TIMEOUT = 2.0  # [station] network_timeout of these receivers
CLOSED_WITHIN = TIMEOUT + 3.0  # from the last byte to the closed connection


def _closed_in_time(peer: RawPeer, since: float) -> float:
    """Seconds from ``since`` to the receiver closing ``peer``'s connection; fails when it
    is still open CLOSED_WITHIN after ``since``."""
    try:
        peer.until_closed(since + CLOSED_WITHIN)
    finally:
        peer.close()
    return time.monotonic() - since


def _rx_files(tmp_path: Path) -> list[Path]:
    return list((tmp_path / "spool" / "tmp").glob(".rx-*"))


@pytest.mark.peers
def test_half_an_association_request_is_closed_after_the_network_timeout(
        start_receiver: Any, tmp_path: Path) -> None:
    rx = start_receiver(network_timeout=f"{TIMEOUT:g}s")
    peer = RawPeer(rx.port)
    rq = associate_rq("DTS", "HOSTILE")
    peer.send(rq[:len(rq) // 2])
    assert _closed_in_time(peer, time.monotonic()) >= TIMEOUT - 0.5
    _serves_real_peers(rx, tmp_path)


@pytest.mark.peers
def test_a_trickled_association_request_is_closed_after_the_network_timeout(
        start_receiver: Any, tmp_path: Path) -> None:
    """A byte at a time, each well within the timeout: the request as a whole must come
    within network_timeout of the connection."""
    rx = start_receiver(network_timeout=f"{TIMEOUT:g}s")
    peer = RawPeer(rx.port)
    start = time.monotonic()
    rq = associate_rq("DTS", "HOSTILE")
    try:
        for byte in rq[:-1]:
            peer.send(bytes([byte]))
            if not _open(peer):
                break
            assert time.monotonic() - start < CLOSED_WITHIN, "still open"
            time.sleep(TIMEOUT / 4)
    except OSError:
        pass  # closed while sending: what is wanted
    assert _closed_in_time(peer, start) < CLOSED_WITHIN
    _serves_real_peers(rx, tmp_path)


@pytest.mark.peers
def test_a_silent_connection_is_closed_after_the_network_timeout(
        start_receiver: Any, tmp_path: Path) -> None:
    """Not after pynetdicom's 30-s ACSE default: nothing sent, not even a header."""
    rx = start_receiver(network_timeout=f"{TIMEOUT:g}s")
    peer = RawPeer(rx.port)
    assert _closed_in_time(peer, time.monotonic()) >= TIMEOUT - 0.5
    _serves_real_peers(rx, tmp_path)


@pytest.mark.peers
def test_half_a_first_p_data_is_closed_after_the_network_timeout(
        start_receiver: Any, tmp_path: Path) -> None:
    """pynetdicom's path (an association's first C-STORE)."""
    rx = start_receiver(network_timeout=f"{TIMEOUT:g}s")
    peer = RawPeer(rx.port)
    cx = peer.associate()[CT_IMAGE]
    pdu = dimse.p_data_command(cx, dimse.c_store_command(7, CT_IMAGE, generate_uid()))
    peer.send(pdu[:len(pdu) // 2])
    assert _closed_in_time(peer, time.monotonic()) >= TIMEOUT - 0.5
    wait_for(lambda: not _rx_files(tmp_path), 5, what="no receive file left in tmp/")
    _serves_real_peers(rx, tmp_path)


@pytest.mark.peers
def test_half_a_p_data_on_the_fast_path_is_closed_after_the_network_timeout(
        start_receiver: Any, tmp_path: Path) -> None:
    rx = start_receiver(network_timeout=f"{TIMEOUT:g}s")
    peer = RawPeer(rx.port)
    cx = peer.associate()[CT_IMAGE]
    assert peer.c_store(cx, _instance(tmp_path, "1.dcm")) == 0
    assert peer.c_store(cx, _instance(tmp_path, "2.dcm")) == 0
    raw = _instance(tmp_path, "3.dcm").read_bytes()
    meta = filemeta.parse(raw)
    assert meta is not None and meta.sop_class and meta.sop_instance
    peer.send(dimse.p_data_command(cx, dimse.c_store_command(9, meta.sop_class,
                                                             meta.sop_instance)))
    data = wire.p_data(cx, wire.PDV_LAST, raw[meta.dataset_offset:])
    peer.send(data[:len(data) // 2])  # the data set's PDU, cut in the middle
    wait_for(lambda: _rx_files(tmp_path), 5, what="the data set being received")
    assert _closed_in_time(peer, time.monotonic()) >= TIMEOUT - 0.5
    wait_for(lambda: not _rx_files(tmp_path), 5, what="no receive file left in tmp/")
    _serves_real_peers(rx, tmp_path)


@pytest.mark.peers
@pytest.mark.parametrize("command", ["receive", "watch"])
def test_sigterm_ends_the_receiver_whatever_its_peers_do(start_receiver: Any,
                                                         tmp_path: Path, command: str) -> None:
    """Half a request, half a PDU on either path, a silent connection and an idle
    association are all open when SIGTERM comes: dts receive and dts watch exit 0 within
    a bound."""
    # network_timeout: the receiver's grace, established associations may end
    rx = start_receiver(network_timeout="10s", command=command)
    peers = [RawPeer(rx.port) for _ in range(5)]
    rq = associate_rq("DTS", "HOSTILE")
    peers[0].send(rq[:len(rq) // 2])
    cx = peers[1].associate()[CT_IMAGE]
    pdu = dimse.p_data_command(cx, dimse.c_store_command(7, CT_IMAGE, generate_uid()))
    peers[1].send(pdu[:len(pdu) // 2])
    cx = peers[2].associate()[CT_IMAGE]
    assert peers[2].c_store(cx, _instance(tmp_path, "1.dcm")) == 0
    assert peers[2].c_store(cx, _instance(tmp_path, "2.dcm")) == 0
    data = wire.p_data(cx, wire.PDV_LAST, bytes(1000))
    peers[2].send(dimse.p_data_command(cx, dimse.c_store_command(9, CT_IMAGE, generate_uid()))
                  + data[:500])
    peers[3].associate()  # idle
    # peers[4]: silent
    time.sleep(0.5)  # let the receiver read what was sent (there is nothing to wait for)
    start = time.monotonic()
    rx.proc.send_signal(signal.SIGTERM)
    try:
        code = rx.proc.wait(16)
    except subprocess.TimeoutExpired:
        rx.proc.kill()
        raise AssertionError(f"dts {command} did not exit after SIGTERM") from None
    finally:
        for peer in peers:
            peer.close()
    took = time.monotonic() - start
    assert code == 0, rx.log.read_text()
    assert took < 16, took



@dataclass
class _Item:
    path: Path
    sop_uid: str
    sop_class: str = CT_IMAGE


def test_a_peer_answering_a_c_store_with_a_4_gb_header_costs_the_sender_nothing(
        tmp_path: Path) -> None:
    """The requestor side (dts send's C-STORE path): a response PDU announcing more than
    accepted ends the batch as a lost connection, before anything is allocated for it."""

    def answer_hostile(event: Any) -> int:
        event.assoc.dul.socket.socket.sendall(
            struct.pack(">BBI", wire.P_DATA_TF, 0, 0xFFFF_FFF0))
        return 0

    scp_ae = pynetdicom.AE(ae_title="HOSTILE")
    scp_ae.add_supported_context(CT_IMAGE, pynetdicom.ALL_TRANSFER_SYNTAXES)
    port = free_port()
    server = scp_ae.start_server(("127.0.0.1", port), block=False,
                                 evt_handlers=[(evt.EVT_C_STORE, answer_hostile)])
    assert server is not None
    try:
        ae = dicom_ae.make_ae("DTS", network_timeout=5, dimse_timeout=5)
        ae.add_requested_context(CT_IMAGE, EXPLICIT_LE)
        assoc = dicom_ae.associate(ae, "127.0.0.1", port, ae_title="HOSTILE")
        assert assoc.is_established
        path = _instance(tmp_path)
        meta = filemeta.parse(path.read_bytes())
        assert meta is not None and meta.sop_instance
        cx = assoc.accepted_contexts[0].context_id
        try:
            with scu.Sender(assoc, 5) as sender:
                assert sender.held
                with pytest.raises(ConnectionError, match="4294967280 bytes, more than"):
                    sender.store(_Item(path, meta.sop_instance), cx)
        finally:
            assoc.abort()
    finally:
        server.shutdown()


# -- always an answer, nothing left behind (issue 17) ----------------------------------------

_BAD_UIDS = {"empty": "", "too long": "1." + "2" * 70, "letters": "1.2.abc", "a path": "../x"}


def _bad_instance(tmp_path: Path, name: str, where: str, uid: str) -> tuple[Path, str | None]:
    """An instance whose ``where`` UID (sop, study, series) is ``uid``; with ``command``,
    a valid instance whose C-STORE-RQ names ``uid`` as its SOP Instance UID (returned)."""
    path = tmp_path / "raw" / name
    study = uid if where == "study" else generate_uid()
    series = uid if where == "series" else generate_uid()
    make_instance(path, study_uid=study, series_uid=series)
    if where == "sop":
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.save_as(path)
    return path, uid if where == "command" else None


def _store(peer: RawPeer, cx: int, path: Path, command_sop: str | None = None) -> int:
    """C-STORE ``path`` (its SOP Instance UID in the command: ``command_sop`` if given);
    the status of the C-STORE-RSP, which must come."""
    raw = path.read_bytes()
    meta = filemeta.parse(raw)
    assert meta is not None and meta.sop_class
    sop = meta.sop_instance or "" if command_sop is None else command_sop
    peer.send(dimse.p_data_command(cx, dimse.c_store_command(3, meta.sop_class, sop))
              + wire.p_data(cx, wire.PDV_LAST, raw[meta.dataset_offset:]))
    pdu_type, body = peer.read_pdu()
    assert pdu_type == wire.P_DATA_TF, f"PDU 0x{pdu_type:02X} instead of a C-STORE-RSP"
    fields = dimse.command_fields(b"".join(bytes(f) for _c, _f, f in wire.pdvs(body)))
    assert dimse.u16(fields, dimse.COMMAND_FIELD) == dimse.C_STORE_RSP
    status = dimse.u16(fields, dimse.STATUS)
    assert status is not None
    return status


def _spool_files(tmp_path: Path, folder: str) -> list[Path]:
    return sorted(p for p in (tmp_path / "spool" / folder).rglob("*")
                  if p.is_file() and ".run" not in p.parts)


@pytest.mark.peers
@pytest.mark.parametrize("where", ["sop", "command", "study", "series"])
def test_invalid_uids_are_answered_first_and_later_and_the_association_goes_on(
        start_receiver: Any, tmp_path: Path, where: str) -> None:
    """Every invalid UID (empty, longer than 64, letters, a path) in the command set or the
    data set gets 0xC000-range on the association's first C-STORE (pynetdicom's path) and
    on a later one (the fast path); the valid instances after each are stored, nothing
    invalid reaches incoming/ and nothing is left in tmp/."""
    rx = start_receiver(stable_seconds=60)  # nothing is published while we look
    stored: list[str] = []
    for kind, uid in _BAD_UIDS.items():
        peer = RawPeer(rx.port)
        cx = peer.associate()[CT_IMAGE]
        statuses = []
        for step in ("first", "ok", "later", "ok"):
            if step == "ok":
                path = _instance(tmp_path, f"ok-{len(stored)}.dcm")
                meta = filemeta.parse(path.read_bytes())
                assert meta is not None and meta.sop_instance
                stored.append(meta.sop_instance)
                statuses.append(_store(peer, cx, path))
            else:
                path, command_sop = _bad_instance(tmp_path, f"{step}.dcm", where, uid)
                statuses.append(_store(peer, cx, path, command_sop))
        peer.close()
        assert [s & 0xF000 == 0xC000 for s in statuses] == [True, False, True, False], \
            (kind, [hex(s) for s in statuses])
        assert statuses[1] == statuses[3] == 0, (kind, statuses)
    got = _spool_files(tmp_path, "incoming")
    assert sorted(p.stem for p in got if p.suffix == ".dcm") == sorted(stored)
    wait_for(lambda: not _spool_files(tmp_path, "tmp"), 10, what="tmp/ empty")
    assert rx.proc.poll() is None


@pytest.mark.peers
@pytest.mark.parametrize("later", [False, True], ids=["first", "later"])
def test_a_cut_off_data_set_leaves_nothing_in_tmp(start_receiver: Any, tmp_path: Path,
                                                   later: bool) -> None:
    """A data set cut off by the peer's closing the connection, on the association's first
    C-STORE (pynetdicom's path) or a later one (the fast path): once the association has
    ended, tmp/ holds nothing of it."""
    rx = start_receiver()
    peer = RawPeer(rx.port)
    cx = peer.associate()[CT_IMAGE]
    if later:
        assert peer.c_store(cx, _instance(tmp_path, "1.dcm")) == 0
    path = _instance(tmp_path, "cut.dcm")
    raw = path.read_bytes()
    meta = filemeta.parse(raw)
    assert meta is not None and meta.sop_class and meta.sop_instance
    data = raw[meta.dataset_offset:]
    peer.send(dimse.p_data_command(cx, dimse.c_store_command(5, meta.sop_class,
                                                             meta.sop_instance)))
    peer.send(wire.p_data(cx, 0, data[:len(data) // 2]))  # not the last fragment
    wait_for(lambda: _spool_files(tmp_path, "tmp"), 10, what="the data set being received")
    peer.close()
    wait_for(lambda: not _spool_files(tmp_path, "tmp"), 10,
             what="the cut-off data set removed from tmp/")
    _serves_real_peers(rx, tmp_path)
    assert rx.proc.poll() is None


# -- no lock-out ---------------------------------------------------------------------
# Connections that have not sent a valid A-ASSOCIATE-RQ do not count against
# max_associations; they have a budget per address and in total, oldest closed first.
FLOOD = "127.0.0.2"  # the flooding peer's address; real peers come from 127.0.0.1


def _events(tmp_path: Path, event: str) -> list[dict[str, Any]]:
    return [rec for f in sorted((tmp_path / "spool" / "log").glob("*.jsonl"))
            for rec in map(json.loads, f.read_text().splitlines()) if rec["event"] == event]


def _fds(rx: Receiver) -> int:
    return len(list(Path(f"/proc/{rx.proc.pid}/fd").iterdir()))


def _threads(rx: Receiver) -> int:
    for line in Path(f"/proc/{rx.proc.pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads")


def _open(peer: RawPeer) -> bool:
    """True while the receiver keeps ``peer``'s connection open: no end of stream in what
    it sent (a closed one may have sent an A-ABORT first, read and dropped here)."""
    peer.sock.setblocking(False)
    try:
        while peer.sock.recv(4096):
            pass
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        peer.sock.setblocking(True)
        peer.sock.settimeout(peer.timeout)


@pytest.mark.peers
def test_idle_connections_do_not_lock_out_real_peers(start_receiver: Any,
                                                     tmp_path: Path) -> None:
    """20 silent connections from one address, max_associations = 4: echoscu and storescu
    from another address are served at once, and the flood keeps only its newest
    max_pending_per_host connections (one process: the budget is exactly this one)."""
    rx = start_receiver(network_timeout="60s", max_associations=4, max_pending_per_host=3,
                        receive_workers=1)
    flood = []
    for _ in range(20):
        flood.append(RawPeer(rx.port, source=FLOOD))
        time.sleep(0.02)  # in order: the oldest are closed first
    try:
        _serves_real_peers(rx, tmp_path)
        state: list[bool] = []

        def cut_to_budget() -> bool:
            state[:] = [_open(p) for p in flood]
            return sum(state) == 3
        wait_for(cut_to_budget, 10, what="three flooding connections left open")
        assert state == [False] * 17 + [True] * 3, "not the oldest closed first"
        # a journal line says so (one per minute at most, whatever the flood)
        (closed,) = wait_for(lambda: _events(tmp_path, "connections-closed"), 5,
                             what="the connections-closed event")
        assert closed["status"] == "warning" and FLOOD in closed["by_host"]
        assert 1 <= closed["closed"] <= 17
    finally:
        for peer in flood:
            peer.close()


@pytest.mark.peers
def test_idle_connections_do_not_lock_out_real_peers_of_a_receiver_with_workers(
        start_receiver: Any, tmp_path: Path) -> None:
    """With two worker processes each keeps its share of the pending budget: the real
    peers are served at once, and of 20 silent connections from one address no more than
    max_pending_per_host stay open station-wide."""
    rx = start_receiver(network_timeout="60s", max_associations=4, max_pending_per_host=4,
                        receive_workers=2)
    flood = []
    for _ in range(20):
        flood.append(RawPeer(rx.port, source=FLOOD))
        time.sleep(0.02)
    try:
        _serves_real_peers(rx, tmp_path)
        wait_for(lambda: 1 <= sum(_open(p) for p in flood) <= 4, 10,
                 what="at most four flooding connections left open")
    finally:
        for peer in flood:
            peer.close()


@pytest.mark.peers
def test_max_associations_still_bounds_established_associations(
        start_receiver: Any, tmp_path: Path) -> None:
    rx = start_receiver(network_timeout="60s", max_associations=2)
    held = [RawPeer(rx.port) for _ in range(3)]
    try:
        held[0].associate()
        held[1].associate()
        held[2].send(associate_rq("DTS", "THIRD"))
        pdu_type, body = held[2].read_pdu()
        assert pdu_type == wire.A_ASSOCIATE_RJ
        assert body[1:4] == bytes([0x02, 0x03, 0x02])  # transient, local limit exceeded
        held[0].send(wire.PDU_HEADER.pack(wire.A_RELEASE_RQ, 0, 4) + bytes(4))
        assert held[0].read_pdu()[0] == wire.A_RELEASE_RP
        held[0].close()
        wait_for(lambda: subprocess.run(
            [ECHOSCU, "-aet", "PACS", "-aec", "DTS", "127.0.0.1", str(rx.port)],
            capture_output=True, timeout=30, check=False).returncode == 0, 10,
            what="an association once one was released")
    finally:
        for peer in held:
            peer.close()


@pytest.mark.peers
def test_a_flood_from_many_addresses_spares_the_one_with_few(start_receiver: Any,
                                                             tmp_path: Path) -> None:
    """The total budget is exhausted by two flooding addresses: the one with the most
    pending connections loses its oldest; a single pending connection from a third
    address is never the one closed."""
    rx = start_receiver(network_timeout="60s", max_pending_per_host=8,
                        max_pending_connections=10)
    lone = RawPeer(rx.port, source="127.0.0.4")
    time.sleep(0.05)
    flood = []
    try:
        for i in range(30):
            flood.append(RawPeer(rx.port, source="127.0.0.2" if i % 2 else "127.0.0.3"))
            time.sleep(0.01)
        wait_for(lambda: sum(_open(p) for p in flood) <= 9, 10,
                 what="the flood cut to the total budget")
        assert _open(lone)
        lone.send(associate_rq("DTS", "LONE"))
        assert lone.read_pdu()[0] == wire.A_ASSOCIATE_AC
    finally:
        lone.close()
        for peer in flood:
            peer.close()


@pytest.mark.peers
@pytest.mark.slow
def test_a_burst_of_200_connections_does_not_keep_a_study_out(start_receiver: Any,
                                                               tmp_path: Path) -> None:
    """200 connections in a burst from one address (silent, half a request, closed at
    once) while dcmtk storescu sends a study from another: the study arrives whole, and
    the receiver's descriptors and threads return to their idle level."""
    rx = start_receiver(network_timeout="3s")
    study = make_study(tmp_path / "exam", n_series=2, per_series=20)
    files = sorted(str(p) for p in study["folder"].rglob("*.dcm"))
    idle_fds, idle_threads = _fds(rx), _threads(rx)
    rq = associate_rq("DTS", "HOSTILE")
    flood: list[RawPeer] = []
    errors: list[OSError] = []

    def burst(count: int) -> None:
        try:
            for i in range(count):
                peer = RawPeer(rx.port, source=FLOOD)
                if i % 3 == 1:
                    peer.send(rq[:len(rq) // 2])
                elif i % 3 == 2:
                    peer.close()
                    continue
                flood.append(peer)
        except OSError as exc:  # reported by the main thread
            errors.append(exc)

    burst(100)  # open before the study comes, and 100 more while it comes
    assert not errors, errors
    flooder = threading.Thread(target=burst, args=(100,))
    flooder.start()
    try:
        store = subprocess.run([STORESCU, "-aet", "PACS", "-aec", "DTS", "127.0.0.1",
                                str(rx.port), *files],
                               capture_output=True, text=True, timeout=60, check=False)
        flooder.join(60)
        assert not flooder.is_alive() and not errors, errors
        assert store.returncode == 0, store.stderr
        job = wait_for(lambda: list((tmp_path / "spool" / "classify" / "new").iterdir()), 20,
                       what="the study published")
        assert len(job) == 1
        received = list((job[0] / "input").rglob("*.dcm"))
        assert len(received) == len(files)
    finally:
        for peer in flood:
            peer.close()
    wait_for(lambda: _fds(rx) <= idle_fds + 2 and _threads(rx) <= idle_threads + 2, 15,
             what=f"descriptors and threads back to idle ({idle_fds}, {idle_threads})")
    _serves_real_peers(rx, tmp_path)


@pytest.mark.peers
def test_a_silent_connection_does_not_block_a_tls_station(start_receiver: Any,
                                                          tmp_path: Path) -> None:
    """The TLS handshake happens on the connection's own thread with a deadline, not on
    the one that accepts: a peer that connects and sends nothing delays nobody."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    rx = start_receiver(network_timeout=f"{TIMEOUT:g}s", station_text=(
        f'[station.tls]\ncertificate = "{cert}"\nprivate_key = "{key}"'))
    silent = RawPeer(rx.port, source=FLOOD)
    try:
        done = run_dts("echo", config=tmp_path / "dts.toml")
        assert done.returncode == 0, done.stderr
        assert _closed_in_time(silent, time.monotonic()) < CLOSED_WITHIN
    finally:
        silent.close()


# -- the requestor side: dts echo and dts send against a peer that stops halfway --------

class HalfAnswer:
    """A listening "SCP" that reads an A-ASSOCIATE-RQ and answers with the first bytes
    of an A-ASSOCIATE-AC only, then holds the connection open and silent."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.listener.settimeout(30)
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        self.held.append(conn)
        conn.settimeout(30)
        head = conn.recv(wire.PDU_HEADER_LEN, socket.MSG_WAITALL)
        if len(head) == wire.PDU_HEADER_LEN:
            conn.recv(wire.pdu_header(head)[1], socket.MSG_WAITALL)
            conn.sendall(wire.PDU_HEADER.pack(wire.A_ASSOCIATE_AC, 0, 200) + bytes(20))

    def close(self) -> None:
        self.listener.close()
        for conn in self.held:
            conn.close()
        self.thread.join(5)


@pytest.mark.peers
def test_dts_echo_gives_up_on_a_peer_silent_mid_answer(tmp_path: Path) -> None:
    config = station_config(tmp_path, station={"network_timeout": f"{TIMEOUT:g}s"})
    peer = HalfAnswer()
    try:
        start = time.monotonic()
        done = run_dts("echo", f"127.0.0.1:{peer.port}", "--timeout", f"{TIMEOUT:g}",
                       config=config, timeout=30)
        took = time.monotonic() - start
    finally:
        peer.close()
    assert done.returncode == 75, done.stderr
    assert took < TIMEOUT + 10, took


@pytest.mark.peers
def test_dts_send_gives_up_on_a_peer_silent_mid_response(tmp_path: Path) -> None:
    """A real association, then half a C-STORE response and silence: dts send ends
    the try as a lost connection within network_timeout (exit 75), nothing marked sent."""
    release = threading.Event()

    def half_response(event: Any) -> int:
        event.assoc.dul.socket.socket.sendall(
            struct.pack(">BBI", wire.P_DATA_TF, 0, 200) + bytes(20))
        release.wait(30)
        return 0

    scp_ae = pynetdicom.AE(ae_title="HOSTILE")
    scp_ae.add_supported_context(CT_IMAGE, pynetdicom.ALL_TRANSFER_SYNTAXES)
    port = free_port()
    server = scp_ae.start_server(("127.0.0.1", port), block=False,
                                 evt_handlers=[(evt.EVT_C_STORE, half_response)])
    assert server is not None
    config = station_config(tmp_path, station={"network_timeout": f"{TIMEOUT:g}s",
                                               "dimse_timeout": "60s"})
    try:
        start = time.monotonic()
        done = run_dts("send", "--to", f"127.0.0.1:{port}", "--ae-title", "HOSTILE",
                       str(_instance(tmp_path)), config=config, timeout=60)
        took = time.monotonic() - start
    finally:
        release.set()
        server.shutdown()
    assert done.returncode == 75, done.stderr
    assert took < TIMEOUT + 10, took
