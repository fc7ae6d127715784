"""Structured results (docs/results.md): a dts-contract model's ``results.json`` checked
after the run, recorded in job.json ``results`` and as ``result`` events, and shipped into
the journal database's ``dts_results`` (PostgreSQL)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dts import runner
from dts.jobrecord import ResultEntry
from dts.results import InvalidResults, read_results
from dts.spool import Job, Queue, Spool, State
from dts.station import Station
from tests.helpers import run_dts, station_config
from tests.plugins.database import PostgresServer
from tests.plugins.engine import make_run_job

WRITE = ("import json, os, sys; "
         "open(os.path.join(sys.argv[1], 'results.json'), 'w').write(os.environ['RESULTS'])")


def _run(tmp_path: Path, results: Any, *, url: str | None = None) -> tuple[Station, Job]:
    path, _ = make_run_job(tmp_path / "spool", "measure", n_series=1, per_series=1,
                           accession="ACC-R1")
    text = results if isinstance(results, str) else json.dumps(results)
    config = station_config(tmp_path, streams=[{
        "name": "measure", "command": ["{python}", "-c", WRITE, "{output}"],
        "parameters": {"RESULTS": text}}],
        tail=f'[journal]\nurl = "{url}"\n' if url else "")
    station = Station.open(config)
    runner.serve(station, once=True)
    return station, Job(Spool(tmp_path / "spool").find(path.name)[1])


GOOD = {"measurements": [
    {"name": "tumor_size", "value": 42.5, "unit": "mm"},
    {"name": "finding", "value": "no lesion"},
    {"name": "lesions", "value": 3, "unit": "{count}"}],
    "report": {"kept": "for the result builder"}}


def test_results_json_is_recorded_in_job_json_and_the_journal(tmp_path: Path) -> None:
    _, job = _run(tmp_path, GOOD)
    assert job.path.parent.name == "new" and job.path.parent.parent.name == "send"
    data = job.read()
    assert data["results"] == [
        {"name": "tumor_size", "value": 42.5, "unit": "mm", "source": "results.json"},
        {"name": "finding", "value": "no lesion", "unit": None, "source": "results.json"},
        {"name": "lesions", "value": 3, "unit": "{count}", "source": "results.json"}]
    assert data["other_files"] == ["results.json"] and data["outputs"] == []
    events = [e for e in job.events() if e["event"] == "result"]
    assert [e["message"] for e in events] == ["tumor_size = 42.5 mm", "finding = no lesion",
                                              "lesions = 3 {count}"]
    assert {e["accession"] for e in events} == {"ACC-R1"}
    assert {e["stream"] for e in events} == {"measure"}


@pytest.mark.parametrize("results,where", [
    ("{not json", "results.json: not valid JSON"),
    ([1, 2], "results.json: must be a JSON object"),
    ({"measurements": {"a": 1}}, "results.json: measurements: must be a list"),
    ({"measurements": [{"name": "x"}]}, "results.json: measurements[0]: value is missing"),
    ({"measurements": [{"name": "a", "value": 1}, {"name": "", "value": 2}]},
     "results.json: measurements[1]: name must be a non-empty string"),
    ({"measurements": [{"name": "a", "value": {"b": 1}}]},
     "results.json: measurements[0]: value must be a number, a string or true/false"),
    ({"measurements": [{"name": "a", "value": 1, "unit": 5}]},
     "results.json: measurements[0]: unit must be a non-empty string"),
    ({"measurements": [{"name": "a", "value": 1, "series_uid": "1.2.x"}]},
     "results.json: measurements[0]: series_uid '1.2.x' is not a valid UID"),
    ('{"measurements": [{"name": "a", "value": NaN}]}', "results.json: not valid JSON"),
])
def test_malformed_results_fail_the_job_and_nothing_is_sent(tmp_path: Path, results: Any,
                                                            where: str) -> None:
    _, job = _run(tmp_path, results)
    assert job.path.parent.name == "failed"
    data = job.read()
    assert data["failure"]["reason"] == "invalid-results"
    assert where in data["error"], data["error"]
    assert "results" not in data
    assert Spool(tmp_path / "spool").list(Queue.SEND, State.NEW) == []
    assert not [e for e in job.events() if e["event"] == "result"]


def test_a_failed_rerun_keeps_no_results_of_the_run_before(tmp_path: Path) -> None:
    station, job = _run(tmp_path, GOOD)
    assert job.read()["results"]
    config = station.config.path
    config.write_text(config.read_text().replace(json.dumps(json.dumps(GOOD))[1:-1],
                                                 "[1]"))
    run_dts("requeue", job.id, "--to", "run", config=config, check=True)
    run_dts("run", "--once", config=config)
    failed = Job(Spool(tmp_path / "spool").find(job.id)[1])
    assert failed.path.parent.name == "failed"
    assert "results" not in failed.read() and "invalid-results" in str(failed.read()["failure"])


def test_ror_output_json_shapes(tmp_path: Path) -> None:
    rec = {"record_id": "P1", "event_name": "baseline", "field_name": "tumor_size",
           "value": "42"}
    (tmp_path / "output.json").write_text(json.dumps([rec, {**rec, "record_id": 7}]))
    got: list[ResultEntry] = read_results(tmp_path, "ror")
    assert [(r["name"], r["record_id"]) for r in got] == [("tumor_size", "P1"),
                                                          ("tumor_size", "7")]
    assert "key" not in got[0]
    (tmp_path / "output.json").write_text(json.dumps({"a": rec, "version": 2}))
    with pytest.raises(InvalidResults, match=r'output.json: record "version": must be an '
                                             r'object with record_id'):
        read_results(tmp_path, "ror")
    assert read_results(tmp_path, "dts") == []  # a ror file means nothing to a dts stream


def _rows(pg: PostgresServer, db: str) -> list[list[str]]:
    return pg.query(db, "select study_uid, accession, stream, job, name, value, "
                        "coalesce(value_number::text, ''), coalesce(unit, ''), source, "
                        "time is not null from dts_results order by id")


def test_results_reach_dts_results_in_postgresql_once(tmp_path: Path,
                                                      postgres: PostgresServer) -> None:
    url = postgres.create_database("results")
    station, job = _run(tmp_path, GOOD, url=url)
    data = job.read()
    proc = run_dts("log", "--sync-db", config=station.config.path)
    assert proc.returncode == 0, proc.stderr
    rows = _rows(postgres, "results")
    common = [data["study_uid"], "ACC-R1", "measure", job.id]
    assert rows == [common + ["tumor_size", "42.5", "42.5", "mm", "results.json", "t"],
                    common + ["finding", "no lesion", "", "", "results.json", "t"],
                    common + ["lesions", "3", "3", "{count}", "results.json", "t"]]
    # "tumor size per accession", as the old prediction table answered it
    assert postgres.query("results", "select accession, value_number from dts_results "
                                     "where name = 'tumor_size'") == [["ACC-R1", "42.5"]]
    # shipped again (cursor lost): no row twice
    (station.spool.log_dir / ".dbcursor").unlink()
    run_dts("log", "--sync-db", config=station.config.path, check=True)
    assert len(_rows(postgres, "results")) == 3
    assert postgres.query("results", "select count(*) from dts_events where event = "
                                     "'result'") == [["3"]]
