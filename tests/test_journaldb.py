"""The journal database: events mirrored into PostgreSQL exactly once, even across outages."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from dts.journal import Event, EventFilter, Journal, Stage, Status, read_events
from dts.journaldb import Shipper, normalize_url, read_db_events
from dts.spool import Spool
from dts.station import Station
from tests.helpers import run_dts, wait_for
from tests.plugins.database import PostgresServer


def _config(tmp_path: Path, base_config: Path, url: str | None) -> Path:
    text = base_config.read_text()
    if url:
        text += f'\n[journal]\nurl = "{url}"\n'
    path = tmp_path / "dts-db.toml"
    path.write_text(text)
    return path


def _emit(spool: Spool, n: int, *, start: int = 0, accession: str = "ACC1") -> None:
    journal = Journal(spool)
    job = spool.create_tmp_job()
    job.write({"study_uid": "1.2.3", "accession": accession, "stream": "s1"})
    for i in range(start, start + n):
        journal.emit(Stage.CLASSIFY, Event.MATCHED if i % 2 else Event.QUEUED,
                     Status.ERROR if i % 5 == 0 else Status.OK, f"event {i}", job=job, seq=i)


def _count(pg: PostgresServer, db: str) -> tuple[int, int]:
    if pg.query(db, "select to_regclass('dts_events') is not null")[0][0] != "t":
        return 0, 0  # the shipper has not created the table yet
    rows = pg.query(db, "select count(*), count(distinct event_key) from dts_events")
    return int(rows[0][0]), int(rows[0][1])


def _seqs(pg: PostgresServer, db: str) -> list[int]:
    return sorted(int(r[0]) for r in pg.query(db, "select details->>'seq' from dts_events "
                                                  "where details ? 'seq'"))


def test_url_scheme_maps_to_psycopg3() -> None:
    assert normalize_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("sqlite:///x.db") == "sqlite:///x.db"


def test_sync_db_mirrors_every_event_once(tmp_path: Path, base_config: Path,
                                          postgres: PostgresServer) -> None:
    url = postgres.create_database("journal")
    config = _config(tmp_path, base_config, url)
    spool = Spool(tmp_path / "spool").ensure()
    _emit(spool, 30)
    proc = run_dts("log", "--sync-db", config=config, spool=spool.root)
    assert proc.returncode == 0, proc.stderr
    assert "30 new event(s)" in proc.stderr
    assert _count(postgres, "journal") == (30, 30)
    assert _seqs(postgres, "journal") == list(range(30))
    # columns hold the event keys, details the rest
    row = postgres.query("journal", "select stage, event, status, accession, stream, study_uid, "
                                    "details->>'host', details->>'pid' from dts_events "
                                    "where details->>'seq' = '3'")[0]
    assert row[:6] == ["classify", "matched", "ok", "ACC1", "s1", "1.2.3"]
    assert row[6] and row[7].isdigit()
    # a second run, and a lost cursor, deliver nothing twice
    run_dts("log", "--sync-db", config=config, spool=spool.root, check=True)
    (spool.log_dir / ".dbcursor").unlink()
    proc = run_dts("log", "--sync-db", config=config, spool=spool.root, check=True)
    assert "0 new event(s) in the journal database (30 read" in proc.stderr
    assert _count(postgres, "journal") == (30, 30)


def test_outage_keeps_events_and_delivers_them_later_exactly_once(
        tmp_path: Path, base_config: Path, postgres: PostgresServer) -> None:
    url = postgres.create_database("journal")
    spool = Spool(tmp_path / "spool").ensure()
    shipper = Shipper(spool, url, connect_timeout=2)
    states: list[bool] = []
    stop = threading.Event()
    thread = threading.Thread(target=shipper.run, args=(stop,),
                              kwargs={"interval": 0.1, "max_backoff": 0.5,
                                      "on_state": lambda up, msg: states.append(up)})
    thread.start()
    try:
        _emit(spool, 10)
        wait_for(lambda: _count(postgres, "journal")[0] == 10, 20, what="first 10 events")
        postgres.stop()
        _emit(spool, 25, start=10)  # written while the database is down: nothing waits
        wait_for(lambda: states and states[-1] is False, 20, what="shipper noticing the outage")
        assert shipper.pending() > 0
        postgres.start()
        wait_for(lambda: _count(postgres, "journal")[0] >= 35, 30, what="delivery after restart")
        wait_for(lambda: shipper.pending() == 0, 10, what="cursor at the end")
    finally:
        stop.set()
        thread.join(30)
        shipper.close()
    assert not thread.is_alive()
    assert states[0] is True and False in states and states[-1] is True
    assert _count(postgres, "journal") == (35, 35)
    assert _seqs(postgres, "journal") == list(range(35))


def test_sync_db_exit_75_while_database_down_then_catches_up(
        tmp_path: Path, base_config: Path, postgres: PostgresServer) -> None:
    url = postgres.create_database("journal")
    config = _config(tmp_path, base_config, url)
    spool = Spool(tmp_path / "spool").ensure()
    _emit(spool, 5)
    run_dts("log", "--sync-db", config=config, spool=spool.root, check=True)
    postgres.stop()
    _emit(spool, 7, start=5)
    proc = run_dts("log", "--sync-db", config=config, spool=spool.root)
    assert proc.returncode == 75, proc.stderr
    assert "unreachable" in proc.stderr
    assert run_dts("log", "--db", config=config, spool=spool.root).returncode == 75
    postgres.start()
    run_dts("log", "--sync-db", config=config, spool=spool.root, check=True)
    assert _count(postgres, "journal") == (12, 12)
    assert _seqs(postgres, "journal") == list(range(12))


def test_line_being_written_waits_for_its_end(tmp_path: Path, postgres: PostgresServer) -> None:
    url = postgres.create_database("journal")
    spool = Spool(tmp_path / "spool").ensure()
    _emit(spool, 2)
    log_file = sorted(spool.log_dir.glob("*.jsonl"))[0]
    half = json.dumps({"time": "2026-11-26T10:00:00.000000Z", "job": None, "stage": "watch",
                       "event": "x", "status": "info", "message": "partial", "seq": 99})
    with open(log_file, "a") as fh:
        fh.write(half[:20])
    shipper = Shipper(spool, url)
    try:
        assert shipper.ship().inserted == 2
        assert _count(postgres, "journal")[0] == 2
        with open(log_file, "a") as fh:
            fh.write(half[20:] + "\n")
        assert shipper.ship().inserted == 1
    finally:
        shipper.close()
    assert _seqs(postgres, "journal") == [0, 1, 99]


def test_log_db_reads_back_with_filters(tmp_path: Path, base_config: Path,
                                       postgres: PostgresServer) -> None:
    url = postgres.create_database("journal")
    config = _config(tmp_path, base_config, url)
    spool = Spool(tmp_path / "spool").ensure()
    _emit(spool, 6, accession="A-1")
    _emit(spool, 4, start=6, accession="A-2")
    run_dts("log", "--sync-db", config=config, spool=spool.root, check=True)
    station = Station.open(config, spool.root)
    for flt in (EventFilter(accession="A-2"), EventFilter(status=("error",)),
                EventFilter(event="matched", accession="A-1"), EventFilter()):
        from_db = list(read_db_events(station.config, flt))
        from_files = list(read_events(spool, flt))
        assert from_db == from_files, flt
        assert from_db
    proc = run_dts("log", "--db", "--accession", "A-2", "--json", config=config,
                   spool=spool.root, check=True)
    recs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["seq"] for r in recs] == [6, 7, 8, 9]
    assert {r["accession"] for r in recs} == {"A-2"}
    first_job = next(read_events(spool, EventFilter(accession="A-1")))["job"]
    proc = run_dts("log", "--db", "--job", first_job, "--status", "error", config=config,
                   spool=spool.root, check=True)
    lines = proc.stdout.splitlines()  # the errors of A-1 are events 0 and 5
    assert len(lines) == 2 and "event 0" in lines[0] and "event 5" in lines[1], lines


def test_log_db_without_url_is_a_usage_error(tmp_path: Path, base_config: Path) -> None:
    proc = run_dts("log", "--db", config=base_config, spool=tmp_path / "spool")
    assert proc.returncode == 2
    assert "[journal] url" in proc.stderr
    # --sync-db without a database has nothing to do
    assert run_dts("log", "--sync-db", config=base_config,
                   spool=tmp_path / "spool").returncode == 0
