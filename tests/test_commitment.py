"""Proof of delivery: storage commitment (``commitment = true``) and the delivery check by
query (``verify = "find"``) against real peers: Orthanc as the archive (its storage
commitment SCP answers over a new association to dts's receiver, so dts is one of its
``DicomModalities``), dcmtk storescp as a peer without storage commitment, and
pynetdicom as a peer that sends reports dts never asked for."""

from __future__ import annotations

import json
import signal
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role

from dts import commitment
from dts.spool import Job, Spool
from tests.helpers import (
    free_port,
    run_dts,
    start_dts,
    station_config,
    stop_process,
    wait_for,
    wait_port,
)
from tests.plugins.peers import Orthanc, StoreSCP
from tests.test_send import events, job_data, queue_send_job, where

CT = "1.2.840.10008.5.1.4.1.1.2"


def config(tmp_path: Path, port: int, peer: Orthanc | StoreSCP | tuple[str, int], *,
           retries: int = 3, **dest: Any) -> Path:
    """A station on ``port`` whose stream "seg" sends to "pacs", the ``peer``."""
    aet, peer_port = peer if isinstance(peer, tuple) else (peer.aet, peer.port)
    return station_config(
        tmp_path, station={"ae_title": "DTS", "host": "127.0.0.1", "port": port,
                           "send_retries": retries, "send_backoff": "60s",
                           "dimse_timeout": 10, "network_timeout": 10, "stable_seconds": 1},
        destinations=[{"name": "pacs", "ae_title": aet, "host": "127.0.0.1",
                       "port": peer_port, **dest}],
        streams=[{"name": "seg", "command": ["true"], "destinations": ["pacs"]}])


def receiver(cfg: Path, tmp_path: Path, port: int,
             started: list[Any]) -> Any:
    proc = start_dts("receive", config=cfg, log=tmp_path / f"receive-{len(started)}.log")
    started.append(proc)
    wait_port(port)
    return proc


@pytest.fixture
def procs() -> Any:
    started: list[Any] = []
    yield started
    for p in started:
        stop_process(p)


def commit_state(spool: Spool, job_id: str) -> dict[str, Any]:
    return job_data(spool, job_id)["destinations"]["pacs"]


def kinds(spool: Spool, job_id: str) -> list[str]:
    return [e["event"] for e in events(spool, job_id)]


def orthanc_delete(orthanc: Orthanc, sop_uid: str) -> None:
    (oid,) = orthanc.post("/tools/find", {"Level": "Instance",
                                          "Query": {"SOPInstanceUID": sop_uid}})
    req = urllib.request.Request(f"{orthanc.url}/instances/{oid}", method="DELETE")
    with urllib.request.urlopen(req, timeout=10):
        pass


# -- storage commitment ------------------------------------------------------------------------

def test_committed_by_orthanc_over_a_new_association(
        tmp_path: Path, orthanc_factory: Callable[..., Orthanc], procs: list[Any]) -> None:
    port = free_port()
    orthanc = orthanc_factory(modalities={"DTS": ("DTS", "127.0.0.1", port)})
    cfg = config(tmp_path, port, orthanc, commitment=True)
    receiver(cfg, tmp_path, port, procs)
    spool = Spool(tmp_path / "spool")
    job_id, uids, _ = queue_send_job(spool, n=3)
    proc = run_dts("send", "--once", config=cfg)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [job_id, "done"]
    assert where(spool, job_id) == "done"
    state = commit_state(spool, job_id)
    assert state["status"] == "done"
    ((txn, rec),) = state["commitment"].items()
    assert rec["instances"] == {u: "committed" for u in uids}
    assert rec["sent_at"] and rec["answered_at"]
    seen = kinds(spool, job_id)
    assert seen.index("stored") < seen.index("commit-requested") < seen.index("committed") \
        < seen.index("sent")
    # the receiver journalled the report; the transaction's files are gone with the job
    log = run_dts("log", "--json", "--event", "commit-report", config=cfg)
    assert txn in log.stdout
    assert list((spool.root / "commitment").iterdir()) == []
    show = run_dts("show", job_id, config=cfg)
    assert "pacs: done, 3 sent; commitment: 3 committed" in show.stdout


