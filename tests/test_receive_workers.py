"""The receiver on several cores: ``[station] receive_workers`` processes on one port.

Associations are opened by pynetdicom from the test and held, so that the test decides
when each one sends and ends; which worker serves an association is read off the
shared lock it holds on the study's gate (``tmp/.run/carry/<Study>``, dts.carriers, as
/proc/locks lists it). Everything is judged by what the spool and the journal show.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from dts.spool import Job, Queue, Spool, State
from tests.helpers import (
    free_port,
    make_instance,
    run_dts,
    start_dts,
    station_config,
    stop_process,
    wait_for,
    wait_port,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
pytestmark = pytest.mark.peers


@dataclass
class Station:
    proc: subprocess.Popen[bytes]
    port: int
    spool: Spool
    log: Path
    folder: Path

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for path in sorted((self.spool.root / "log").glob("*.jsonl")):
            for line in path.read_text().splitlines():
                event = json.loads(line)
                if event.get("event") == name:
                    out.append(event)
        return out

    def status(self) -> dict[str, Any]:
        from dts.status import receiver_state

        return receiver_state(self.spool)

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.status().get("workers", []) if w["listening"]]

    def jobs(self) -> list[str]:
        return self.spool.list(Queue.CLASSIFY, State.NEW)

    def job(self, job_id: str) -> Job:
        return Job(self.spool.dir(Queue.CLASSIFY, State.NEW) / job_id)

    def carriers(self, study_uid: str) -> list[int]:
        """The pids holding the study's gate shared, one entry per association (the
        kernel's own list: /proc/locks, what ``lslocks`` shows)."""
        gate = self.spool.run_dir / "carry" / study_uid
        try:
            ino = gate.stat().st_ino
        except FileNotFoundError:
            return []
        pids = []
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            # 1: FLOCK  ADVISORY  READ  <pid> <major>:<minor>:<inode> 0 EOF
            if len(fields) >= 6 and fields[1] == "FLOCK" and fields[3] == "READ" \
                    and fields[5].rsplit(":", 1)[-1] == str(ino):
                pids.append(int(fields[4]))
        return sorted(pids)


