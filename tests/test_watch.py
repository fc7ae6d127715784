"""`dts watch`: every stage in one process, woken by the spool, stopped cleanly."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from dts.journal import EventFilter, read_events
from dts.spool import Queue, Spool, State, isotime, parse_isotime
from tests.helpers import (
    REPO,
    STORESCU,
    free_port,
    make_study,
    run_dts,
    start_dts,
    stop_process,
    wait_for,
)
from tests.plugins.database import PostgresServer
from tests.test_cron import queue_study, station_config


class Station:
    """A `dts watch` subprocess on a test spool; stopped by PID at the end."""

    def __init__(self, tmp_path: Path, config: Path) -> None:
        self.tmp_path = tmp_path
        self.config = config
        self.spool = Spool(tmp_path / "spool").ensure()
        self.log = tmp_path / "watch.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *args: str) -> None:
        self.proc = start_dts("watch", *args, config=self.config, log=self.log)
        wait_for(lambda: self.running() or self.proc.poll() is not None, 30,  # type: ignore
                 what="dts watch to start")
        assert self.proc.poll() is None, self.log.read_text()

    def running(self) -> bool:
        st = json.loads(run_dts("status", "--json", config=self.config, check=True).stdout)
        return bool(st["watch"]["running"]) and any(
            e["event"] == "watch-started" and e.get("pid") == self.proc.pid  # type: ignore
            for e in read_events(self.spool, EventFilter(stage="watch")))

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        return stop_process(self.proc, sig, timeout=60)

    def events(self, **flt: Any) -> list[dict[str, Any]]:
        return list(read_events(self.spool, EventFilter(**flt)))


@pytest.fixture
def watch(tmp_path: Path) -> Iterator[Station]:
    st = Station(tmp_path, station_config(tmp_path, port=free_port()))
    yield st
    if st.proc is not None:
        stop_process(st.proc, signal.SIGKILL)


def _done(spool: Spool, jid: str) -> bool:
    return f"{jid}.series-statistics" in spool.list(Queue.DONE)


@pytest.mark.peers
def test_study_goes_through_every_stage_and_sigterm_exits_0(watch: Station,
                                                             tmp_path: Path) -> None:
    watch.start()
    port = json.loads(run_dts("status", "--json", config=watch.config).stdout)["receiver"]["port"]
    make_study(tmp_path / "study", n_series=2, per_series=3, accession="W-1")
    proc = subprocess.run([STORESCU, "-aet", "MODALITY", "-aec", "DTS", "+sd", "+r",
                           "127.0.0.1", str(port), str(tmp_path / "study")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: len(watch.spool.list(Queue.DONE)) == 2, 60, what="the study to be done")
    parent = next(j for j in watch.spool.list(Queue.DONE) if not j.endswith("-statistics"))
    assert (tmp_path / "reports" / f"{parent}.series-statistics" / "statistics.json").exists()
    stages = {e["stage"] for e in watch.events(accession="W-1")}
    assert {"receive", "classify", "run", "send"} <= stages
    assert watch.stop() == 0
    st = json.loads(run_dts("status", "--json", config=watch.config).stdout)
    assert not st["watch"]["running"] and not st["receiver"]["running"]
    assert watch.events(event="watch-stopped")
    text = watch.log.read_text()
    assert f"run      done    {parent}.series-statistics" in text  # plain lines off a tty


def test_recovers_dead_workers_jobs_at_start(watch: Station, tmp_path: Path) -> None:
    spool = watch.spool
    study = make_study(tmp_path / "study", n_series=1, per_series=2)
    jid = queue_study(spool, tmp_path / "study", study)
    # a classifier claimed it and died: in classify/cur, lock free
    os.rename(spool.dir(Queue.CLASSIFY, State.NEW) / jid, spool.dir(Queue.CLASSIFY, State.CUR) / jid)
    watch.start("--no-receive")
    wait_for(lambda: _done(spool, jid), 60, what="the recovered job to finish")
    rec = watch.events(event="recovered")
    assert [e["job"] for e in rec] == [jid]
    assert json.loads((spool.dir(Queue.DONE) / jid / "job.json").read_text())["attempts"] == 1
    assert watch.stop() == 0


def test_a_job_locked_by_its_publisher_is_taken_when_released(tmp_path: Path) -> None:
    """No inotify event follows the release of a lock: watch looks again by itself, long
    before the rescan (30 s here)."""
    config = station_config(tmp_path, port=free_port())
    config.write_text(config.read_text().replace("rescan_seconds = 2", "rescan_seconds = 30"))
    st = Station(tmp_path, config)
    spool = st.spool
    try:
        st.start("--no-receive")
        study = make_study(tmp_path / "study", n_series=1, per_series=2)
        job = spool.create_tmp_job()
        fd = os.open(job.path / ".lock", os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        tmp_folder = tmp_path / "study"
        for series_uid, sops in study["series"].items():
            (job.input_dir / series_uid).mkdir(parents=True)
            for sop in sops:
                os.link(tmp_folder / series_uid / f"{sop}.dcm",
                        job.input_dir / series_uid / f"{sop}.dcm")
        job.write({"study_uid": study["study_uid"], "accession": "L-1", "calling_ae": "PACS",
                   "called_ae": "DTS", "stream": None, "attempts": 0})
        spool.publish(job, Queue.CLASSIFY)
        time.sleep(1.0)  # the publisher still holds the lock (deliberately long)
        assert spool.list(Queue.CLASSIFY, State.NEW) == [job.id]
        released = time.monotonic()
        os.close(fd)
        wait_for(lambda: job.id not in spool.list(Queue.CLASSIFY, State.NEW), 25,
                 what="the job to be claimed after its lock was released")
        assert time.monotonic() - released < 10
        wait_for(lambda: _done(spool, job.id), 60, what="the job to finish")
        assert st.stop() == 0
    finally:
        if st.proc is not None:
            stop_process(st.proc, signal.SIGKILL)


def test_send_retry_is_taken_when_due(watch: Station, tmp_path: Path) -> None:
    """A job waiting for its backoff is sent at next_attempt_at, without any file event."""
    cfg = watch.config
    cfg.write_text(cfg.read_text().replace("rescan_seconds = 2", "rescan_seconds = 60"))
    spool = watch.spool
    watch.start("--no-receive")
    job = spool.create_tmp_job()
    job.output_dir.mkdir()
    (job.output_dir / "statistics.json").write_text("{}")
    due = datetime.now(UTC) + timedelta(seconds=2)
    job.write({"study_uid": "1.2.3", "stream": "series-statistics", "attempts": 1,
               "next_attempt_at": isotime(due), "destinations": {}})
    spool.publish(job, Queue.SEND)
    wait_for(lambda: job.id in spool.list(Queue.DONE), 20, what="the send at its due time")
    sent = watch.events(job=job.id, event="send-started")
    assert sent and parse_isotime(sent[0]["time"]) >= due  # not before it was due
    assert watch.stop() == 0


def test_sigterm_during_a_run_puts_the_job_back(tmp_path: Path) -> None:
    config = station_config(tmp_path, port=free_port())
    pidfile = tmp_path / "module.pid"
    script = (f"import os,sys,time; open({str(pidfile)!r},'w').write(str(os.getpid())); "
              "time.sleep(120)")
    text = config.read_text().replace(
        '"-m", "dts.examples.series_statistics", "{input}", "{output}"',
        f'"-c", {json.dumps(script)}')
    config.write_text(text)
    st = Station(tmp_path, config)
    spool = st.spool
    try:
        st.start("--no-receive", "--grace", "1s")
        study = make_study(tmp_path / "study", n_series=1, per_series=2)
        jid = queue_study(spool, tmp_path / "study", study)
        wait_for(pidfile.exists, 30, what="the processing to start")
        module_pid = int(wait_for(lambda: pidfile.read_text().strip(), 10))
        t0 = time.monotonic()
        assert st.stop() == 0
        assert time.monotonic() - t0 < 30
    finally:
        if st.proc is not None:
            stop_process(st.proc, signal.SIGKILL)
    run_job = f"{jid}.series-statistics"
    assert spool.list(Queue.RUN, State.NEW) == [run_job]
    assert spool.list(Queue.RUN, State.CUR) == []
    with pytest.raises(ProcessLookupError):
        os.kill(module_pid, 0)  # the processing was stopped, not orphaned
    assert [e["event"] for e in st.events(job=run_job, stage="run")][-1] == "interrupted"


def test_one_watch_per_spool(watch: Station) -> None:
    watch.start()
    second = run_dts("watch", "--port", str(free_port()), config=watch.config, timeout=60)
    assert second.returncode == 2
    assert "already running" in second.stderr
    assert watch.stop() == 0


def test_retention_and_watermark_in_watch(tmp_path: Path) -> None:
    config = station_config(tmp_path, port=free_port(), extra='retention = "7d"')
    st = Station(tmp_path, config)
    spool = st.spool
    old = []
    for days in (9, 8):
        job = spool.create_tmp_job()
        job.write({"study_uid": "1.2.3", "accession": f"R-{days}"})
        spool.publish(job, Queue.DONE)
        t = time.time() - days * 86400
        for p in (job.path / "job.json", job.path):
            os.utime(p, (t, t))
        old.append(job.id)
    recent = spool.create_tmp_job()
    recent.write({"study_uid": "1.2.4"})
    spool.publish(recent, Queue.DONE)
    try:
        st.start("--no-receive")
        wait_for(lambda: spool.list(Queue.DONE) == [recent.id], 20, what="retention")
        assert sorted(e["job"] for e in st.events(stage="clean", event="removed")) == sorted(old)
        assert st.stop() == 0
        # a watermark no disk reaches: every finished job goes, and watch says so
        config.write_text(config.read_text().replace(
            'retention = "7d"', "clean_below_free_mb = 1000000000"))
        st.start("--no-receive")
        wait_for(lambda: spool.list(Queue.DONE) == [], 20, what="the watermark clean-up")
        wait_for(lambda: st.events(event="disk-low"), 10, what="the disk-low event")
        assert st.stop() == 0
    finally:
        if st.proc is not None:
            stop_process(st.proc, signal.SIGKILL)


def test_watch_ships_the_journal_to_the_database(tmp_path: Path,
                                                 postgres: PostgresServer) -> None:
    url = postgres.create_database("journal")
    config = station_config(tmp_path, port=free_port())
    config.write_text(config.read_text() + f'\n[journal]\nurl = "{url}"\n')
    st = Station(tmp_path, config)
    try:
        st.start("--no-receive")
        study = make_study(tmp_path / "study", n_series=1, per_series=2)
        jid = queue_study(st.spool, tmp_path / "study", study, accession="DB-1")
        wait_for(lambda: _done(st.spool, jid), 60, what="the job")
        assert st.stop() == 0  # the last pass ships the final events too
    finally:
        if st.proc is not None:
            stop_process(st.proc, signal.SIGKILL)
    in_files = [e for e in st.events()]
    rows = postgres.query("journal", "select count(*), count(distinct event_key) from dts_events")
    assert rows == [[str(len(in_files)), str(len(in_files))]]
    proc = run_dts("log", "--db", "--accession", "DB-1", config=config, check=True)
    assert {"classify", "run", "send"} <= {line.split()[1] for line in proc.stdout.splitlines()}


def test_make_run_starts_on_the_default_configuration(tmp_path: Path) -> None:
    """`make run` is `dts --config configuration/dts.toml --spool spool watch`: no engine and
    no database needed (the default stream is a command, its destination a folder)."""
    spool = tmp_path / "spool"
    env = {"PATH": "/usr/bin:/bin"}  # no podman/docker on PATH
    proc = start_dts("--config", str(REPO / "configuration" / "dts.toml"), "--spool", str(spool),
                     "watch", "--port", str(free_port()), env=env, log=tmp_path / "run.log")
    try:
        wait_for(lambda: any(e["event"] == "receiver-started" for e in
                             read_events(Spool(spool), EventFilter())) or proc.poll() is not None,
                 30, what="the station to start")
        assert proc.poll() is None, (tmp_path / "run.log").read_text()
    finally:
        assert stop_process(proc, signal.SIGINT) == 0


def test_live_status_line_on_a_terminal(tmp_path: Path) -> None:
    import pty

    config = station_config(tmp_path, port=free_port())
    main, child = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DTS_")}
    env["TERM"] = "xterm"
    proc = subprocess.Popen([sys.executable, "-m", "dts", "--config", str(config), "watch",
                             "--no-receive"], stdin=child, stdout=child, stderr=child, env=env,
                            cwd=REPO)
    os.close(child)
    out = b""
    try:
        def screen() -> bool:
            nonlocal out
            import select
            while select.select([main], [], [], 0.1)[0]:
                try:
                    out += os.read(main, 65536)
                except OSError:
                    return False
            return b"classify 0+0" in out
        wait_for(screen, 30, what="the status line")
    finally:
        assert stop_process(proc, signal.SIGTERM) == 0
        os.close(main)
    assert b"done 0  failed 0  unmatched 0" in out


def test_requeue_while_watch_runs_reprocesses_at_once(watch: Station, tmp_path: Path) -> None:
    spool = watch.spool
    watch.start("--no-receive")
    study = make_study(tmp_path / "study", n_series=1, per_series=2, accession="RQ-1")
    jid = queue_study(spool, tmp_path / "study", study, accession="RQ-1")
    wait_for(lambda: _done(spool, jid), 60, what="the first pass")
    child = f"{jid}.series-statistics"
    report = tmp_path / "reports" / child / "statistics.json"
    first = report.stat().st_ino
    proc = run_dts("requeue", child, "--to", "run", config=watch.config,
                   env={"SUDO_USER": "dr-who"})
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: len(watch.events(job=child, event="sent")) == 2, 60,
             what="the requeued job to be run and sent again")
    assert child in spool.list(Queue.DONE)
    assert report.stat().st_ino != first  # delivered anew
    events = [e["event"] for e in watch.events(job=child)]
    assert events.index("requeued") < len(events) - events[::-1].index("finished") - 1
    assert list((spool.dir(Queue.DONE) / child / "previous").iterdir())
    assert watch.stop() == 0


def test_a_job_put_back_for_a_temporary_reason_is_not_retried_in_a_loop(tmp_path: Path) -> None:
    """The classifier puts jobs back while its rule file is broken; watch must not take
    them again at once (its own move back into new/ wakes it), only after a pause."""
    from watchdog.observers import Observer

    rules = tmp_path / "rules.json"
    rules.write_text((REPO / "configuration" / "classifyRules.json").read_text())
    config = station_config(tmp_path, port=free_port())
    config.write_text(config.read_text().replace(
        str(REPO / "configuration" / "classifyRules.json"), str(rules)))
    st = Station(tmp_path, config)
    spool = st.spool
    moves: list[float] = []

    class Count:
        def dispatch(self, event: Any) -> None:
            if event.event_type in ("created", "moved"):  # the job back in new/
                moves.append(time.monotonic())
    observer = Observer()
    observer.schedule(Count(), str(spool.dir(Queue.CLASSIFY, State.NEW)))  # type: ignore
    observer.start()
    try:
        st.start("--no-receive")
        rules.write_text("{ broken")
        study = make_study(tmp_path / "study", n_series=1, per_series=2)
        jid = queue_study(spool, tmp_path / "study", study)
        wait_for(lambda: st.events(event="rules-error"), 20, what="the rules error")
        moves.clear()
        wait_for(lambda: len(moves) >= 3, 20, what="the job taken and put back twice more")
        # paused in between (rescan_seconds = 2), not retried in a tight loop
        assert moves[2] - moves[1] > 1.0, [moves[i + 1] - moves[i] for i in range(len(moves) - 1)]
        assert jid in spool.list(Queue.CLASSIFY, State.NEW) + spool.list(Queue.CLASSIFY,
                                                                          State.CUR)
        rules.write_text((REPO / "configuration" / "classifyRules.json").read_text())
        wait_for(lambda: _done(spool, jid), 30, what="the job once the rules are fixed")
        assert st.stop() == 0
    finally:
        observer.stop()
        observer.join(5)
        if st.proc is not None:
            stop_process(st.proc, signal.SIGKILL)
