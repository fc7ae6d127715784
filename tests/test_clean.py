"""`dts clean` and the free-disk watermark: finished jobs go by age, claimed work never."""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

import pytest

from dts.journal import EventFilter, read_events
from dts.retention import ensure_free_disk, tree_bytes
from dts.spool import Queue, Spool
from dts.station import Station
from tests.helpers import run_dts
from tests.test_requeue import make_job

DAY = 86400


def age(spool: Spool, queue: Queue, job_id: str, days: float) -> None:
    """Make a job look untouched for ``days``."""
    path = spool.dir(queue) / job_id
    t = time.time() - days * DAY
    for p in (path / "job.json", path / "events.jsonl", path):
        os.utime(p, (t, t))


@pytest.fixture
def station(base_config: Path, spool_dir: Path) -> Station:
    return Station.open(base_config, spool_dir)


def test_removes_old_finished_jobs_by_queue(station: Station, base_config: Path,
                                            spool_dir: Path) -> None:
    spool = station.spool
    old = {q: make_job(spool, q, stream="s1") for q in (Queue.DONE, Queue.UNMATCHED,
                                                         Queue.FAILED)}
    for q, jid in old.items():
        age(spool, q, jid, 10)
    fresh = make_job(spool, Queue.DONE, stream="s1")
    age(spool, Queue.DONE, fresh, 2)
    waiting = make_job(spool, Queue.RUN, stream="s1")  # work queues are never cleaned

    dry = run_dts("clean", "--older-than", "7d", "--dry-run", "--json", config=base_config,
                  spool=spool_dir)
    assert dry.returncode == 0, dry.stderr
    report = json.loads(dry.stdout)
    assert report["dry_run"] is True
    assert sorted(r["job"] for r in report["removed"]) == sorted([old[Queue.DONE],
                                                                  old[Queue.UNMATCHED]])
    assert all(r["bytes"] > 0 and r["age_seconds"] >= 10 * DAY - 60 for r in report["removed"])
    assert spool.list(Queue.DONE) == sorted([old[Queue.DONE], fresh])  # nothing removed

    proc = run_dts("clean", "--older-than", "7d", config=base_config, spool=spool_dir)
    assert proc.returncode == 0, proc.stderr
    assert "removed 2 job(s)" in proc.stderr
    assert spool.list(Queue.DONE) == [fresh]
    assert spool.list(Queue.UNMATCHED) == []
    assert spool.list(Queue.FAILED) == [old[Queue.FAILED]]
    assert spool.list(Queue.RUN) == [waiting]
    removed = list(read_events(spool, EventFilter(stage="clean", event="removed")))
    assert sorted(e["job"] for e in removed) == sorted([old[Queue.DONE], old[Queue.UNMATCHED]])
    assert {e["accession"] for e in removed} == {"ACC9"}

    proc = run_dts("clean", "--older-than", "7d", "--failed", "--no-done", "--json",
                   config=base_config, spool=spool_dir)
    assert [r["job"] for r in json.loads(proc.stdout)["removed"]] == [old[Queue.FAILED]]
    assert spool.list(Queue.FAILED) == []
    assert not list(spool.tmp.glob(".trash-*"))  # removal leaves no trash behind


def test_never_touches_a_claimed_job(station: Station) -> None:
    from dts.retention import clean

    spool = station.spool
    jid = make_job(spool, Queue.DONE)
    age(spool, Queue.DONE, jid, 30)
    claim = spool.claim_at(jid)  # e.g. dts requeue working on it right now
    assert claim is not None
    try:
        report = clean(station, 7 * DAY)
        assert report.removed == [] and report.busy == [jid]
        assert spool.list(Queue.DONE) == [jid]
    finally:
        claim.release()
    assert [r.job for r in clean(station, 7 * DAY).removed] == [jid]