@pytest.fixture
def station(tmp_path: Path) -> Iterator[Callable[..., Station]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(**keys: Any) -> Station:
        port = free_port()
        settings = {"ae_title": "DTS", "host": "127.0.0.1", "port": port,
                    "stable_seconds": 1, "receive_workers": 2, **keys}
        config = station_config(tmp_path, station=settings)
        log = tmp_path / f"receive-{len(procs)}.log"
        proc = start_dts("receive", config=config, log=log)
        procs.append(proc)
        wait_port(port, 60)
        st = Station(proc, port, Spool(tmp_path / "spool"), log, tmp_path)
        wait_for(lambda: len(st.worker_pids()) == settings["receive_workers"], 60,
                 what="every worker listening")
        return st

    yield start
    for proc in procs:
        stop_process(proc)


@dataclass
class Sender:
    """One held association sending instances of one study."""

    assoc: Any
    study_uid: str
    folder: Path
    pid: int | None = None
    sent: list[str] = field(default_factory=list)

    def send(self, n: int = 1) -> None:
        series = generate_uid()
        for i in range(n):
            path = make_instance(self.folder / f"{generate_uid()}.dcm", study_uid=self.study_uid,
                                 series_uid=series, instance_number=i + 1)
            ds = pydicom.dcmread(path)
            status = self.assoc.send_c_store(ds)
            assert status and status.Status == 0x0000, status
            self.sent.append(str(ds.SOPInstanceUID))

    def release(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()


def _associate(port: int, calling: str = "MODALITY") -> Any:
    ae = AE(ae_title=calling)
    ae.add_requested_context(CT, ExplicitVRLittleEndian)
    return ae.associate("127.0.0.1", port, ae_title="DTS")


def senders_on_both_workers(st: Station, study_uid: str, folder: Path,
                            at_least: int = 2) -> list[Sender]:
    """Open associations (each sends one instance) until both workers serve some and
    there are ``at_least``; the kernel picks the worker of each connection."""
    senders: list[Sender] = []
    for _ in range(24):
        assoc = _associate(st.port)
        assert assoc.is_established
        before = Counter(st.carriers(study_uid))
        s = Sender(assoc, study_uid, folder)
        s.send(1)
        (s.pid,) = list((Counter(st.carriers(study_uid)) - before).elements())
        senders.append(s)
        if len({x.pid for x in senders}) == 2 and len(senders) >= at_least:
            return senders
    raise AssertionError("24 connections, all served by one worker")


def test_a_study_over_associations_of_two_workers_is_published_once(
        station: Callable[..., Station], tmp_path: Path) -> None:
    st = station()
    study = generate_uid()
    senders = senders_on_both_workers(st, study, tmp_path / "data")
    for s in senders:
        s.send(3)
    time.sleep(2.5)  # > stable_seconds: still carried, so not published
    assert st.jobs() == []
    for s in senders[:-1]:
        s.release()
    time.sleep(2.5)  # the last association is still open
    assert st.jobs() == []
    senders[-1].release()
    (job_id,) = wait_for(st.jobs, 20, what="the study published")
    job = st.job(job_id)
    data = job.read()
    expected = {sop for s in senders for sop in s.sent}
    assert data["instances"] == len(expected)
    stored = {p.stem for p in job.input_dir.rglob("*.dcm")}
    assert stored == expected
    time.sleep(2.0)  # nobody else publishes it a second time
    assert st.jobs() == [job_id] and len(st.events("received")) == 1
    assert not list(st.spool.incoming.iterdir())


def test_connections_go_to_the_worker_with_the_fewest(
        station: Callable[..., Station], tmp_path: Path) -> None:
    """Four associations at once are two on each worker (the kernel's hash of
    SO_REUSEPORT listeners put three or four on one worker now and then), and a worker
    whose associations ended gets the next ones."""
    st = station()
    study = generate_uid()
    senders = []
    for _ in range(4):
        assoc = _associate(st.port)
        assert assoc.is_established
        before = Counter(st.carriers(study))
        s = Sender(assoc, study, tmp_path / "data")
        s.send(1)
        (s.pid,) = list((Counter(st.carriers(study)) - before).elements())
        senders.append(s)
    served = Counter(s.pid for s in senders)
    assert sorted(served.values()) == [2, 2], served
    first = senders[0].pid
    for s in senders:
        if s.pid == first:
            s.release()
    time.sleep(0.5)  # the worker's word that its connections ended reaches the supervisor
    later = []
    for _ in range(2):
        assoc = _associate(st.port)
        s = Sender(assoc, study, tmp_path / "data")
        s.send(1)
        (s.pid,) = list((Counter(st.carriers(study)) - Counter(
            x.pid for x in senders + later if x.assoc.is_established)).elements())
        later.append(s)
    assert [s.pid for s in later] == [first, first]
    for s in senders + later:
        s.release()


def test_a_killed_worker_loses_no_acknowledged_instance_and_is_restarted(
        station: Callable[..., Station], tmp_path: Path) -> None:
    st = station()
    study = generate_uid()
    senders = senders_on_both_workers(st, study, tmp_path / "data", at_least=4)
    for s in senders:
        s.send(2)
    victim = senders[0].pid
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    survivors = [s for s in senders if s.pid != victim]
    for s in survivors:
        s.send(2)  # the surviving associations go on
    (exited,) = wait_for(lambda: st.events("receive-worker-exited"), 20,
                         what="the worker's death in the journal")
    assert exited["pid"] == victim and exited["exit_code"] == -signal.SIGKILL
    wait_for(lambda: len(st.worker_pids()) == 2 and victim not in st.worker_pids(), 60,
             what="the worker restarted")
    time.sleep(2.5)  # the survivors still carry the study: not published yet
    assert st.jobs() == []
    for s in survivors:
        s.release()
    (job_id,) = wait_for(st.jobs, 20, what="the study published")
    job = st.job(job_id)
    acknowledged = {sop for s in senders for sop in s.sent}
    assert {p.stem for p in job.input_dir.rglob("*.dcm")} == acknowledged
    assert job.read()["instances"] == len(acknowledged)
    time.sleep(2.0)
    assert st.jobs() == [job_id] and len(st.events("received")) == 1


def test_max_associations_counts_the_associations_of_every_worker(
        station: Callable[..., Station]) -> None:
    st = station(max_associations=2)
    held = [_associate(st.port), _associate(st.port)]
    assert all(a.is_established for a in held)
    refused = [_associate(st.port) for _ in range(8)]
    assert not any(a.is_established for a in refused)
    events = wait_for(lambda: [e for e in st.events("association-refused")
                               if "max_associations" in e["reason"]]
                      if len(st.events("association-refused")) >= 8 else [], 10,
                      what="eight refusals in the journal")
    assert len(events) == 8
    assert {e["pid"] for e in events} == set(st.worker_pids()), "one worker refused all"
    held[0].release()
    wait_for(lambda: (a := _associate(st.port)).is_established and (a.release() or True), 10,
             what="a free place once one association ended")
    held[1].release()


def test_allow_list_refusals_of_every_worker_reach_the_journal(
        station: Callable[..., Station]) -> None:
    st = station(allowed_calling_ae=["GOOD"])
    for _ in range(12):
        assert not _associate(st.port, calling="BAD").is_established
    events = wait_for(lambda: st.events("association-refused")
                      if len(st.events("association-refused")) >= 12 else [], 10,
                      what="twelve refusals in the journal")
    assert len(events) == 12
    assert all("allowed_calling_ae" in e["reason"] and e["calling_ae"] == "BAD"
               for e in events)
    assert {e["pid"] for e in events} == set(st.worker_pids())
    good = _associate(st.port, calling="GOOD")
    assert good.is_established
    good.release()


def test_sigterm_with_four_associations_open_ends_within_the_grace_time(
        station: Callable[..., Station], tmp_path: Path) -> None:
    st = station(network_timeout="3s")
    study = generate_uid()
    senders = senders_on_both_workers(st, study, tmp_path / "data", at_least=4)
    for s in senders:
        s.send(2)
    workers = st.worker_pids()
    st.proc.send_signal(signal.SIGTERM)
    # the grace: network_timeout (3 s) for open associations, then 5 s for publishing
    code = st.proc.wait(3 + 5 + 5)
    assert code == 0, st.log.read_text()
    for pid in workers:
        wait_for(lambda pid=pid: not os.path.exists(f"/proc/{pid}"), 10,
                 what=f"worker {pid} gone")
    acknowledged = {sop for s in senders for sop in s.sent}
    kept = {p.stem for p in st.spool.root.rglob("*.dcm")}
    assert acknowledged <= kept
    assert st.events("receiver-stopped")


@pytest.mark.parametrize("command", ["receive", "watch"])
def test_dts_status_lists_the_workers(tmp_path: Path, command: str) -> None:
    port = free_port()
    config = station_config(tmp_path, station={"ae_title": "DTS", "host": "127.0.0.1",
                                               "port": port, "receive_workers": 2})
    proc = start_dts(command, "--no-web" if command == "watch" else "--port", *(
        [] if command == "watch" else [str(port)]), config=config, log=tmp_path / "dts.log")
    try:
        wait_port(port, 60)
        spool = Spool(tmp_path / "spool")
        from dts.status import receiver_state

        wait_for(lambda: len(receiver_state(spool).get("workers") or []) == 2, 60,
                 what="two workers listed")
        pids = [w["pid"] for w in receiver_state(spool)["workers"]]
        shown = run_dts("status", config=config)
        assert shown.returncode in (0, 1), shown.stderr
        assert f"2 worker process(es): {pids[0]}, {pids[1]}" in shown.stdout, shown.stdout
        assert "Traceback" not in shown.stderr and "web:" in shown.stdout, shown.stderr
        data = json.loads(run_dts("status", "--json", config=config).stdout)
        assert [w["pid"] for w in data["receiver"]["workers"]] == pids
    finally:
        stop_process(proc)


def test_a_worker_whose_receiver_is_gone_does_not_start(tmp_path: Path) -> None:
    """A worker started just as its receiver died (its parent is then pid 1, which the
    kernel's death signal can no longer cover) ends at once instead of serving alone."""
    port = free_port()
    config = station_config(tmp_path, station={"ae_title": "DTS", "host": "127.0.0.1",
                                               "port": port, "receive_workers": 2})
    done = run_dts("receive", "--port", str(port), "--worker", "0/2@1:3", config=config)
    assert done.returncode == 75, done.stderr
    assert "the receiver that started this worker is gone" in done.stderr
    bad = run_dts("receive", "--port", str(port), "--worker", "0/2", config=config)
    assert bad.returncode == 2 and "--worker K/N@PID:FD" in bad.stderr
    # started by this process (its parent) but with a descriptor that is no socket pair
    wrong = run_dts("receive", "--port", str(port), "--worker", f"0/2@{os.getpid()}:0",
                    config=config, input="")  # descriptor 0: a pipe
    assert wrong.returncode == 2, wrong.stderr
    assert "descriptor 0 is no socket" in wrong.stderr, wrong.stderr
