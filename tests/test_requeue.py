"""`dts requeue`: jobs go back for another try with their history, never from a live claim."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from dts.journal import Journal, Stage, Status
from dts.requeue import requeue
from dts.spool import Queue, Spool, State
from dts.station import Station
from tests.helpers import run_dts


def make_job(spool: Spool, queue: Queue, state: State | None = None, *,
             output: bool = True, **data: Any) -> str:
    """A job resting in ``queue`` as a stage would have left it (with one event)."""
    job = spool.create_tmp_job()
    job.input_dir.mkdir()
    (job.input_dir / "x.dcm").write_bytes(b"dicom")
    if output:
        job.output_dir.mkdir()
        (job.output_dir / "result.dcm").write_bytes(b"result")
        job.logs_dir.mkdir()
        (job.logs_dir / "stdout.txt").write_text("old run\n")
    job.write({"study_uid": "1.2.3", "accession": "ACC9", **data})
    Journal(spool).emit(Stage.RUN, "failed", Status.ERROR, "the old try", job=job)
    if queue.is_work:
        spool.publish(job, queue)
        if state is State.CUR:
            os.rename(spool.dir(queue, State.NEW) / job.id, spool.dir(queue, State.CUR) / job.id)
    else:
        spool.publish(job, queue)
    return job.id


@pytest.fixture
def station(base_config: Path, spool_dir: Path) -> Station:
    return Station.open(base_config, spool_dir)


def _events(spool: Spool, queue: Queue, job_id: str, state: State | None = None) -> list[dict]:
    path = spool.dir(queue, state) / job_id / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_failed_run_job_goes_back_to_run_with_history(station: Station, base_config: Path,
                                                      spool_dir: Path) -> None:
    spool = station.spool
    jid = make_job(spool, Queue.FAILED, stream="s1", attempts=3, error="timeout",
                   destinations={"pacs": {"status": "done", "sent": ["1.2"]}})
    proc = run_dts("requeue", jid, "--to", "run", "--json", config=base_config, spool=spool_dir,
                   env={"SUDO_USER": "alice"})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out == [{"job": jid, "from": "failed", "to": "run/new", "by": "alice",
                    "host": socket.gethostname()}]
    assert spool.list(Queue.FAILED) == []
    job_dir = spool.dir(Queue.RUN, State.NEW) / jid
    data = json.loads((job_dir / "job.json").read_text())
    assert data["attempts"] == 0 and "error" not in data and "destinations" not in data
    assert data["requeued"][0]["by"] == "alice" and data["requeued"][0]["from"] == "failed"
    # the old run's results are kept aside, the new run starts empty
    previous = list((job_dir / "previous").iterdir())
    assert len(previous) == 1
    assert (previous[0] / "output" / "result.dcm").read_bytes() == b"result"
    assert (previous[0] / "logs" / "stdout.txt").exists()
    assert list((job_dir / "output").iterdir()) == []
    events = _events(spool, Queue.RUN, jid, State.NEW)
    assert [e["event"] for e in events] == ["failed", "requeued"]
    assert events[1]["stage"] == "requeue" and events[1]["by"] == "alice"
    assert "alice@" in events[1]["message"] and events[1]["accession"] == "ACC9"
    log = run_dts("log", "--job", jid, "--stage", "requeue", config=base_config,
                  spool=spool_dir, check=True)
    assert "requeued from failed to run/new by alice" in log.stdout


def test_send_keeps_sent_instances_and_forgets_failures(station: Station) -> None:
    spool = station.spool
    dests = {"pacs": {"status": "failed", "sent": ["1.1", "1.2"], "failed": {"1.3": "0xA700"}},
             "reports": {"status": "done", "sent": ["1.1", "1.2", "1.3"]}}
    jid = make_job(spool, Queue.FAILED, stream="s1", attempts=6,
                   next_attempt_at="2099-01-01T00:00:00Z", destinations=dests)
    requeue(station, jid, Queue.SEND, by="bob")
    data = json.loads((spool.dir(Queue.SEND, State.NEW) / jid / "job.json").read_text())
    assert data["attempts"] == 0 and "next_attempt_at" not in data
    assert data["destinations"]["pacs"]["sent"] == ["1.1", "1.2"]
    assert data["destinations"]["pacs"]["failed"] == {}
    assert "status" not in data["destinations"]["pacs"]  # the sender tries it again
    assert data["destinations"]["reports"] == dests["reports"]  # finished stays finished
    # from send/new (waiting for its backoff) to send: reset in place, due now
    data_before = data
    requeue(station, jid, Queue.SEND, by="bob", resend_all=True)
    data = json.loads((spool.dir(Queue.SEND, State.NEW) / jid / "job.json").read_text())
    assert data["destinations"] == {}  # every result again, to every destination
    assert len(data["requeued"]) == len(data_before["requeued"]) + 1
    assert data["requeued"][-1]["from"] == "send/new"


def test_refuses_a_job_a_worker_holds(station: Station, base_config: Path,
                                      spool_dir: Path) -> None:
    spool = station.spool
    jid = make_job(spool, Queue.RUN, stream="s1")
    claim = spool.claim(jid, Queue.RUN)
    assert claim is not None
    try:
        proc = run_dts("requeue", jid, "--to", "classify", config=base_config, spool=spool_dir)
        assert proc.returncode == 75, proc.stderr
        assert "being worked on" in proc.stderr
        assert spool.list(Queue.RUN, State.CUR) == [jid]
    finally:
        claim.release()
    # once its worker is gone (lock free), the same job can be requeued from cur/
    requeue(station, jid, Queue.CLASSIFY, by="carol")
    assert spool.list(Queue.CLASSIFY, State.NEW) == [jid]
    assert spool.list(Queue.RUN, State.CUR) == []


def test_unmatched_job_needs_classify_first(station: Station, base_config: Path,
                                            spool_dir: Path) -> None:
    spool = station.spool
    jid = make_job(spool, Queue.UNMATCHED, output=False, children=["x"])
    proc = run_dts("requeue", jid, "--to", "run", config=base_config, spool=spool_dir)
    assert proc.returncode == 2 and "--to classify" in proc.stderr
    assert spool.list(Queue.UNMATCHED) == [jid]
    proc = run_dts("requeue", jid, "--to", "classify", config=base_config, spool=spool_dir)
    assert proc.returncode == 0, proc.stderr
    assert f"{jid}\tunmatched -> classify/new" in proc.stdout
    data = json.loads((spool.dir(Queue.CLASSIFY, State.NEW) / jid / "job.json").read_text())
    assert data["children"] == ["x"]  # history: the classifier adds new children to it
    # a run job goes back to run, not to classify
    child = make_job(spool, Queue.DONE, stream="s1", parent=jid)
    proc = run_dts("requeue", child, "--to", "classify", config=base_config, spool=spool_dir)
    assert proc.returncode == 2 and f"requeue {jid} --to classify" in proc.stderr
    # a job without results cannot be sent
    jid2 = make_job(spool, Queue.FAILED, output=False, stream="s1")
    proc = run_dts("requeue", jid2, "--to", "send", config=base_config, spool=spool_dir)
    assert proc.returncode == 2 and "--to run" in proc.stderr


def test_unknown_job_and_bad_target(base_config: Path, spool_dir: Path) -> None:
    proc = run_dts("requeue", "20260101T000000.000000Z-00000000", "--to", "run",
                   config=base_config, spool=spool_dir)
    assert proc.returncode == 2 and "no job" in proc.stderr
    proc = run_dts("requeue", "x", "--to", "done", config=base_config, spool=spool_dir)
    assert proc.returncode == 2