def test_deleted_instance_is_reported_failed_sent_again_and_committed(
        tmp_path: Path, orthanc_factory: Callable[..., Orthanc], procs: list[Any]) -> None:
    """commitment_delay is the state boundary between storing and the N-ACTION: the
    instance disappears from Orthanc in between."""
    port = free_port()
    orthanc = orthanc_factory(modalities={"DTS": ("DTS", "127.0.0.1", port)})
    cfg = config(tmp_path, port, orthanc, commitment=True, commitment_delay="1h")
    receiver(cfg, tmp_path, port, procs)
    spool = Spool(tmp_path / "spool")
    job_id, uids, _ = queue_send_job(spool, n=3)
    first = run_dts("send", "--once", config=cfg)
    assert first.returncode == 0, first.stderr
    assert where(spool, job_id) == "send/new"
    state = commit_state(spool, job_id)
    assert state["status"] == "waiting" and not state["commitment"]
    assert sorted(state["sent"]) == sorted(uids) and state["commit_after"]
    assert orthanc.sop_uids() == set(uids)
    # not due: a --once run leaves it alone, and counts no try
    assert run_dts("send", "--once", config=cfg).returncode == 0
    assert job_data(spool, job_id)["attempts"] == 1

    orthanc_delete(orthanc, uids[1])
    second = run_dts("send", job_id, config=cfg)  # the N-ACTION now, whatever the delay
    assert second.returncode == 75, second.stderr  # a try that did not end committed
    assert second.stdout.split() == [job_id, "retry"]
    state = commit_state(spool, job_id)
    assert state["status"] == "retry"
    assert "1 instance(s) not committed by pacs: 0x0112 no such object instance" \
        in state["error"]
    ((txn, rec),) = state["commitment"].items()
    assert rec["instances"][uids[1]] == "failed: 0x0112 no such object instance"
    assert rec["instances"][uids[0]] == rec["instances"][uids[2]] == "committed"
    assert uids[1] not in state["sent"]
    assert "commit-failed" in kinds(spool, job_id)

    third = run_dts("send", job_id, config=cfg)  # stored again; commitment_delay again
    assert third.returncode == 0, third.stderr
    assert orthanc.sop_uids() == set(uids)
    assert commit_state(spool, job_id)["status"] == "waiting"
    fourth = run_dts("send", job_id, config=cfg)
    assert fourth.returncode == 0, fourth.stderr
    assert fourth.stdout.split() == [job_id, "done"]
    state = commit_state(spool, job_id)
    assert len(state["commitment"]) == 2
    second_txn = next(t for t in state["commitment"] if t != txn)
    assert state["commitment"][second_txn]["instances"] == {uids[1]: "committed"}
    assert job_data(spool, job_id)["attempts"] == 4


def test_timeout_without_an_answer_is_a_temporary_failure(
        tmp_path: Path, orthanc_factory: Callable[..., Orthanc]) -> None:
    """Orthanc accepts the N-ACTION, but dts's receiver is not running: the answer
    never comes."""
    port = free_port()
    orthanc = orthanc_factory(modalities={"DTS": ("DTS", "127.0.0.1", port)})
    cfg = config(tmp_path, port, orthanc, retries=1, commitment=True,
                 commitment_timeout="1s")
    spool = Spool(tmp_path / "spool")
    job_id, _uids, _ = queue_send_job(spool, n=2)
    proc = run_dts("send", "--once", config=cfg)
    assert proc.returncode == 75, proc.stderr
    state = commit_state(spool, job_id)
    assert state["status"] == "retry"
    assert "no storage commitment answer within 1s (commitment_timeout)" in state["error"]
    assert where(spool, job_id) == "send/new"
    assert job_data(spool, job_id)["next_attempt_at"]
    # the next try asks again (no new store: the objects are there); the budget ends it
    proc = run_dts("send", job_id, config=cfg)
    assert proc.returncode == 1, proc.stderr
    assert where(spool, job_id) == "failed"
    data = job_data(spool, job_id)
    assert "gave up after 2 tries" in data["error"]
    assert len(data["destinations"]["pacs"]["commitment"]) == 2
    assert kinds(spool, job_id).count("stored") == 1
    assert list((spool.root / "commitment").iterdir()) == []


