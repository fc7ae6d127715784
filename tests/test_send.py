"""`dts send`: delivery to real peers (Orthanc as the PACS, dcmtk storescp), per-instance
state, retries, refusals, folder destinations, and `dts send --to`."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, generate_uid
from pynetdicom import acse

from dts import sender
from dts.config import StationConfig
from dts.dicom import dimse, filemeta, scu
from dts.dicom import store as dicom_store
from dts.spool import Job, Queue, Spool, State, isotime, utcnow
from dts.station import Station
from tests.helpers import (
    free_port,
    make_instance,
    run_dts,
    start_dts,
    station_config,
    stop_process,
    wait_for,
)
from tests.plugins.peers import Orthanc, StoreSCP

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "configuration" / "classifyRules.json"
CT = "1.2.840.10008.5.1.4.1.1.2"
SC = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage


def write_config(tmp_path: Path, destinations: str, stream_destinations: list[str], *,
                 retries: int = 3, backoff: str = "60s", more: str = "") -> Path:
    return station_config(
        tmp_path, station={"ae_title": "DTS", "send_retries": retries, "send_backoff": backoff,
                           "dimse_timeout": 10, "network_timeout": 10},
        tail=f"""{destinations}
[[stream]]
name = "seg"
command = ["true"]
destinations = {json.dumps(stream_destinations)}
{more}
""")


def dicom_destination(name: str, peer: Orthanc | StoreSCP | tuple[str, int]) -> str:
    ae, port = peer if isinstance(peer, tuple) else (peer.aet, peer.port)
    return f'[[destination]]\nname = "{name}"\nae_title = "{ae}"\nhost = "127.0.0.1"\n' \
           f'port = {port}\n'


def queue_send_job(spool: Spool, *, n: int = 3, sop_class: str = CT, extra: int = 0,
                   extra_class: str = SC, calling_ae: str = "MODALITY", listed: bool = True,
                   other_files: dict[str, str] | None = None, size: int = 16,
                   state: dict[str, Any] | None = None,
                   stream: str = "seg") -> tuple[str, list[str], list[str]]:
    """A finished run job in send/new: ``n`` results of ``sop_class`` and ``extra`` of
    ``extra_class``; returns (job id, uids of the first kind, uids of the second)."""
    spool.ensure()
    job = spool.create_tmp_job()
    study, series = generate_uid(), generate_uid()
    outputs, main, others = [], [], []
    for i in range(n + extra):
        cls = sop_class if i < n else extra_class
        uid = generate_uid()
        rel = f"{series}/{uid}.dcm"
        make_instance(job.output_dir / rel, study_uid=study, series_uid=series, sop_uid=uid,
                      sop_class=cls, instance_number=i + 1, rows=size, cols=size)
        outputs.append({"file": rel, "sop_uid": uid, "sop_class": cls,
                        "transfer_syntax": ExplicitVRLittleEndian})
        (main if i < n else others).append(uid)
    for name, text in (other_files or {}).items():
        (job.output_dir / name).write_text(text)
    data: dict[str, Any] = {"stream": stream, "study_uid": study, "calling_ae": calling_ae,
                            "called_ae": "DTS", "peer": "127.0.0.1"}
    if listed:
        data["outputs"] = outputs
    if state:
        data["destinations"] = state
    job.write(data)
    spool.publish(job, Queue.SEND)
    return job.id, main, others


def where(spool: Spool, job_id: str) -> str:
    return str(spool.find(job_id)[0])


def job_data(spool: Spool, job_id: str) -> dict[str, Any]:
    return Job(spool.find(job_id)[1]).read()


def events(spool: Spool, job_id: str) -> list[dict[str, Any]]:
    return Job(spool.find(job_id)[1]).events()


# -- the send stage ----------------------------------------------------------------------------

def test_delivers_to_two_destinations(tmp_path: Path, orthanc: Orthanc,
                                      storescp: StoreSCP) -> None:
    spool = Spool(tmp_path / "spool")
    cfg = write_config(tmp_path, dicom_destination("pacs", orthanc)
                       + dicom_destination("archive", storescp), ["pacs", "archive"])
    job_id, uids, _ = queue_send_job(spool, n=4)
    proc = run_dts("send", "--once", config=cfg)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [job_id, "done"]
    assert where(spool, job_id) == "done"
    assert orthanc.sop_uids() == set(uids)
    assert orthanc.instance_count() == 4
    assert {t["SOPClassUID"] for t in orthanc.instances().values()} == {CT}
    assert storescp.sop_uids() == set(uids)
    data = job_data(spool, job_id)
    assert data["attempts"] == 1
    for name in ("pacs", "archive"):
        assert data["destinations"][name]["status"] == "done"
        assert sorted(data["destinations"][name]["sent"]) == sorted(uids)
        assert data["destinations"][name]["failed"] == {}
    assert [e["event"] for e in events(spool, job_id)][-1] == "sent"


def test_sender_is_the_node_the_study_came_from(tmp_path: Path,
                                                orthanc_factory: Callable[..., Orthanc]) -> None:
    modality = orthanc_factory("MODALITY")
    other = orthanc_factory("OTHER")
    spool = Spool(tmp_path / "spool")
    cfg = write_config(tmp_path, dicom_destination("ct-console", modality)
                       + dicom_destination("other", other), ["@sender"])
    good, uids, _ = queue_send_job(spool, calling_ae="MODALITY")
    stranger, _, _ = queue_send_job(spool, calling_ae="UNKNOWN_AE")
    proc = run_dts("send", "--once", config=cfg)
    assert proc.returncode == 1, proc.stderr
    assert where(spool, good) == "done"
    assert modality.sop_uids() == set(uids)
    assert other.instance_count() == 0
    assert job_data(spool, good)["destinations"]["ct-console"]["via"] == "@sender"
    assert where(spool, stranger) == "failed"
    err = job_data(spool, stranger)["error"]
    assert "@sender" in err and "UNKNOWN_AE" in err and "ae_title" in err


def test_destination_down_then_up_sends_only_the_missing(
        tmp_path: Path, orthanc_factory: Callable[..., Orthanc]) -> None:
    port = free_port()
    spool = Spool(tmp_path / "spool")
    reports = tmp_path / "reports"
    cfg = write_config(tmp_path, dicom_destination("pacs", ("ORTHANC", port))
                       + f'[[destination]]\nname = "reports"\nfolder = "{reports}"\n', ["pacs"],
                       retries=3, backoff="1h",
                       more='[[stream]]\nname = "summary"\ncommand = ["true"]\n'
                            'destinations = ["reports"]\n')
    # two of six were delivered by an earlier try: only the other four may be sent again
    job_id, uids, _ = queue_send_job(spool, n=6)
    data = job_data(spool, job_id)
    data["destinations"] = {"pacs": {"status": "retry", "sent": uids[:2], "failed": {}}}
    Job(spool.find(job_id)[1]).write(data)

    first = run_dts("send", "--once", config=cfg)
    assert first.returncode == 75, first.stderr
    assert first.stdout.split() == [job_id, "retry"]
    assert where(spool, job_id) == "send/new"
    data = job_data(spool, job_id)
    assert data["attempts"] == 1
    assert data["destinations"]["pacs"]["status"] == "retry"
    assert data["destinations"]["pacs"]["sent"] == uids[:2]
    assert "not reachable" in data["destinations"]["pacs"]["error"]
    due = data["next_attempt_at"]
    assert due > isotime(utcnow() + timedelta(minutes=29))  # 1h backoff, jitter ≥ half
    assert any(e["event"] == "send-retry" and e["status"] == "warning"
               for e in events(spool, job_id))

    # not due yet: a cron run leaves it alone, and other jobs keep flowing
    flowing, _, _ = queue_send_job(spool, n=1, stream="summary")
    later = run_dts("send", "--once", config=cfg)
    assert later.returncode == 0, later.stderr
    assert later.stdout.split() == [flowing, "done"]
    assert (reports / flowing).is_dir()
    assert where(spool, job_id) == "send/new"
    assert job_data(spool, job_id)["attempts"] == 1

    pacs = orthanc_factory("ORTHANC", dicom_port=port)
    now = run_dts("send", job_id, config=cfg)  # by id: now, whatever the backoff
    assert now.returncode == 0, now.stderr
    assert where(spool, job_id) == "done"
    assert pacs.sop_uids() == set(uids[2:])
    data = job_data(spool, job_id)
    assert data["attempts"] == 2
    assert sorted(data["destinations"]["pacs"]["sent"]) == sorted(uids)
    assert "next_attempt_at" not in data


def test_gives_up_after_the_retries(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    cfg = write_config(tmp_path, dicom_destination("pacs", ("PACS", free_port())), ["pacs"],
                       retries=1, backoff="0s")
    job_id, _, _ = queue_send_job(spool, n=1)
    assert run_dts("send", "--once", config=cfg).returncode == 75
    last = run_dts("send", "--once", config=cfg)
    assert last.returncode == 1, last.stderr
    assert where(spool, job_id) == "failed"
    data = job_data(spool, job_id)
    assert data["attempts"] == 2
    assert data["destinations"]["pacs"]["status"] == "failed"
    assert "gave up after 2 tries" in data["error"]


def test_peer_refusing_one_sop_class_fails_only_that_object(
        tmp_path: Path, storescp_factory: Callable[..., StoreSCP], orthanc: Orthanc) -> None:
    ct_only = storescp_factory("CTONLY", sop_classes=[CT])
    spool = Spool(tmp_path / "spool")
    cfg = write_config(tmp_path, dicom_destination("ctonly", ct_only)
                       + dicom_destination("pacs", orthanc), ["ctonly", "pacs"])
    job_id, cts, scs = queue_send_job(spool, n=3, extra=1, extra_class=SC)
    proc = run_dts("send", "--once", config=cfg)
    assert proc.returncode == 1, proc.stderr
    assert where(spool, job_id) == "failed"
    assert ct_only.sop_uids() == set(cts)                 # the rest went through
    assert orthanc.sop_uids() == set(cts + scs)           # the other destination got all
    data = job_data(spool, job_id)
    state = data["destinations"]["ctonly"]
    assert state["status"] == "failed"
    assert state["failed"] == {scs[0]: "no-context"}
    assert sorted(state["sent"]) == sorted(cts)
    assert data["destinations"]["pacs"]["status"] == "done"
    assert "ctonly" in data["error"]
    refused = [e for e in events(spool, job_id) if e["event"] == "store-failed"]
    assert len(refused) == 1 and refused[0]["sop_uid"] == scs[0]
    assert "Secondary Capture Image Storage" in refused[0]["message"]


def test_association_dropped_halfway_resumes_with_the_missing(
        tmp_path: Path, storescp_factory: Callable[..., StoreSCP]) -> None:
    # a slow peer (1 s after each store) so that it surely dies in the middle
    scp = storescp_factory("ARCHIVE", args=["--sleep-after", "1"])
    spool = Spool(tmp_path / "spool")
    cfg = write_config(tmp_path, dicom_destination("archive", scp), ["archive"])
    job_id, uids, _ = queue_send_job(spool, n=30)
    proc = start_dts("send", "--once", config=cfg, log=tmp_path / "send.log")
    try:
        scp.wait_for_files(3, timeout=60)
        scp.kill()  # the peer dies in the middle of the transfer
        assert proc.wait(60) == 75, (tmp_path / "send.log").read_text()
    finally:
        stop_process(proc)
    assert where(spool, job_id) == "send/new"
    state = job_data(spool, job_id)["destinations"]["archive"]
    received = scp.sop_uids()
    assert state["status"] == "retry"
    assert 0 < len(state["sent"]) < len(uids)
    assert set(state["sent"]) <= received  # confirmed means stored: never a loss

    scp.restart(out_dir=tmp_path / "second", args=[])
    again = run_dts("send", job_id, config=cfg)
    assert again.returncode == 0, again.stderr
    assert where(spool, job_id) == "done"
    assert scp.sop_uids() == set(uids) - set(state["sent"])  # only what was missing


def test_association_rejected_for_good_fails_at_once(
        tmp_path: Path, storescp_factory: Callable[..., StoreSCP]) -> None:
    scp = storescp_factory("REFUSES", args=["--refuse"])  # rejected-permanent
    spool = Spool(tmp_path / "spool")
    cfg = write_config(tmp_path, dicom_destination("archive", scp), ["archive"], retries=5)
    job_id, _, _ = queue_send_job(spool, n=1)
    proc = run_dts("send", "--once", config=cfg)
    assert proc.returncode == 1, (proc.stderr, job_data(spool, job_id).get("destinations"))
    assert where(spool, job_id) == "failed"
    data = job_data(spool, job_id)
    assert data["attempts"] == 1
    assert "rejected the association" in data["error"] and "Permanent" in data["error"]


def test_a_rejection_pynetdicom_read_too_early_is_still_for_good(
        tmp_path: Path, storescp_factory: Callable[..., StoreSCP],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """storescp --refuse rejects and closes at once. When pynetdicom's DUL thread has read
    the rejection and closed the socket before the requestor looks at it (a busy machine),
    pynetdicom aborts with the A-ASSOCIATE-RJ unread: the store still says "for good".
    The requestor is made late on purpose; the peer is real."""
    scp = storescp_factory("REFUSES", args=["--refuse"])
    original = acse.ACSE.send_request

    def late(self: Any) -> None:
        original(self)
        wait_for(lambda: self.dul.to_user_queue.qsize() and not self.socket._is_connected,
                 timeout=10, what="the DUL thread reading the rejection and closing")

    monkeypatch.setattr(acse.ACSE, "send_request", late)
    path = make_instance(tmp_path / "a.dcm", study_uid=generate_uid(), series_uid=generate_uid())
    items, _ = dicom_store.scan([path])
    peer = dicom_store.Peer("archive", scp.aet, "127.0.0.1", scp.port, "DTS")
    result = dicom_store.store(peer, items, dicom_store.NetSettings(dimse_timeout=10))
    assert result.temporary is None, result.temporary
    assert result.refused is not None and "Rejected Permanent" in result.refused


def test_peer_aborting_every_store_is_temporary(
        tmp_path: Path, storescp_factory: Callable[..., StoreSCP]) -> None:
    scp = storescp_factory("ABORTS", args=["--abort-after"])
    spool = Spool(tmp_path / "spool")
    cfg = write_config(tmp_path, dicom_destination("archive", scp), ["archive"])
    job_id, _, _ = queue_send_job(spool, n=2)
    proc = run_dts("send", "--once", config=cfg)
    assert proc.returncode == 75, proc.stderr
    state = job_data(spool, job_id)["destinations"]["archive"]
    assert state["status"] == "retry" and state["sent"] == []
    # the A-ABORT PDU, or the reset of the connection that follows it if that comes first
    assert "ABORTS" in state["error"] and ("A-ABORT" in state["error"]
                                           or "connection" in state["error"])


def test_folder_destination(tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    spool = Spool(tmp_path / "spool")
    cfg = write_config(tmp_path, f'[[destination]]\nname = "reports"\nfolder = "{reports}"\n',
                       ["reports"])
    # no outputs list in job.json: the sender finds the DICOM objects by their headers
    job_id, uids, _ = queue_send_job(spool, n=2, listed=False,
                                     other_files={"summary.txt": "volume 12 ml\n"})
    proc = run_dts("send", "--once", config=cfg)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in reports.iterdir()) == [job_id]  # no temporary name left
    delivered = reports / job_id
    assert (delivered / "summary.txt").read_text() == "volume 12 ml\n"
    got = {str(dcmread(p).SOPInstanceUID) for p in delivered.rglob("*.dcm")}
    assert got == set(uids)
    state = job_data(spool, job_id)["destinations"]["reports"]
    assert state["status"] == "done" and sorted(state["sent"]) == sorted(uids)


def test_folder_delivery_replaces_a_previous_one_whole(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("new")
    folder = tmp_path / "out"
    (folder / "J").mkdir(parents=True)
    (folder / "J" / "stale.txt").write_text("old")
    final = sender.deliver_to_folder(folder, "J", [(src / "a.txt", Path("sub/a.txt"))])
    assert final == folder / "J"
    assert [p.name for p in folder.iterdir()] == ["J"]
    assert sorted(str(p.relative_to(final)) for p in final.rglob("*")) == ["sub", "sub/a.txt"]


# -- transfer syntaxes -------------------------------------------------------------------------

def test_objects_go_as_encoded_or_converted_only_when_needed(
        tmp_path: Path, storescp_factory: Callable[..., StoreSCP]) -> None:
    make_instance(tmp_path / "in" / "plain.dcm", study_uid="1.2.3", series_uid="1.2.3.4")
    ds = dcmread(make_instance(tmp_path / "src.dcm", study_uid="1.2.3", series_uid="1.2.3.4"))
    ds.compress(RLELossless)
    ds.save_as(tmp_path / "in" / "rle.dcm", enforce_file_format=True)
    rle_uid = str(ds.SOPInstanceUID)
    takes_rle = storescp_factory("RLE", sop_classes=[CT],
                                 transfer_syntaxes=["RLELossless", "LocalEndianExplicit"],
                                 args=["+B"])
    implicit_only = storescp_factory("IMPLICIT", sop_classes=[CT],
                                     transfer_syntaxes=["LittleEndianImplicit"], args=["+B"])
    cfg = write_config(tmp_path, "", [])
    for scp, expect_rle in ((takes_rle, RLELossless), (implicit_only, ImplicitVRLittleEndian)):
        proc = run_dts("send", "--to", f"127.0.0.1:{scp.port}", "--ae-title", scp.aet,
                       str(tmp_path / "in"), config=cfg)
        assert proc.returncode == 0, proc.stderr
        syntaxes = {str(dcmread(f).SOPInstanceUID): str(dcmread(f).file_meta.TransferSyntaxUID)
                    for f in scp.files()}
        assert len(syntaxes) == 2
        assert syntaxes.get(rle_uid) == expect_rle, (rle_uid, syntaxes)
    # sent as encoded: the data set storescp wrote (+B: as received) is the file's, byte
    # for byte
    rle_file = next(f for f in takes_rle.files() if str(dcmread(f).SOPInstanceUID) == rle_uid)
    assert _data_set_bytes(rle_file) == _data_set_bytes(tmp_path / "in" / "rle.dcm")


def _data_set_bytes(path: Path) -> bytes:
    with open(path, "rb") as fh:
        meta = filemeta.read(fh)
        assert meta is not None
        fh.seek(meta.dataset_offset)
        return fh.read()


def test_proposes_each_syntax_plus_an_uncompressed_fallback() -> None:
    items = [dicom_store.Item(Path("a"), "1.1", CT, ExplicitVRLittleEndian),
             dicom_store.Item(Path("b"), "1.2", CT, RLELossless),
             dicom_store.Item(Path("c"), "1.3", SC, ImplicitVRLittleEndian)]
    proposed = [(str(cx.abstract_syntax), [str(t) for t in cx.transfer_syntax])
                for cx in dicom_store.propose(items)]
    assert proposed == [(CT, [ExplicitVRLittleEndian]), (CT, [RLELossless]),
                        (CT, [ImplicitVRLittleEndian]),
                        (SC, [ImplicitVRLittleEndian]), (SC, [ExplicitVRLittleEndian])]


def test_header_reading_agrees_with_pydicom() -> None:
    import pydicom.data
    from pydicom.filereader import read_file_meta_info

    checked = 0
    for path in sorted(Path(pydicom.data.__file__).parent.glob("test_files/*.dcm")):
        try:
            meta = read_file_meta_info(path)
        except Exception:  # noqa: BLE001 - pydicom's deliberately broken samples
            continue
        item = dicom_store.read_item(path)
        if not meta.get("MediaStorageSOPInstanceUID") or item is None or not item.has_meta:
            continue
        assert (item.sop_uid, item.sop_class, item.transfer_syntax) == (
            meta.MediaStorageSOPInstanceUID, meta.MediaStorageSOPClassUID,
            meta.TransferSyntaxUID), path
        checked += 1
    assert checked > 20


def test_command_set_matches_pynetdicom() -> None:
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    for uid in ("1.2.3.4", "1.2.3.45"):  # even and odd lengths (padding)
        req = C_STORE()
        req.MessageID, req.Priority = 513, 2
        req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = CT, uid
        req._dataset_path = (Path("x"), 0)
        msg = C_STORE_RQ()
        msg.primitive_to_message(req)
        assert dimse.c_store_command(513, CT, uid) == encode(msg.command_set, True, True)


# -- backoff and due time -------------------------------------------------------------------------

def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    st = StationConfig(send_backoff=10.0, send_backoff_max=60.0)
    for attempts, full in ((1, 10.0), (2, 20.0), (3, 40.0), (4, 60.0), (9, 60.0)):
        delays = [sender.backoff(st, attempts) for _ in range(50)]
        assert all(full / 2 <= d <= full for d in delays)
        assert len(set(delays)) > 1


def test_ready_follows_next_attempt_at(tmp_path: Path) -> None:
    job = Job(tmp_path / "J")
    job.path.mkdir()
    assert sender.ready(job)
    job.write({"next_attempt_at": isotime(utcnow() + timedelta(minutes=5))})
    assert not sender.ready(job)
    job.write({"next_attempt_at": isotime(utcnow() - timedelta(seconds=1))})
    assert sender.ready(job)


# -- dts send --to ----------------------------------------------------------------------------

def test_send_to_host_port_and_destination(tmp_path: Path, storescp: StoreSCP,
                                           orthanc: Orthanc) -> None:
    study = tmp_path / "study"
    uids = set()
    for i in range(5):
        uid = generate_uid()
        make_instance(study / f"s{i % 2}" / f"{uid}.dcm", study_uid="1.2.3", series_uid="1.2.3.4",
                      sop_uid=uid, instance_number=i + 1)
        uids.add(uid)
    (study / "README.txt").write_text("not DICOM")
    cfg = write_config(tmp_path, dicom_destination("pacs", orthanc), [])
    proc = run_dts("send", "--to", f"127.0.0.1:{storescp.port}", "--ae-title", storescp.aet,
                   "--json", str(study), config=cfg)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["sent"] == 5 and report["total"] == 5 and report["failed"] == {}
    assert report["skipped"] == [str(study / "README.txt")]
    assert storescp.sop_uids() == uids
    by_name = run_dts("send", "--to", "pacs", str(study), config=cfg)
    assert by_name.returncode == 0, by_name.stderr
    assert "5 of 5 sent to pacs" in by_name.stdout
    assert orthanc.sop_uids() == uids


def test_send_to_exit_codes(tmp_path: Path, storescp_factory: Callable[..., StoreSCP]) -> None:
    files = tmp_path / "files"
    make_instance(files / "ct.dcm", study_uid="1.2.3", series_uid="1.2.3.4")
    make_instance(files / "sc.dcm", study_uid="1.2.3", series_uid="1.2.3.5", sop_class=SC)
    cfg = write_config(tmp_path, "", [])
    down = run_dts("send", "--to", f"127.0.0.1:{free_port()}", str(files), config=cfg)
    assert down.returncode == 75
    assert "not reachable" in down.stderr
    ct_only = storescp_factory("CTONLY", sop_classes=[CT])
    refused = run_dts("send", "--to", f"127.0.0.1:{ct_only.port}", "--ae-title", "CTONLY",
                      str(files), config=cfg)
    assert refused.returncode == 1
    assert "Secondary Capture Image Storage" in refused.stderr
    assert len(ct_only.files()) == 1
    nothing = run_dts("send", "--to", "nowhere", str(files), config=cfg)
    assert nothing.returncode == 2
    assert "neither a destination" in nothing.stderr


def test_send_by_id_refuses_a_job_not_waiting(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    cfg = write_config(tmp_path, "", [])
    job_id, _, _ = queue_send_job(spool)
    station = Station.open(cfg)
    claim = station.spool.claim(job_id, Queue.SEND)
    assert claim is not None
    proc = run_dts("send", job_id, config=cfg)
    assert proc.returncode == 2
    claim.move(Queue.SEND, State.NEW)


# -- statuses, AE titles, serving ------------------------------------------------------------

@pytest.fixture
def status_scp() -> Iterator[Any]:
    """A pynetdicom storage SCP answering chosen statuses per SOP Instance UID: Orthanc and
    storescp cannot be made to answer a warning or a given failure code on demand."""
    from types import SimpleNamespace

    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

    peer = SimpleNamespace(port=free_port(), aet="STATUS", statuses={}, received=[])

    def handle(event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        peer.received.append(uid)
        return int(peer.statuses.get(uid, 0x0000))

    ae = AE("STATUS")
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    server = ae.start_server(("127.0.0.1", peer.port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, handle)])
    yield peer
    server.shutdown()


def test_warning_counts_as_delivered_and_failure_status_fails_the_instance(
        tmp_path: Path, status_scp: Any) -> None:
    spool = Spool(tmp_path / "spool")
    cfg = write_config(tmp_path, dicom_destination("odd", (status_scp.aet, status_scp.port)),
                       ["odd"])
    job_id, uids, _ = queue_send_job(spool, n=3)
    status_scp.statuses.update({uids[0]: 0xB000, uids[1]: 0xA900})
    proc = run_dts("send", "--once", config=cfg)
    assert proc.returncode == 1, proc.stderr
    assert where(spool, job_id) == "failed"
    assert status_scp.received == uids
    state = job_data(spool, job_id)["destinations"]["odd"]
    assert sorted(state["sent"]) == sorted([uids[0], uids[2]])
    assert state["failed"] == {uids[1]: "0xA900"}
    evs = events(spool, job_id)
    warning = [e for e in evs if e["event"] == "store-warning"]
    assert [(e["sop_uid"], e["dimse_status"], e["status"]) for e in warning] == [
        (uids[0], "0xB000", "warning")]
    failed = [e for e in evs if e["event"] == "store-failed"]
    assert [(e["sop_uid"], e["dimse_status"]) for e in failed] == [(uids[1], "0xA900")]
    assert "0xA900" in failed[0]["message"]


def test_calling_ae_title_of_the_destination(tmp_path: Path,
                                             orthanc_factory: Callable[..., Orthanc]) -> None:
    pacs = orthanc_factory("PACS", modalities={"seg": ("DTS-SEG", "127.0.0.1", 104)},
                           only_known_modalities=True)
    known = dicom_destination("pacs", pacs) + 'calling_ae = "DTS-SEG"\n'
    plain = dicom_destination("pacs-as-station", pacs)
    spool = Spool(tmp_path / "spool")
    cfg = write_config(tmp_path, known + plain, ["pacs"])
    job_id, uids, _ = queue_send_job(spool, n=2)
    assert run_dts("send", "--once", config=cfg).returncode == 0
    assert pacs.sop_uids() == set(uids)
    other = tmp_path / "other.dcm"
    make_instance(other, study_uid="1.2.3", series_uid="1.2.3.4")
    refused = run_dts("send", "--to", "pacs-as-station", str(other), config=cfg)
    # Orthanc accepts the association of an unknown AE title, then aborts on its C-STORE
    assert refused.returncode == 75, refused.stderr
    assert "pacs-as-station" in refused.stderr and "A-ABORT" in refused.stderr
    assert pacs.instance_count() == 2


def test_send_to_folder_destination(tmp_path: Path) -> None:
    out = tmp_path / "drop"
    cfg = write_config(tmp_path, f'[[destination]]\nname = "drop"\nfolder = "{out}"\n', [])
    src = make_instance(tmp_path / "in" / "a.dcm", study_uid="1.2.3", series_uid="1.2.3.4")
    proc = run_dts("send", "--to", "drop", "--json", str(src.parent), config=cfg)
    assert proc.returncode == 0, proc.stderr
    folder = Path(json.loads(proc.stdout)["folder"])
    assert folder.parent == out and [p.name for p in out.iterdir()] == [folder.name]
    assert (folder / "a.dcm").read_bytes() == src.read_bytes()


def test_serves_the_queue_until_stopped(tmp_path: Path, storescp: StoreSCP) -> None:
    import signal as signals

    spool = Spool(tmp_path / "spool")
    cfg = write_config(tmp_path, dicom_destination("archive", storescp), ["archive"])
    proc = start_dts("send", config=cfg, log=tmp_path / "serve.log")
    try:
        job_id, uids, _ = queue_send_job(spool, n=2)  # arrives while it is serving
        wait_for(lambda: spool.locate(job_id) and where(spool, job_id) == "done", 30,
                 what="the job to be sent")
        assert storescp.sop_uids() == set(uids)
        proc.send_signal(signals.SIGTERM)
        assert proc.wait(30) == 0, (tmp_path / "serve.log").read_text()
    finally:
        stop_process(proc)


@pytest.mark.parametrize("supported", [True, False])
def test_fast_path_and_pynetdicom_fallback_deliver_the_same(
        tmp_path: Path, storescp: StoreSCP, monkeypatch: pytest.MonkeyPatch,
        supported: bool) -> None:
    """With a supported pynetdicom the sender writes and reads PDUs itself; with a version
    outside the range it leaves the exchange to pynetdicom's send_c_store. Both must
    deliver."""
    from dts.dicom import patches

    calls = {"fast": 0}
    original = scu.Sender.store

    def counting(self: Any, *args: Any) -> Any:
        calls["fast"] += 1
        return original(self, *args)

    monkeypatch.setattr(scu.Sender, "store", counting)
    if not supported:
        monkeypatch.setattr(patches, "version_ok", lambda: False)
    folder = tmp_path / "in"
    uids = {str(dcmread(make_instance(folder / f"{i}.dcm", study_uid="1.2.3",
                                      series_uid="1.2.3.4", instance_number=i + 1,
                                      rows=64, cols=64)).SOPInstanceUID) for i in range(20)}
    items, _ = dicom_store.scan([folder])
    peer = dicom_store.Peer("archive", storescp.aet, "127.0.0.1", storescp.port, "DTS")
    result = dicom_store.store(peer, items, dicom_store.NetSettings(dimse_timeout=10))
    assert result.temporary is None and result.refused is None and not result.failed
    assert set(result.sent) == uids == storescp.sop_uids()
    assert calls["fast"] == (20 if supported else 0)


# -- TLS ---------------------------------------------------------------------------------------

def _certificate(folder: Path, name: str, cn: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate valid for 127.0.0.1 (its own CA): (key, certificate)."""
    import subprocess

    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", f"/CN={cn}", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return key, cert