def test_stale_tmp_entries(station: Station, base_config: Path, spool_dir: Path) -> None:
    spool = station.spool
    old = time.time() - 2 * DAY
    stale_file = spool.tmp / "1.2.3.dcm.part"
    stale_file.write_bytes(b"half an instance")
    stale_job = spool.create_tmp_job()
    locked_job = spool.create_tmp_job()
    fresh_job = spool.create_tmp_job()
    publishing = spool.create_tmp_job()  # a receiver died halfway through publishing it
    (publishing.path / ".receiving").write_text("{}")
    for p in (stale_file, stale_job.path, stale_job.path / ".lock", locked_job.path,
              locked_job.path / ".lock", spool.run_dir, publishing.path,
              publishing.path / ".lock", publishing.path / ".receiving"):
        os.utime(p, (old, old))
    fd = os.open(locked_job.path / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        proc = run_dts("clean", "--older-than", "7d", "--json", config=base_config,
                       spool=spool_dir)
    finally:
        os.close(fd)
    assert proc.returncode == 0, proc.stderr
    assert sorted(json.loads(proc.stdout)["tmp_removed"]) == sorted(["1.2.3.dcm.part",
                                                                    stale_job.id])
    assert sorted(os.listdir(spool.tmp)) == sorted([".run", locked_job.id, fresh_job.id,
                                                    publishing.id])


def test_free_disk_watermark_removes_oldest_first(station: Station) -> None:
    spool = station.spool
    jobs = []
    for days in (5, 1, 3, 4):
        q = Queue.UNMATCHED if days == 4 else Queue.DONE
        jid = make_job(spool, q, stream="s1")
        (spool.dir(q) / jid / "input" / "big.dcm").write_bytes(os.urandom(1024 * 1024))
        age(spool, q, jid, days)
        jobs.append((days, q, jid))
    failed = make_job(spool, Queue.FAILED, stream="s1")
    age(spool, Queue.FAILED, failed, 9)

    # A small disk simulated from what the spool really holds (filling a real disk on
    # demand is not possible in a test): capacity = what is used now + 1 MB.
    def used_mb() -> float:
        return tree_bytes(spool.root) / (1024 * 1024)
    capacity = used_mb() + 1.0

    def free() -> float:
        return capacity - used_mb()

    report = ensure_free_disk(station, 3.0, free_mb=free)
    # two jobs of ~1 MB had to go: the oldest (5 days, then 4 days in unmatched/)
    assert [r.job for r in report.removed] == [jobs[0][2], jobs[3][2]]
    assert report.free_mb_after is not None and report.free_mb_after >= 3.0
    assert spool.list(Queue.FAILED) == [failed]
    ev = list(read_events(spool, EventFilter(stage="clean", event="disk-low")))
    assert len(ev) == 1 and ev[0]["status"] == "warning" and ev[0]["removed"] == 2

    # unreachable watermark: everything finished goes, failed/ stays, and it says so
    report = ensure_free_disk(station, 1e9, free_mb=free)
    assert sorted(r.job for r in report.removed) == sorted([jobs[1][2], jobs[2][2]])
    assert spool.list(Queue.FAILED) == [failed]
    ev = list(read_events(spool, EventFilter(stage="clean", event="disk-low")))
    assert ev[-1]["status"] == "error" and "still below" in ev[-1]["message"]
    # above the watermark: nothing happens
    assert ensure_free_disk(station, 0.5, free_mb=free).removed == []


def test_bad_duration_is_a_usage_error(base_config: Path, spool_dir: Path) -> None:
    proc = run_dts("clean", "--older-than", "soon", config=base_config, spool=spool_dir)
    assert proc.returncode == 2 and "--older-than" in proc.stderr


def test_produced_registry_entries_go_with_their_job_after_30_days(
        station: Station, base_config: Path, spool_dir: Path) -> None:
    from dts.provenance import produced_by, register_produced

    spool = station.spool
    kept_job = make_job(spool, Queue.DONE, stream="s1")
    register_produced(spool, ["1.2.3.1"], kept_job)        # its job is still there
    register_produced(spool, ["1.2.3.2"], "20260101T000000.000000Z-0a0b0c0d.s1")  # job gone
    register_produced(spool, ["1.2.3.3"], "20260101T000000.000000Z-0a0b0c0e.s1")  # gone, young
    t = time.time()
    for uid, days in (("1.2.3.1", 40), ("1.2.3.2", 40), ("1.2.3.3", 20)):
        os.utime(spool.produced / uid, (t - days * DAY, t - days * DAY))

    dry = run_dts("clean", "--older-than", "7d", "--dry-run", "--json", config=base_config,
                  spool=spool_dir)
    assert json.loads(dry.stdout)["produced_removed"] == 1
    assert produced_by(spool, "1.2.3.2") is not None
    proc = run_dts("clean", "--older-than", "7d", config=base_config, spool=spool_dir)
    assert proc.returncode == 0, proc.stderr
    assert "1 produced/ entries" in proc.stderr
    assert produced_by(spool, "1.2.3.2") is None
    assert produced_by(spool, "1.2.3.1") == kept_job
    assert produced_by(spool, "1.2.3.3") is not None
    # a longer retention than 30 days is honoured for the registry too
    os.utime(spool.produced / "1.2.3.3", (t - 40 * DAY, t - 40 * DAY))
    proc = run_dts("clean", "--older-than", "60d", config=base_config, spool=spool_dir)
    assert "0 produced/ entries" in proc.stderr and produced_by(spool, "1.2.3.3") is not None