def test_peer_without_storage_commitment_is_refused_naming_the_key(
        tmp_path: Path, storescp: StoreSCP) -> None:
    cfg = config(tmp_path, free_port(), storescp, commitment=True)
    spool = Spool(tmp_path / "spool")
    job_id, uids, _ = queue_send_job(spool, n=2)
    proc = run_dts("send", "--once", config=cfg)
    assert proc.returncode == 1, proc.stderr
    assert where(spool, job_id) == "failed"
    data = job_data(spool, job_id)
    assert "destination.pacs.commitment" in data["error"]
    assert "Storage Commitment Push Model" in data["error"]
    state = data["destinations"]["pacs"]
    assert sorted(state["sent"]) == sorted(uids)  # stored, but not proven: not done
    assert state["status"] == "failed" and not state.get("commitment")
    assert storescp.sop_uids() == set(uids)


@pytest.mark.slow
def test_kill_between_n_action_and_report_then_the_answer_still_matches(
        tmp_path: Path, orthanc_factory: Callable[..., Orthanc], procs: list[Any]) -> None:
    """dts send is killed while it waits for the answer; the receiver is down, so
    Orthanc's report job fails; it is resubmitted once the receiver is back, and the
    next dts send (after a restart) matches it by the Transaction UID in job.json."""
    port = free_port()
    orthanc = orthanc_factory(modalities={"DTS": ("DTS", "127.0.0.1", port)})
    cfg = config(tmp_path, port, orthanc, commitment=True)
    spool = Spool(tmp_path / "spool")
    job_id, uids, _ = queue_send_job(spool, n=2)
    sender = start_dts("send", "--once", config=cfg, log=tmp_path / "send.log")
    procs.append(sender)

    # the N-ACTION was answered (its transaction is in job.json since before it went out)
    wait_for(lambda: "commit-requested" in kinds(spool, job_id), 30,
             what="the N-ACTION's response")
    sender.send_signal(signal.SIGKILL)
    sender.wait(10)
    assert where(spool, job_id) == "send/cur"
    (txn,) = commit_state(spool, job_id)["commitment"]

    def failed_job() -> str | None:
        for jid in orthanc.get("/jobs"):
            info = orthanc.get(f"/jobs/{jid}")
            if info["Type"] == "StorageCommitmentScp" and info["State"] == "Failure":
                return str(jid)
        return None
    orthanc_job = wait_for(failed_job, 30, what="Orthanc's failed report job")
    receiver(cfg, tmp_path, port, procs)
    orthanc.post(f"/jobs/{orthanc_job}/resubmit", {})
    wait_for(lambda: (spool.root / "commitment" / f"{txn}.json").exists(), 30,
             what="the answer kept by the receiver")
    proc = run_dts("send", "--once", config=cfg)
    assert proc.returncode == 0, proc.stderr
    assert where(spool, job_id) == "done"
    state = commit_state(spool, job_id)
    assert state["commitment"][txn]["instances"] == {u: "committed" for u in uids}
    assert "recovered" in kinds(spool, job_id)


def _report(port: int, event_type: int, info: Dataset) -> int:
    """Send an N-EVENT-REPORT to dts's receiver as a storage commitment SCP does."""
    ae = AE(ae_title="FOREIGN")
    ae.add_requested_context(commitment.SOP_CLASS)
    role = build_role(commitment.SOP_CLASS, scp_role=True)
    assoc = ae.associate("127.0.0.1", port, ae_title="DTS", ext_neg=[role])
    assert assoc.is_established
    try:
        status, _ = assoc.send_n_event_report(info, event_type, commitment.SOP_CLASS,
                                              commitment.SOP_INSTANCE)
        return int(status.Status)
    finally:
        assoc.release()


def _refs(pairs: list[tuple[str, str]], reason: int | None = None) -> list[Dataset]:
    out = []
    for cls, uid in pairs:
        item = Dataset()
        item.ReferencedSOPClassUID = cls
        item.ReferencedSOPInstanceUID = uid
        if reason is not None:
            item.FailureReason = reason
        out.append(item)
    return out


