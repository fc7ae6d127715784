"""``dts status``, ``dts show`` and ``dts log`` over a spool with real jobs and events."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from dts.journal import Journal, Stage, Status
from dts.spool import Job, Queue, Spool, State
from dts.status import hold_service
from tests.helpers import DTS, REPO, read_line, run_dts


def _job(spool: Spool, queue: Queue, **data: object) -> Job:
    job = spool.create_tmp_job()
    job.write({"attempts": 0, **data})
    spool.publish(job, queue)
    return Job(spool.dir(queue, State.NEW if queue.is_work else None) / job.id)


def test_status_json_counts_queues_and_receiver(base_config: Path, spool_dir: Path) -> None:
    spool = Spool(spool_dir).ensure()
    for _ in range(2):
        _job(spool, Queue.CLASSIFY)
    _job(spool, Queue.FAILED)
    claimed = spool.claim(_job(spool, Queue.RUN).id, Queue.RUN)
    assert claimed is not None
    proc = run_dts("status", "--json", config=base_config, spool=spool_dir)
    assert proc.returncode == 0, proc.stderr
    st = json.loads(proc.stdout)
    assert st["queues"]["classify"]["new"] == 2
    assert st["queues"]["run"]["cur"] == 1
    assert st["queues"]["failed"]["count"] == 1
    assert st["queues"]["classify"]["oldest_seconds"] >= 0
    assert st["receiver"]["running"] is False
    lock = hold_service(spool, "receiver", port=11112)
    try:
        st = json.loads(run_dts("status", "--json", config=base_config, spool=spool_dir).stdout)
        assert st["receiver"]["running"] is True and st["receiver"]["port"] == 11112
    finally:
        assert lock is not None
        lock.release()
    # --check: a failed job needs a person
    proc = run_dts("status", "--check", config=base_config, spool=spool_dir)
    assert proc.returncode == 1 and "failed" in proc.stderr
    claimed.release()


def test_status_check_ok_on_an_empty_spool(base_config: Path, spool_dir: Path) -> None:
    proc = run_dts("status", "--check", config=base_config, spool=spool_dir)
    assert proc.returncode == 0, proc.stderr


def test_show_prints_job_and_history(base_config: Path, spool_dir: Path) -> None:
    spool = Spool(spool_dir).ensure()
    job = _job(spool, Queue.DONE, study_uid="1.2.3", accession="A77")
    Journal(spool).emit(Stage.SEND, "sent", Status.OK, "all delivered", job=job)
    proc = run_dts("show", "--json", job.id, config=base_config, spool=spool_dir)
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["location"] == "done"
    assert shown["job"]["accession"] == "A77"
    assert [e["event"] for e in shown["events"]] == ["sent"]
    assert shown["events"][0]["study_uid"] == "1.2.3"
    text = run_dts("show", job.id, config=base_config, spool=spool_dir).stdout
    assert "all delivered" in text and job.id in text
    missing = run_dts("show", "20200101T000000.000000Z-00000000", config=base_config,
                      spool=spool_dir)
    assert missing.returncode == 2 and "no job" in missing.stderr


def test_log_filters(base_config: Path, spool_dir: Path) -> None:
    spool = Spool(spool_dir).ensure()
    journal = Journal(spool)
    a = _job(spool, Queue.DONE, study_uid="1.2.3", accession="ACC1")
    b = _job(spool, Queue.FAILED, study_uid="1.2.4", accession="ACC2")
    journal.emit(Stage.RECEIVE, "received", Status.OK, "3 instances", job=a)
    journal.emit(Stage.RUN, "failed", Status.ERROR, "exit 3", job=b)
    journal.emit(Stage.RECEIVE, "association-refused", Status.WARNING, "not allowed",
                 peer="127.0.0.1")

    def log(*args: str) -> list[dict[str, object]]:
        proc = run_dts("log", "--json", *args, config=base_config, spool=spool_dir)
        assert proc.returncode == 0, proc.stderr
        return [json.loads(line) for line in proc.stdout.splitlines()]

    assert len(log()) == 3
    assert [e["event"] for e in log("--accession", "ACC2")] == ["failed"]
    assert [e["job"] for e in log("--study", "1.2.3")] == [a.id]
    assert [e["event"] for e in log("--status", "error")] == ["failed"]
    assert [e["event"] for e in log("--status", "warning", "--status", "error")] == [
        "failed", "association-refused"]
    assert [e["job"] for e in log("--job", b.id)] == [b.id]
    assert len(log("--since", "1h")) == 3
    assert log("--since", "2999-01-01T00:00:00Z") == []
    bad = run_dts("log", "--since", "yesterday-ish", config=base_config, spool=spool_dir)
    assert bad.returncode == 2 and "--since" in bad.stderr
    text = run_dts("log", "--accession", "ACC1", config=base_config, spool=spool_dir).stdout
    assert "received" in text and "acc=ACC1" in text


def test_log_follow_prints_new_events(base_config: Path, spool_dir: Path) -> None:
    spool = Spool(spool_dir).ensure()
    journal = Journal(spool)
    journal.emit(Stage.CLEAN, "removed", Status.INFO, "filtered out")
    journal.emit(Stage.SEND, "sent", Status.OK, "history")
    proc = subprocess.Popen(DTS + ["--config", str(base_config), "--spool", str(spool_dir),
                                   "log", "--follow", "--json", "--stage", "send"],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout is not None
        # the history first; once it is printed, the process is following
        line = read_line(proc.stdout, timeout=15)
        assert json.loads(line)["message"] == "history"
        journal.emit(Stage.SEND, "sent", Status.OK, "new one")
        line = read_line(proc.stdout, timeout=15)
        assert json.loads(line)["message"] == "new one"
    finally:
        proc.terminate()
        proc.wait(10)
