"""`dts replay` and `dts compare` on two streams with different parameters: the studies
a live stream processed run again through a new version (switched off for live traffic),
as shadow jobs, the originals untouched; compare marks where their results differ."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from dts import classifier, importer, runner, sender
from dts.cli import cli
from dts.journal import EventFilter, read_events
from dts.spool import Job, Queue, State
from dts.station import Station
from tests.helpers import make_study, run_dts, station_config
from tests.test_review import model_stream


def two_versions(folder: Path, **v2: Any) -> Path:
    """``v1`` (factor 2, live, to a folder) and ``v2`` (factor 3, not matched live:
    ``enabled = false``), both on every study."""
    return station_config(
        folder, destinations=[{"name": "reports", "folder": str(folder / "reports")}],
        streams=[model_stream("v1", "2", destinations=["reports"]),
                 model_stream("v2", "3", enabled=False, destinations=["reports"], **v2)])


def live(station: Station, *studies: dict[str, Any]) -> list[str]:
    """Each study through import, classify, run and send; the received job ids."""
    ids = []
    for study in studies:
        job = importer.import_paths(station, [study["folder"]], calling_ae="PACS").jobs[0].job_id
        assert classifier.serve(station, job_ids=[job]).done == [job]
        ids.append(job)
    assert not runner.serve(station, once=True).failed
    assert not sender.serve(station, once=True).failed
    return ids


def snapshot(station: Station) -> dict[str, str]:
    """Every file of done/ with a digest: what "untouched" means."""
    out = {}
    root = station.spool.dir(Queue.DONE)
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_replay_through_a_new_version_then_compare(tmp_path: Path) -> None:
    cfg = two_versions(tmp_path)
    station = Station.open(cfg)
    a = make_study(tmp_path / "a", n_series=1, per_series=2, accession="RP-A")
    b = make_study(tmp_path / "b", n_series=2, per_series=2, accession="RP-B")
    received = live(station, a, b)
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == \
        sorted(f"{j}.v1" for j in received)
    before = snapshot(station)

    done = run_dts("replay", "--stream", "v2", "--since", "1d", "--json", config=cfg,
                   check=True)
    report = json.loads(done.stdout)
    assert report["shadow"] is True and not report["failed"] and not report["skipped"]
    made = {m["replay_of"]: m["job"] for m in report["made"]}
    assert set(made) == set(received)  # one per study: from its received job
    assert snapshot(station) == before  # the originals are only read
    for src, job_id in made.items():
        assert job_id.endswith(".v2") and station.spool.list(Queue.RUN, State.NEW).count(job_id)
        data = Job(station.spool.find(job_id)[1]).read()
        assert data["replay_of"] == src and data["parent"] == src and data["shadow"] is True
        assert data["stream"] == "v2" and data["study_uid"] in (a["study_uid"], b["study_uid"])
        new_input = Job(station.spool.find(job_id)[1]).input_dir
        old_input = Job(station.spool.find(src)[1]).input_dir
        for f in new_input.rglob("*.dcm"):  # hard links, never copies
            assert f.stat().st_ino == (old_input / f.parent.name / f.name).stat().st_ino
        assert (new_input.parent / "study.json").read_bytes() == \
            (old_input.parent / "study.json").read_bytes()
    replayed = list(read_events(station.spool, EventFilter(event="replayed")))
    assert {e["job"] for e in replayed} == set(made.values())

    assert not runner.serve(station, once=True).failed
    for job_id in made.values():
        assert str(station.spool.find(job_id)[0]) == "done"  # shadow: kept, not sent
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == \
        sorted(f"{j}.v1" for j in received)
    assert station.spool.list(Queue.SEND, State.NEW) == []

    cmp = json.loads(run_dts("compare", "v1", "v2", "--json", config=cfg, check=True).stdout)
    assert cmp["studies"] == 2 and cmp["differing"] == 2
    rows = {r["accession"]: r for r in cmp["rows"]}
    for acc, n in (("RP-A", 2), ("RP-B", 4)):
        results = {r["name"]: r for r in rows[acc]["results"]}
        assert results["instances"] == {**results["instances"], "a": n, "b": n, "same": True}
        assert results["score"]["a"] == 2.0 * n and results["score"]["b"] == 3.0 * n
        assert results["score"]["same"] is False and results["score"]["delta"] == n
        assert rows[acc]["produced"] == [{"kind": "files", "a": 1, "b": 1, "same": True},
                                         {"kind": "sr", "a": 1, "b": 1, "same": True}]
        assert rows[acc]["b"]["shadow"] is True and rows[acc]["a"]["shadow"] is False
    plain = run_dts("compare", "v1", "v2", config=cfg, check=True).stdout
    score = [line.split("\t") for line in plain.splitlines() if "\tscore\t" in line]
    assert sorted(s[3:] for s in score) == [["4", "6", "yes"], ["8", "12", "yes"]]
    # nothing finished since a minute from now
    assert json.loads(run_dts("compare", "v1", "v2", "--since", "2099-01-01T00:00:00Z",
                              "--json", config=cfg, check=True).stdout)["studies"] == 0
    assert run_dts("compare", "v1", "v1", config=cfg).returncode == 2
    assert run_dts("compare", "v1", "v9", config=cfg).returncode == 2


def test_replay_by_job_live_and_the_refusals(tmp_path: Path) -> None:
    cfg = two_versions(tmp_path)
    station = Station.open(cfg)
    a = make_study(tmp_path / "a", n_series=1, per_series=1, accession="RP-A")
    b = make_study(tmp_path / "b", n_series=1, per_series=1, accession="RP-B")
    ja, jb = live(station, a, b)

    # a run job named: replayed from its study (the received job's input)
    done = run_dts("replay", "--stream", "v2", "--live", f"{ja}.v1", "--json", config=cfg,
                   check=True)
    (made,) = json.loads(done.stdout)["made"]
    data = Job(station.spool.find(made["job"])[1]).read()
    assert made["shadow"] is False and "shadow" not in data and data["replay_of"] == f"{ja}.v1"
    assert data["parent"] == ja
    assert not runner.serve(station, job_ids=[made["job"]]).failed
    assert str(station.spool.find(made["job"])[0]) == "send/new"  # a live run goes on

    # the input was cleaned: exit 1 naming the job, the others still replayed
    shutil.rmtree(Job(station.spool.find(jb)[1]).input_dir)
    shutil.rmtree(Job(station.spool.find(f"{jb}.v1")[1]).input_dir)
    gone = run_dts("replay", "--stream", "v2", jb, ja, config=cfg)
    assert gone.returncode == 1
    assert f"failed: job {jb}: its input was removed" in gone.stderr
    assert gone.stdout.count("shadow replay of") == 1 and ja in gone.stdout
    since = run_dts("replay", "--stream", "v2", "--since", "1d", "--json", config=cfg)
    assert since.returncode == 1
    assert [f["job"] for f in json.loads(since.stdout)["failed"]] == [jb]

    # usage errors: exit 2, nothing made
    queued = len(station.spool.list(Queue.RUN, State.NEW))
    for args, says in (
            (["--stream", "nope", ja], "no stream 'nope'"),
            (["--stream", "v2"], "either job ids or --since"),
            (["--stream", "v2", "--since", "1d", ja], "either job ids or --since"),
            (["--stream", "v2", "--since", "soon"], "--since"),
            (["--stream", "v2", "20260101T000000.000000Z-00000000"], "no job"),
            (["--stream", "v2", made["job"]], "is in send/new: only finished jobs")):
        refused = CliRunner().invoke(cli, ["--config", str(cfg), "replay", *args])
        assert refused.exit_code == 2 and says in refused.output, (args, refused.output)
    assert len(station.spool.list(Queue.RUN, State.NEW)) == queued


def test_replay_of_a_stream_that_does_not_match_and_live_on_a_shadow_stream(
        tmp_path: Path) -> None:
    cfg = two_versions(tmp_path, when="AccessionNumber == 'ONLY-THIS'")
    station = Station.open(cfg)
    (ja,) = live(station, make_study(tmp_path / "a", n_series=1, per_series=1,
                                     accession="RP-A"))
    named = run_dts("replay", "--stream", "v2", ja, config=cfg)
    assert named.returncode == 1 and "does not match" in named.stderr and ja in named.stderr
    since = json.loads(run_dts("replay", "--stream", "v2", "--since", "1d", "--json",
                               config=cfg, check=True).stdout)
    assert since["made"] == [] and since["skipped"][0]["job"] == ja
    shadowy = station_config(
        tmp_path, name="shadow.toml",
        streams=[model_stream("v1", "2"), model_stream("s", "3", shadow=True)])
    refused = run_dts("replay", "--stream", "s", "--live", ja, config=shadowy)
    assert refused.returncode == 2 and "shadow stream" in refused.stderr


@pytest.mark.parametrize("per", ["series"])
def test_replay_of_a_per_series_stream_makes_one_job_per_series(tmp_path: Path,
                                                                per: str) -> None:
    cfg = two_versions(tmp_path, per=per)
    station = Station.open(cfg)
    (ja,) = live(station, make_study(tmp_path / "a", n_series=2, per_series=1))
    report = json.loads(run_dts("replay", "--stream", "v2", ja, "--json", config=cfg,
                                check=True).stdout)
    jobs = sorted(m["job"] for m in report["made"])
    assert [j.rsplit(".", 1)[1] for j in jobs] == ["s1", "s2"]
    assert all(len(Job(station.spool.find(j)[1]).read()["series"]) == 1 for j in jobs)