def test_reports_for_unknown_transactions_or_foreign_instances_are_refused(
        tmp_path: Path, storescp: StoreSCP, procs: list[Any]) -> None:
    port = free_port()
    cfg = config(tmp_path, port, storescp, commitment=True)
    receiver(cfg, tmp_path, port, procs)
    spool = Spool(tmp_path / "spool")
    txn, mine = str(generate_uid()), str(generate_uid())
    commitment.register(spool, txn, "20261126T105700.123456Z-abcdef.seg", "pacs", {mine: CT})

    unknown = Dataset()
    unknown.TransactionUID = str(generate_uid())
    unknown.ReferencedSOPSequence = _refs([(CT, mine)])
    assert _report(port, 1, unknown) == commitment.INVALID_ARGUMENT_VALUE

    foreign = Dataset()
    foreign.TransactionUID = txn
    foreign.ReferencedSOPSequence = _refs([(CT, mine), (CT, str(generate_uid()))])
    assert _report(port, 1, foreign) == commitment.INVALID_ARGUMENT_VALUE

    other_class = Dataset()
    other_class.TransactionUID = txn
    other_class.ReferencedSOPSequence = _refs([("1.2.840.10008.5.1.4.1.1.7", mine)])
    assert _report(port, 1, other_class) == commitment.CLASS_INSTANCE_CONFLICT

    bad_uid = Dataset()
    bad_uid.TransactionUID = "../../etc"
    assert _report(port, 1, bad_uid) == commitment.INVALID_ARGUMENT_VALUE
    assert _report(port, 7, foreign) == commitment.NO_SUCH_EVENT_TYPE
    # nothing was kept as an answer
    assert sorted(p.name for p in (spool.root / "commitment").iterdir()) == [f"{txn}.pending"]
    log = run_dts("log", "--json", "--event", "commit-report-refused", config=cfg)
    refused = [json.loads(line) for line in log.stdout.splitlines()]
    assert len(refused) == 5
    assert all(r["calling_ae"] == "FOREIGN" and r["status"] == "warning" for r in refused)
    assert "was not started by this station" in refused[0]["message"]

    # dts is no storage commitment SCP itself
    ae = AE(ae_title="FOREIGN")
    ae.add_requested_context(commitment.SOP_CLASS)
    assoc = ae.associate("127.0.0.1", port, ae_title="DTS")
    assert assoc.is_established
    try:
        status, _ = assoc.send_n_action(foreign, 1, commitment.SOP_CLASS,
                                        commitment.SOP_INSTANCE)
        assert int(status.Status) == commitment.NO_SUCH_ACTION
    finally:
        assoc.release()

    # the real one is kept
    ok = Dataset()
    ok.TransactionUID = txn
    ok.FailedSOPSequence = _refs([(CT, mine)], reason=0x0110)
    assert _report(port, 2, ok) == 0
    answer = json.loads((spool.root / "commitment" / f"{txn}.json").read_text())
    assert answer["failed"] == {mine: "0x0110 processing failure"}


# -- the delivery check by query ----------------------------------------------------------------

def test_verify_by_find_sends_a_missing_instance_again(
        tmp_path: Path, orthanc_factory: Callable[..., Orthanc]) -> None:
    """An earlier try stored everything (its check did not happen); the archive lost one
    instance since. Orthanc answers C-FIND only for modalities it knows
    (DicomAlwaysAllowFind is false by default): dts is one of its DicomModalities."""
    port = free_port()
    orthanc = orthanc_factory(modalities={"DTS": ("DTS", "127.0.0.1", port)})
    cfg = config(tmp_path, port, orthanc, verify="find")
    spool = Spool(tmp_path / "spool")
    job_id, uids, _ = queue_send_job(spool, n=3)
    stored = run_dts("send", "--to", "pacs", str(spool.find(job_id)[1] / "output"),
                     config=cfg)
    assert stored.returncode == 0, stored.stderr
    _loc, path = spool.find(job_id)
    rec = Job(path).read()
    rec["destinations"] = {"pacs": {"status": "retry", "sent": list(uids), "failed": {}}}
    Job(path).write(rec)
    orthanc_delete(orthanc, uids[1])

    first = run_dts("send", "--once", config=cfg)
    assert first.returncode == 75, first.stderr
    state = commit_state(spool, job_id)
    assert state["status"] == "retry" and "verified_at" not in state
    assert "1 of 3 instance(s) not found on pacs by C-FIND" in state["error"]
    assert sorted(state["sent"]) == sorted([uids[0], uids[2]])
    missing = [e for e in events(spool, job_id) if e["event"] == "verify-missing"]
    assert missing and missing[0]["missing"] == [uids[1]]

    second = run_dts("send", job_id, config=cfg)
    assert second.returncode == 0, second.stderr
    assert where(spool, job_id) == "done"
    assert orthanc.sop_uids() == set(uids)
    state = commit_state(spool, job_id)
    assert state["verified_at"] and sorted(state["sent"]) == sorted(uids)
    assert kinds(spool, job_id).count("verified") == 1