def _tls_table(ca: Path, cert: Path | None = None, key: Path | None = None) -> str:
    mine = f', certificate = "{cert}", private_key = "{key}"' if cert and key else ""
    return f'tls = {{ ca_certificates = "{ca}"{mine} }}\n'


def test_tls_destination_with_client_certificate(
        tmp_path: Path, storescp_factory: Callable[..., StoreSCP]) -> None:
    server_key, server_cert = _certificate(tmp_path, "server")
    client_key, client_cert = _certificate(tmp_path, "client", cn="dts")
    # storescp over TLS, requiring a client certificate it trusts (-rc, +cf)
    scp = storescp_factory("TLSPACS", args=["+tls", str(server_key), str(server_cert),
                                            "+cf", str(client_cert), "-rc"])
    spool = Spool(tmp_path / "spool")
    cfg = write_config(tmp_path, dicom_destination("pacs", scp)
                       + _tls_table(server_cert, client_cert, client_key), ["pacs"])
    echo = run_dts("echo", "pacs", config=cfg)
    assert echo.returncode == 0, echo.stderr
    job_id, uids, _ = queue_send_job(spool, n=3)
    proc = run_dts("send", "--once", config=cfg)
    assert proc.returncode == 0, proc.stderr
    assert where(spool, job_id) == "done"
    assert scp.sop_uids() == set(uids)

    # a station that does not trust the peer's certificate says so and keeps the job (75)
    _other_key, other_cert = _certificate(tmp_path, "other")
    cfg = write_config(tmp_path, dicom_destination("pacs", scp)
                       + _tls_table(other_cert, client_cert, client_key), ["pacs"])
    job_id, uids, _ = queue_send_job(spool, n=1)
    proc = run_dts("send", "--once", config=cfg)
    assert proc.returncode == 75, proc.stderr
    assert where(spool, job_id) == "send/new"
    error = json.dumps(job_data(spool, job_id)["destinations"]["pacs"])
    assert "certificate is not trusted" in error, error
    echo = run_dts("echo", "pacs", config=cfg)
    assert echo.returncode == 75 and "certificate is not trusted" in echo.stderr, echo.stderr

    # without a client certificate the peer refuses the handshake: said so too
    cfg = write_config(tmp_path, dicom_destination("pacs", scp) + _tls_table(server_cert),
                       ["pacs"])
    echo = run_dts("echo", "pacs", config=cfg)
    assert echo.returncode == 75 and "TLS" in echo.stderr, echo.stderr
    assert scp.proc.poll() is None


@pytest.mark.parametrize("table, key, reason", [
    ('tls = { certificate = "{cert}" }', "destination.pacs.tls", "go together"),
    ('tls = { ca_certificates = "/nonexistent/ca.pem" }', "destination.pacs.tls.ca_certificates",
     "cannot read"),
    ('tls = { ca_certificates = "{key}" }', "destination.pacs.tls", "unusable"),
    ('tls = { verify = false }', "destination.pacs.tls.verify", ""),
])
def test_tls_destination_configuration_errors(tmp_path: Path, table: str, key: str,
                                              reason: str) -> None:
    server_key, server_cert = _certificate(tmp_path, "server")
    table = table.replace("{cert}", str(server_cert)).replace("{key}", str(server_key))
    cfg = write_config(tmp_path, dicom_destination("pacs", ("PACS", 104)) + table + "\n",
                       ["pacs"])
    proc = run_dts("status", config=cfg)
    assert proc.returncode == 2
    assert key in proc.stderr and reason in proc.stderr, proc.stderr
