"""The spool protocol under stress: publish, claim races, dead workers, one filesystem."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dts.errors import SpoolError, UsageError
from dts.spool import Job, Queue, Spool, State, age_seconds, new_job_id
from tests.helpers import wait_for


def _publish(spool: Spool, queue: Queue = Queue.RUN, **data: object) -> str:
    job = spool.create_tmp_job()
    job.write({"attempts": 0, **data})
    spool.publish(job, queue)
    return job.id


def test_layout_created_and_ids_sort_by_time(spool_dir: Path) -> None:
    spool = Spool(spool_dir).ensure()
    for d in ("tmp", "incoming", "classify/new", "classify/cur", "run/new", "run/cur",
              "send/new", "send/cur", "done", "failed", "unmatched", "log"):
        assert (spool_dir / d).is_dir(), d
    ids = [new_job_id() for _ in range(50)]
    assert len(set(ids)) == 50
    assert ids == sorted(ids)
    age = age_seconds(ids[0])
    assert age is not None and age < 5


def test_publish_is_one_rename_from_tmp(spool_dir: Path) -> None:
    spool = Spool(spool_dir).ensure()
    job = spool.create_tmp_job()
    assert job.path.parent == spool.tmp
    job.write({"study_uid": "1.2.3"})
    assert spool.list(Queue.CLASSIFY, State.NEW) == []
    spool.publish(job, Queue.CLASSIFY)
    assert spool.list(Queue.CLASSIFY, State.NEW) == [job.id]
    assert list(spool.tmp.iterdir()) == [spool.run_dir] or not any(
        p.name != ".run" for p in spool.tmp.iterdir())
    assert json.loads((spool.dir(Queue.CLASSIFY) / job.id / "job.json").read_text())[
        "study_uid"] == "1.2.3"


def test_claim_then_move_and_second_claim_loses(spool_dir: Path) -> None:
    spool = Spool(spool_dir).ensure()
    jid = _publish(spool)
    claim = spool.claim(jid, Queue.RUN)
    assert claim is not None and claim.path.parent == spool.dir(Queue.RUN, State.CUR)
    assert spool.claim(jid, Queue.RUN) is None
    # recovery must leave a live claim alone
    assert spool.recover(Queue.RUN) == []
    claim.move(Queue.SEND)
    assert spool.list(Queue.SEND, State.NEW) == [jid]
    assert spool.list(Queue.RUN, State.CUR) == []


def test_undecided_claim_goes_back_to_new(spool_dir: Path) -> None:
    spool = Spool(spool_dir).ensure()
    jid = _publish(spool)
    with spool.claim(jid, Queue.RUN):
        assert spool.list(Queue.RUN, State.CUR) == [jid]
    assert spool.list(Queue.RUN, State.NEW) == [jid]


def _claimer(root: str, queue: str, out: "multiprocessing.Queue[list[str]]") -> None:
    spool = Spool(root)
    got = []
    while True:
        claim = spool.claim_next(Queue(queue))
        if claim is None:
            break
        data = claim.job.read()
        data["worked_by"] = data.get("worked_by", []) + [os.getpid()]
        claim.job.write(data)
        got.append(claim.id)
        claim.move(Queue.DONE)
    out.put(got)


def test_racing_claimers_process_each_job_exactly_once(spool_dir: Path) -> None:
    spool = Spool(spool_dir).ensure()
    ids = [_publish(spool) for _ in range(200)]
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue[list[str]] = ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(str(spool_dir), "run", out)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    claimed = [j for r in results for j in r]
    assert sorted(claimed) == sorted(ids)
    assert spool.list(Queue.DONE) == sorted(ids)
    for jid in ids:
        assert len(Job(spool.dir(Queue.DONE) / jid).read()["worked_by"]) == 1


HOLDER = """
import sys, time
from dts.spool import Spool, Queue
spool = Spool(sys.argv[1])
claim = spool.claim(sys.argv[2], Queue.RUN)
print("claimed", flush=True)
time.sleep(60)
"""


def test_killed_worker_job_is_recovered_with_attempt_counted(spool_dir: Path) -> None:
    spool = Spool(spool_dir).ensure()
    jid = _publish(spool)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(spool_dir), jid],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "claimed"
        assert spool.list(Queue.RUN, State.CUR) == [jid]
        assert spool.recover(Queue.RUN) == []  # alive: its lock is held
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert spool.recover(Queue.RUN) == [jid]
    assert spool.list(Queue.RUN, State.NEW) == [jid]
    assert Job(spool.dir(Queue.RUN) / jid).read()["attempts"] == 1


def test_find_and_bad_ids(spool_dir: Path) -> None:
    spool = Spool(spool_dir).ensure()
    jid = _publish(spool, Queue.SEND)
    loc, path = spool.find(jid)
    assert str(loc) == "send/new" and path.is_dir()
    with pytest.raises(UsageError):
        spool.find("../etc")
    with pytest.raises(UsageError):
        spool.find("20990101T000000.000000Z-deadbeef")


def test_refuses_spool_spanning_filesystems(spool_dir: Path) -> None:
    if not Path("/dev/shm").is_dir() or os.stat("/dev/shm").st_dev == os.stat(
            spool_dir.parent).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test folder")
    spool = Spool(spool_dir).ensure()
    other = Path("/dev/shm") / f"dts-test-{os.getpid()}-{time.time_ns()}"
    other.mkdir()
    try:
        (spool_dir / "failed").rmdir()
        (spool_dir / "failed").symlink_to(other)
        with pytest.raises(SpoolError, match="another filesystem"):
            Spool(spool_dir).ensure()
    finally:
        other.rmdir()