def test_verify_against_a_peer_without_queries_names_the_key(
        tmp_path: Path, storescp: StoreSCP) -> None:
    cfg = config(tmp_path, free_port(), storescp, verify="find")
    spool = Spool(tmp_path / "spool")
    job_id, uids, _ = queue_send_job(spool, n=1)
    proc = run_dts("send", "--once", config=cfg)
    assert proc.returncode == 1, proc.stderr
    data = job_data(spool, job_id)
    assert "destination.pacs.verify" in data["error"] and "C-FIND" in data["error"]
    assert data["destinations"]["pacs"]["sent"] == uids


def test_configuration_keys_are_checked(tmp_path: Path) -> None:
    def check(**dest: Any) -> str:
        cfg = station_config(tmp_path, destinations=[{"name": "pacs", **dest}])
        proc = run_dts("config", "check", config=cfg)
        assert proc.returncode == 2, proc.stdout
        return proc.stderr
    net = {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}
    assert "destination.pacs.verify" in check(**net, verify="echo")
    assert "destination.pacs.commitment" in check(**net, commitment="yes")
    assert "destination.pacs.commitment_timeout" in check(**net, commitment=True,
                                                           commitment_timeout="soon")
    assert "destination.pacs.commitment_timeout: goes with commitment = true" in check(
        **net, commitment_timeout="5m")
    assert "destination.pacs.commitment" in check(folder=str(tmp_path / "out"),
                                                  commitment=True)


def test_answer_on_the_same_association(tmp_path: Path) -> None:
    """A commitment SCP that answers on the requesting association (Orthanc always opens
    a new one; no installed archive answers this way, so pynetdicom plays it): no
    receiver runs, the answer still reaches the job."""
    import threading

    from pynetdicom import AllStoragePresentationContexts, evt

    reports: list[int] = []

    def on_action(event: Any) -> tuple[int, None]:
        info = event.action_information
        report = Dataset()
        report.TransactionUID = info.TransactionUID
        report.ReferencedSOPSequence = list(info.ReferencedSOPSequence)

        def answer() -> None:
            status, _ = event.assoc.send_n_event_report(report, 1, commitment.SOP_CLASS,
                                                        commitment.SOP_INSTANCE)
            reports.append(int(status.Status))
        threading.Thread(target=answer, daemon=True).start()
        return 0x0000, None

    ae = AE(ae_title="SAMEASSOC")
    ae.supported_contexts = AllStoragePresentationContexts[:60]
    ae.add_supported_context(commitment.SOP_CLASS)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[
        (evt.EVT_N_ACTION, on_action), (evt.EVT_C_STORE, lambda event: 0x0000)])
    assert server is not None
    try:
        cfg = config(tmp_path, free_port(), ("SAMEASSOC", int(server.server_address[1])),
                     commitment=True)
        spool = Spool(tmp_path / "spool")
        job_id, uids, _ = queue_send_job(spool, n=2)
        proc = run_dts("send", "--once", config=cfg)
        assert proc.returncode == 0, proc.stderr
        assert where(spool, job_id) == "done"
        assert reports == [0x0000]
        ((_txn, rec),) = commit_state(spool, job_id)["commitment"].items()
        assert rec["instances"] == {u: "committed" for u in uids}
        report = [e for e in events(spool, job_id) if e["event"] == "committed"]
        assert report
    finally:
        server.shutdown()


