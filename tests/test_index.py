"""dts.index: the journal shipped into SQL (SQLite in the spool) and the tables the page
reads, built from a real pipeline driven through the CLI (dts import, classify, run,
send to a folder), a failure, a requeue, and a rebuild from the journal files."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from dts.errors import UsageError
from dts.index import ExamQuery, Index, index_path
from dts.journal import Event, EventFilter, Stage, Status
from dts.metrics import render
from dts.spool import Job
from dts.station import Station
from tests.helpers import make_study, run_dts, station_config
from tests.plugins.database import PostgresServer


def _config(tmp_path: Path, command: list[str] | None = None) -> Path:
    return station_config(
        tmp_path, station={"ae_title": "DTS", "stable_seconds": 1},
        destinations=[{"name": "reports", "folder": str(tmp_path / "reports")}],
        streams=[{"name": "stats",
                  "command": command or ["{python}", "-m", "dts.examples.series_statistics",
                                         "{input}", "{output}"],
                  "timeout": "2m", "destinations": ["reports"]}])


def _pipeline(config: Path, folder: Path) -> None:
    for args in (("import", str(folder)), ("classify", "--once"), ("run", "--once"),
                 ("send", "--once")):
        done = run_dts(*args, config=config)
        assert done.returncode in (0, 1), (args, done.stderr)


def _study(tmp_path: Path, name: str, **kw: Any) -> dict[str, Any]:
    return make_study(tmp_path / name, n_series=1, per_series=2, **kw)


@pytest.fixture
def station(tmp_path: Path) -> Station:
    config = _config(tmp_path)
    return Station.open(config)


def test_a_delivered_study_is_one_exam_row_with_its_turnaround(tmp_path: Path,
                                                               station: Station) -> None:
    study = _study(tmp_path, "a", accession="ACC-A", patient_id="PID-A")
    _pipeline(station.config.path, study["folder"])
    index = Index(station)
    assert index.sync() > 0
    page = index.exams(ExamQuery())
    assert page.total == 1
    (row,) = page.rows
    assert row["study_uid"] == study["study_uid"]
    assert row["accession"] == "ACC-A" and row["patient_id"] == "PID-A"
    assert row["status"] == "done", row
    assert row["streams"] == ["stats"]
    assert row["instances"] == 2
    assert len(row["jobs"]) == 2  # the received job and its run job
    assert row["turnaround_seconds"] is not None and row["turnaround_seconds"] >= 0
    assert row["study_date"]  # from study.json
    assert index.sync() == 0  # nothing new: nothing read


def test_search_filters_and_pages(tmp_path: Path, station: Station) -> None:
    uids = []
    for i in range(3):
        s = _study(tmp_path, f"s{i}", accession=f"ACC-{i}", patient_id=f"PID-{i}")
        uids.append(s["study_uid"])
        _pipeline(station.config.path, s["folder"])
    index = Index(station)
    index.sync()
    assert index.exams(ExamQuery()).total == 3
    assert [r["accession"] for r in index.exams(ExamQuery(text="ACC-1")).rows] == ["ACC-1"]
    assert [r["study_uid"] for r in index.exams(ExamQuery(text="PID-2")).rows] == [uids[2]]
    assert [r["study_uid"] for r in index.exams(ExamQuery(text=uids[0])).rows] == [uids[0]]
    job = index.exam(uids[1])["jobs"][-1]  # type: ignore[index]
    assert [r["study_uid"] for r in index.exams(ExamQuery(text=job)).rows] == [uids[1]]
    assert index.exams(ExamQuery(status="failed")).total == 0
    assert index.exams(ExamQuery(stream="stats")).total == 3
    assert index.exams(ExamQuery(stream="other")).total == 0
    assert index.exams(ExamQuery(calling_ae="NOBODY")).total == 0
    newest_first = index.exams(ExamQuery(per_page=2))
    assert newest_first.total == 3 and len(newest_first.rows) == 2
    assert newest_first.rows[0]["study_uid"] == uids[2]
    assert [r["study_uid"] for r in index.exams(ExamQuery(page=2, per_page=2)).rows] == [uids[0]]


@pytest.mark.parametrize("params,name", [({"status": "lost"}, "status"),
                                         ({"page": "0"}, "page"), ({"page": "x"}, "page"),
                                         ({"per_page": "100000"}, "per_page"),
                                         ({"since": "yesterday-ish"}, "since"),
                                         ({"q": "a\x00b"}, "q")])
def test_a_malformed_query_names_the_parameter(params: dict[str, str], name: str) -> None:
    with pytest.raises(UsageError, match=f"'{name}'"):
        ExamQuery.parse(params)


def test_query_parse_reads_every_parameter() -> None:
    q = ExamQuery.parse({"q": " ACC ", "status": "done", "stream": "s", "calling_ae": "PACS",
                         "since": "2h", "until": "2026-12-01T00:00:00Z", "page": "3",
                         "per_page": "10"})
    assert (q.text, q.status, q.stream, q.calling_ae, q.page, q.per_page) == \
        ("ACC", "done", "s", "PACS", 3, 10)
    assert q.since is not None and q.until is not None


def test_a_failed_run_shows_its_reason_then_a_requeue_its_new_state(tmp_path: Path) -> None:
    config = _config(tmp_path, command=["false"])
    station = Station.open(config)
    study = _study(tmp_path, "f")
    _pipeline(config, study["folder"])
    index = Index(station)
    index.sync()
    (row,) = index.exams(ExamQuery(status="failed")).rows
    assert row["reason"]
    (attention,) = index.attention()
    assert attention["kind"] == "failed" and attention["study_uid"] == study["study_uid"]
    assert attention["reason"] and "run" in attention["requeue_to"]
    assert "send" not in attention["requeue_to"]  # nothing to send
    done = run_dts("requeue", attention["job"], "--to", "run", config=config)
    assert done.returncode == 0, done.stderr
    index.sync()
    assert index.exam(study["study_uid"])["status"] == "running"  # type: ignore[index]
    assert index.attention() == []


def test_the_timeline_tells_every_stage_in_order(tmp_path: Path, station: Station) -> None:
    study = _study(tmp_path, "t")
    _pipeline(station.config.path, study["folder"])
    index = Index(station)
    index.sync()
    tl = index.timeline(study["study_uid"])
    assert tl is not None and tl["status"] == "done"
    kinds = [e["kind"] for e in tl["entries"]]
    for kind in ("association", "classification", "run", "delivery"):
        assert kind in kinds, kinds
    assert kinds.index("association") < kinds.index("classification") < kinds.index("run") \
        < kinds.index("delivery")
    times = [e["time"] for e in tl["entries"]]
    assert times == sorted(times)
    received = next(e for e in tl["entries"] if e["kind"] == "association")
    assert received["details"]["sources"][0]["calling_ae"] is None  # an import
    run = next(e for e in tl["entries"] if e["event"] == "finished")
    assert run["details"]["run"]["exit_code"] == 0
    delivery = next(e for e in tl["entries"] if e["event"] == "sent")
    assert delivery["details"]["destinations"]["reports"]["status"] == "done"
    assert set(tl["explanations"]) == {tl["jobs"][0]["id"]}
    assert {j["queue"] for j in tl["jobs"]} == {"done"}
    assert index.timeline("1.2.3.4.5") is None


def test_deleting_the_index_rebuilds_the_same_from_the_journal(tmp_path: Path,
                                                              station: Station) -> None:
    for i in range(2):
        _pipeline(station.config.path, _study(tmp_path, f"r{i}")["folder"])
    index = Index(station)
    index.sync()
    before = index.exams(ExamQuery()).as_dict()
    totals = index.totals()
    index.close()
    for f in index_path(station).parent.iterdir():
        f.unlink()
    again = Index(station)
    assert again.sync() > 0
    assert again.exams(ExamQuery()).as_dict() == before
    assert again.totals() == totals


def test_lines_read_twice_change_nothing(tmp_path: Path, station: Station) -> None:
    _pipeline(station.config.path, _study(tmp_path, "d")["folder"])
    index = Index(station)
    index.sync()
    totals = index.totals()
    (index_path(station).parent / "cursor.json").unlink()  # the cursor lost
    index.sync()
    assert index.totals() == totals
    assert index.exams(ExamQuery()).total == 1


def test_overview_counts_today_and_the_last_28_days(tmp_path: Path, station: Station) -> None:
    _pipeline(station.config.path, _study(tmp_path, "o")["folder"])
    index = Index(station)
    index.sync()
    ov = index.overview()
    assert len(ov["events_per_day"]) == 28
    assert ov["events_per_day"][-1]["total"] > 0
    assert ov["today"]["studies"] == 1 and ov["today"]["instances"] == 2
    assert ov["today"]["median_turnaround_seconds"] is not None
    assert ov["queues"]["done"]["count"] == 2
    assert ov["services"]["receiver"]["running"] is False
    assert ov["disk"]["free_mb"] > 0
    json.dumps(ov)  # the API serves it as it is


def test_events_newest_first_with_filters(tmp_path: Path, station: Station) -> None:
    study = _study(tmp_path, "e")
    _pipeline(station.config.path, study["folder"])
    index = Index(station)
    index.sync()
    events = index.events(EventFilter(study=study["study_uid"]))
    assert events and events[0]["event"] == "sent"
    assert [e["time"] for e in events] == sorted((e["time"] for e in events), reverse=True)
    assert index.events(EventFilter(stage="run"), limit=1)[0]["stage"] == "run"


def test_metrics_in_prometheus_text(tmp_path: Path, station: Station) -> None:
    _pipeline(station.config.path, _study(tmp_path, "m")["folder"])
    index = Index(station)
    index.sync()
    body, content_type = render(station, index)
    text = body.decode()
    assert content_type.startswith("text/plain")
    assert "dts_instances_received_total 2.0" in text
    assert "dts_studies_received_total 1.0" in text
    assert 'dts_deliveries_total{status="ok"} 1.0' in text
    assert 'dts_stage_duration_seconds_count{stage="run"} 1.0' in text
    assert 'dts_stage_duration_seconds_count{stage="send"} 1.0' in text
    assert 'dts_turnaround_seconds_bucket{le="+Inf"} 1.0' in text
    assert 'dts_jobs{queue="done",state=""} 2.0' in text
    assert 'dts_service_up{service="receiver"} 0.0' in text
    from prometheus_client.parser import text_string_to_metric_families
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"dts_instances_received", "dts_turnaround_seconds", "dts_jobs"} <= names


def test_no_patient_name_in_the_index(tmp_path: Path, station: Station) -> None:
    _pipeline(station.config.path, _study(tmp_path, "n")["folder"])
    Index(station).sync()
    db = sqlite3.connect(index_path(station))
    dump = "\n".join(db.iterdump())
    assert "Doe^Jane" not in dump and "Doe" not in dump
    assert "PAT001" in dump  # the patient ID is there, for the search


def test_the_index_in_postgresql_when_journal_url_is_set(tmp_path: Path,
                                                        postgres: PostgresServer) -> None:
    """[journal] url: the same tables in the journal database, beside dts_events."""
    url = postgres.create_database("index")
    config = station_config(
        tmp_path, station={"ae_title": "DTS", "stable_seconds": 1},
        destinations=[{"name": "reports", "folder": str(tmp_path / "reports")}],
        streams=[{"name": "stats", "command": ["{python}", "-m",
                                               "dts.examples.series_statistics", "{input}",
                                               "{output}"], "destinations": ["reports"]}],
        tail=f'[journal]\nurl = "{url}"\n')
    station = Station.open(config)
    study = _study(tmp_path, "pg", accession="ACC-PG")
    _pipeline(config, study["folder"])
    index = Index(station)
    assert not index.embedded and not index_path(station).exists()
    index.sync()
    (row,) = index.exams(ExamQuery(text="ACC-PG")).rows
    assert row["status"] == "done" and row["study_uid"] == study["study_uid"]
    assert index.exams(ExamQuery(stream="stats", status="done")).total == 1
    assert postgres.query("index", "select count(*) from dts_exams") == [["1"]]
    tl = index.timeline(study["study_uid"])
    assert tl is not None and [e for e in tl["entries"] if e["event"] == "sent"]
    body, _ = render(station, index)
    assert b"dts_studies_received_total 1.0" in body


def test_the_calling_ae_of_an_import_is_the_exams(tmp_path: Path, station: Station) -> None:
    study = _study(tmp_path, "c")
    done = run_dts("import", "--calling-ae", "PACS", str(study["folder"]),
                   config=station.config.path)
    assert done.returncode == 0, done.stderr
    index = Index(station)
    index.sync()
    (row,) = index.exams(ExamQuery(calling_ae="PACS")).rows
    assert row["study_uid"] == study["study_uid"] and row["calling_ae"] == "PACS"


def test_a_study_whose_every_instance_was_refused_is_no_exam(station: Station) -> None:
    """Events with a study but no job (refusals, page views) make no exam row, and do
    not stop the index."""
    uid = "1.2.826.0.1.3680043.8.498.1"
    station.journal.emit(Stage.RECEIVE, Event.INSTANCE_REFUSED, Status.ERROR,
                         "refused an instance with 0xA700: disk full", study_uid=uid)
    index = Index(station)
    assert index.sync() == 1
    assert index.exam(uid) is None and index.exams(ExamQuery()).total == 0
    assert index.events(EventFilter(study=uid))[0]["event"] == "instance-refused"
    assert index.totals()[("instances_refused", "status=?")] == 1


def test_what_the_page_did_is_no_work_on_the_exam(tmp_path: Path, station: Station) -> None:
    """Web events name the study (and a rule test its job): the exam keeps its jobs and
    its status."""
    study = _study(tmp_path, "w")
    _pipeline(station.config.path, study["folder"])
    index = Index(station)
    index.sync()
    before = index.exam(study["study_uid"])
    assert before is not None and before["status"] == "done"
    station.journal.emit(Stage.WEB, Event.RULE_TEST, Status.INFO, "otto tested the rules",
                         job=Job(tmp_path / "20261202T000000.000000Z-00000000"),
                         study_uid=study["study_uid"], user="otto")
    station.journal.emit(Stage.WEB, Event.TIMELINE_VIEWED, Status.INFO, "otto looked",
                         study_uid=study["study_uid"], user="otto")
    assert index.sync() == 2
    after = index.exam(study["study_uid"])
    assert after is not None
    assert (after["status"], after["jobs"]) == ("done", before["jobs"])