@pytest.mark.slow
def test_dts_watch_receives_the_answer_and_finishes_the_job(
        tmp_path: Path, orthanc_factory: Callable[..., Orthanc], procs: list[Any]) -> None:
    port = free_port()
    orthanc = orthanc_factory(modalities={"DTS": ("DTS", "127.0.0.1", port)})
    cfg = config(tmp_path, port, orthanc, commitment=True)
    watch = start_dts("watch", config=cfg, log=tmp_path / "watch.log")
    procs.append(watch)
    wait_port(port)
    spool = Spool(tmp_path / "spool")
    job_id, _uids, _ = queue_send_job(spool, n=2)
    wait_for(lambda: where(spool, job_id) == "done", 60, what="the job in done/")
    rec = commit_state(spool, job_id)
    assert rec["status"] == "done"
    assert [s for t in rec["commitment"].values() for s in t["instances"].values()] \
        == ["committed", "committed"]


def test_config_show_of_commitment_keys_loads_again(tmp_path: Path) -> None:
    cfg = station_config(tmp_path, destinations=[
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104,
         "commitment": True, "commitment_timeout": "2m", "verify": "find"},
        {"name": "plain", "ae_title": "PLAIN", "host": "127.0.0.1", "port": 105}])
    shown = run_dts("config", "show", config=cfg)
    assert shown.returncode == 0, shown.stderr
    assert "commitment_timeout = 120.0" in shown.stdout and 'verify = "find"' in shown.stdout
    again = tmp_path / "again.toml"
    again.write_text(shown.stdout)
    assert run_dts("config", "check", str(again)).returncode == 0


def test_verify_falls_back_to_series_counts(tmp_path: Path) -> None:
    """A peer that answers C-FIND only at SERIES level, and loses the first object it is
    sent (no installed archive refuses IMAGE-level queries, so pynetdicom plays it)."""
    from pynetdicom import AllStoragePresentationContexts, evt

    kept: dict[str, set[str]] = {}
    lost: list[str] = []
    levels: list[str] = []

    def on_store(event: Any) -> int:
        ds = event.dataset
        if not lost:
            lost.append(str(ds.SOPInstanceUID))
        else:
            kept.setdefault(str(ds.SeriesInstanceUID), set()).add(str(ds.SOPInstanceUID))
        return 0x0000

    def on_find(event: Any) -> Any:
        q = event.identifier
        levels.append(str(q.QueryRetrieveLevel))
        if q.QueryRetrieveLevel != "SERIES":
            yield 0xC000, None  # unable to process
            return
        n = len(kept.get(str(q.SeriesInstanceUID), ()))
        if n:
            found = Dataset()
            found.QueryRetrieveLevel = "SERIES"
            found.StudyInstanceUID = q.StudyInstanceUID
            found.SeriesInstanceUID = q.SeriesInstanceUID
            found.NumberOfSeriesRelatedInstances = n
            yield 0xFF00, found

    ae = AE(ae_title="SERIESONLY")
    ae.supported_contexts = AllStoragePresentationContexts[:60]
    ae.add_supported_context("1.2.840.10008.5.1.4.1.2.2.1")
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[
        (evt.EVT_C_STORE, on_store), (evt.EVT_C_FIND, on_find)])
    assert server is not None
    try:
        cfg = config(tmp_path, free_port(), ("SERIESONLY", int(server.server_address[1])),
                     verify="find")
        spool = Spool(tmp_path / "spool")
        job_id, uids, _ = queue_send_job(spool, n=3)
        first = run_dts("send", "--once", config=cfg)
        assert first.returncode == 75, first.stderr
        state = commit_state(spool, job_id)
        assert "3 of 3 instance(s) not found on pacs by C-FIND after storing (1 series by " \
            "instance count)" in state["error"]
        assert state["sent"] == []
        assert levels == ["IMAGE", "SERIES"]
        second = run_dts("send", job_id, config=cfg)
        assert second.returncode == 0, second.stderr
        assert where(spool, job_id) == "done"
        assert set().union(*kept.values()) == set(uids)
    finally:
        server.shutdown()
