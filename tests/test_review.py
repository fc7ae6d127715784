"""Review before sending and shadow streams: review/ through the CLI (list, approve,
reject, the refusals), `dts status --check`'s alert, recovery of a dead decision, the
page's Approve/Reject buttons (roles, CSRF), and a shadow stream beside a live one on the
same study with Orthanc as the archive: only the live result reaches it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from dts import classifier, config, runner, sender
from dts.errors import ConfigError
from dts.journal import EventFilter, read_events
from dts.spool import Job, Queue, State, isotime, utcnow
from dts.station import Station
from dts.web.app import create_app
from tests.helpers import (
    STORESCU,
    free_port,
    make_study,
    run_dts,
    start_dts,
    station_config,
    stop_process,
    wait_for,
    wait_port,
)
from tests.plugins.peers import Orthanc
from tests.webhelpers import add_users, login

MODEL = str(Path(__file__).resolve().parent / "reviewmodel.py")


def model_stream(name: str, factor: str, **keys: Any) -> dict[str, Any]:
    """A stream running tests/reviewmodel.py (score = instances x factor; an SR built)."""
    return {"name": name, "command": ["{python}", MODEL, "{input}", "{output}"],
            "parameters": {"factor": factor}, "timeout": "1m", **keys}


def review_config(folder: Path, *, station: dict[str, Any] | None = None,
                  tail: str = "") -> Path:
    """``live`` (review = true, to a folder) and ``shadow`` (shadow = true, naming the
    same folder: it must still send nothing) on every study."""
    return station_config(
        folder, station=station,
        destinations=[{"name": "reports", "folder": str(folder / "reports")}],
        streams=[model_stream("live", "2", review=True, destinations=["reports"]),
                 model_stream("shadow", "3", shadow=True, destinations=["reports"])],
        tail=tail)


def process(station: Station, *folders: Path,
            failures: bool = False) -> dict[str, dict[str, str]]:
    """Import, classify and run each study (a failed run only if ``failures``); its run
    jobs by stream."""
    from dts import importer

    out: dict[str, dict[str, str]] = {}
    for folder in folders:
        job = importer.import_paths(station, [folder], calling_ae="PACS").jobs[0].job_id
        assert classifier.serve(station, job_ids=[job]).done == [job]
        children = Job(station.spool.find(job)[1]).read()["children"]
        out[job] = {c.rsplit(".", 1)[1]: c for c in children}
    assert bool(runner.serve(station, once=True).failed) is failures
    return out


def events(station: Station, **flt: Any) -> list[dict[str, Any]]:
    return list(read_events(station.spool, EventFilter(**flt)))


def where(station: Station, job_id: str) -> str:
    return str(station.spool.find(job_id)[0])


def test_review_approve_and_reject_through_the_cli(tmp_path: Path) -> None:
    cfg = review_config(tmp_path)
    station = Station.open(cfg)
    a = make_study(tmp_path / "a", n_series=1, per_series=2, accession="REV-A")
    b = make_study(tmp_path / "b", n_series=1, per_series=3, accession="REV-B")
    made = process(station, a["folder"], b["folder"])
    jobs = list(made.values())
    ja, jb = jobs[0]["live"], jobs[1]["live"]

    # the live stream's results wait in review/, the shadow stream's are kept in done/
    assert station.spool.list(Queue.REVIEW, State.NEW) == sorted([ja, jb])
    assert station.spool.list(Queue.SEND, State.NEW) == []
    for j in jobs:
        shadow = Job(station.spool.find(j["shadow"])[1]).read()
        assert where(station, j["shadow"]) == "done" and shadow["shadow"] is True
        assert shadow["outputs"] and shadow["results"]
    assert len(events(station, event="shadow-done")) == 2
    waiting = events(station, event="review-waiting")
    assert {e["job"] for e in waiting} == {ja, jb}
    assert all(e["stage"] == "review" and e["produced"] == {"files": 1, "sr": 1}
               for e in waiting)

    listed = json.loads(run_dts("review", "--json", config=cfg, check=True).stdout)
    assert [r["job"] for r in listed] == [ja, jb]  # the longest-waiting first
    assert listed[0]["accession"] == "REV-A" and listed[0]["stream"] == "live"
    assert listed[0]["study_uid"] == a["study_uid"]
    assert listed[0]["produced"] == {"files": 1, "sr": 1} and listed[0]["results"] == 2
    assert listed[0]["waiting_seconds"] >= 0
    plain = run_dts("review", "list", config=cfg, check=True).stdout
    assert "REV-B" in plain and "1 sr, 1 other file(s)" in plain
    status = json.loads(run_dts("status", "--json", config=cfg, check=True).stdout)
    assert status["queues"]["review"]["new"] == 2

    # not in review/: exit 2 naming where it is
    parent = next(iter(made))
    refused = run_dts("review", "approve", parent, config=cfg)
    assert refused.returncode == 2 and "is in done, not in review/" in refused.stderr
    assert run_dts("review", "approve", "20260101T000000.000000Z-00000000",
                   config=cfg).returncode == 2

    ok = run_dts("review", "approve", ja, "--by", "dr.who", "--json", config=cfg, check=True)
    assert json.loads(ok.stdout)["to"] == "send/new"
    assert where(station, ja) == "send/new"
    review = Job(station.spool.find(ja)[1]).read()["review"]
    assert review["decision"] == "approved" and review["by"] == "dr.who" and review["at"]
    assert review["waiting_since"] <= review["at"]
    (approved,) = events(station, event="approved")
    assert approved["job"] == ja and approved["by"] == "dr.who" and approved["stage"] == "review"
    again = run_dts("review", "approve", ja, config=cfg)
    assert again.returncode == 2 and "send/new" in again.stderr

    assert run_dts("review", "reject", jb, config=cfg).returncode == 2  # --reason required
    blank = run_dts("review", "reject", jb, "--reason", "  ", config=cfg)
    assert blank.returncode == 2 and "reason" in blank.stderr
    assert where(station, jb) == "review/new"
    done = run_dts("review", "reject", jb, "--reason", "left and right swapped", config=cfg,
                   check=True)
    assert "rejected by" in done.stdout and "failed" in done.stdout
    data = Job(station.spool.find(jb)[1]).read()
    assert where(station, jb) == "failed"
    assert data["review"]["decision"] == "rejected"
    assert data["review"]["reason"] == "left and right swapped"
    assert data["review"]["by"]  # the Unix user
    assert data["failure"]["reason"] == "rejected" and "left and right" in data["error"]
    (rejected,) = events(station, event="rejected")
    assert rejected["reason"] == "left and right swapped"
    # a rejected result is not sent by a requeue either
    requeued = run_dts("requeue", jb, "--to", "send", config=cfg)
    assert requeued.returncode == 2 and "rejected" in requeued.stderr
    assert run_dts("requeue", jobs[0]["shadow"], "--to", "send", config=cfg).returncode == 2

    # only the approved job is delivered
    assert sender.serve(station, once=True).done == [ja]
    delivered = sorted(p.name for p in (tmp_path / "reports").iterdir())
    assert delivered == [ja]
    assert run_dts("review", "--json", config=cfg, check=True).stdout.strip() == "[]"


def test_status_check_alerts_on_reviews_waiting_too_long(tmp_path: Path) -> None:
    cfg = review_config(tmp_path)
    station = Station.open(cfg)
    (jobs,) = process(station, make_study(tmp_path / "s", n_series=1, per_series=1)["folder"]
                      ).values()
    job = jobs["live"]
    # a fresh review does not alert, not even with a tight --max-age for the work queues
    fresh = run_dts("status", "--check", "--max-age", "1h", "--json", config=cfg)
    assert fresh.returncode == 0, fresh.stdout
    # five hours in review/ (the default review_alert_after is 4h)
    claim = station.spool.claim(job, Queue.REVIEW)
    assert claim is not None
    with claim:
        data = claim.job.read()
        data["review"] = {"waiting_since": isotime(utcnow() - timedelta(hours=5))}
        claim.job.write(data)
        claim.move(Queue.REVIEW, State.NEW)
    late = run_dts("status", "--check", "--json", config=cfg)
    assert late.returncode == 1
    st = json.loads(late.stdout)
    assert st["queues"]["review"]["oldest_seconds"] >= 5 * 3600 - 60
    (reason,) = st["attention"]
    assert reason.startswith("review:") and "review_alert_after" in reason
    assert "review_alert_after" in run_dts("status", "--check", config=cfg).stderr
    # a station that allows six hours: no alert
    relaxed = review_config(tmp_path, station={"review_alert_after": "6h"})
    assert run_dts("status", "--check", config=relaxed).returncode == 0


def test_a_decision_that_died_is_put_back_and_a_busy_one_is_refused(tmp_path: Path) -> None:
    cfg = review_config(tmp_path)
    station = Station.open(cfg)
    (jobs,) = process(station, make_study(tmp_path / "s", n_series=1, per_series=1)["folder"]
                      ).values()
    job = jobs["live"]
    claim = station.spool.claim(job, Queue.REVIEW)
    assert claim is not None and where(station, job) == "review/cur"
    busy = run_dts("review", "approve", job, config=cfg)  # the lock is held: exit 75
    assert busy.returncode == 75 and "being decided" in busy.stderr
    claim.release()  # its holder "dies": the job stays in review/cur, unlocked
    listed = json.loads(run_dts("review", "--json", config=cfg, check=True).stdout)
    assert [(r["job"], r["state"]) for r in listed] == [(job, "new")]
    assert where(station, job) == "review/new"
    (recovered,) = events(station, event="recovered")
    assert recovered["stage"] == "review"
    assert run_dts("review", "approve", job, config=cfg).returncode == 0


@pytest.mark.parametrize("keys, where_, says", [
    ({"review": True, "shadow": True}, "stream.x.review", "not both"),
    ({"review": "yes"}, "stream.x.review", "true/false"),
    ({"shadow": 1}, "stream.x.shadow", "true/false"),
])
def test_bad_review_and_shadow_keys_are_refused(tmp_path: Path, keys: dict[str, Any],
                                                where_: str, says: str) -> None:
    cfg = station_config(tmp_path, streams=[{"name": "x", "command": ["true"], **keys}])
    with pytest.raises(ConfigError) as exc:
        config.load(cfg)
    assert where_ in str(exc.value) and says in str(exc.value)
    bad = station_config(tmp_path, station={"review_alert_after": "soon"}, name="bad.toml")
    with pytest.raises(ConfigError, match="station.review_alert_after"):
        config.load(bad)
    # a shadow stream needs no destinations
    ok = station_config(tmp_path, streams=[{"name": "x", "command": ["true"], "shadow": True}],
                        name="ok.toml")
    stream = config.load(ok).stream("x")
    assert stream is not None and stream.shadow and not stream.destinations


# -- the page ----------------------------------------------------------------------------

def test_approve_and_reject_buttons_on_the_timeline(tmp_path: Path) -> None:
    cfg = review_config(tmp_path, tail='[web]\nhost = "127.0.0.1"\nport = 0\n')
    station = Station.open(cfg)
    a = make_study(tmp_path / "a", n_series=1, per_series=1, accession="WEB-A")
    b = make_study(tmp_path / "b", n_series=1, per_series=1, accession="WEB-B")
    jobs = list(process(station, a["folder"], b["folder"]).values())
    ja, jb = jobs[0]["live"], jobs[1]["live"]
    add_users(station)
    with TestClient(create_app(station)) as client:
        # a viewer sees the waiting results, but no button, and a forged POST is 403
        csrf = login(client, "vera")
        attention = client.get("/api/attention").json()["jobs"]
        assert {(r["job"], r["kind"]) for r in attention} == {(ja, "review"), (jb, "review")}
        assert all(r["requeue_to"] == [] for r in attention)
        assert "review-link" in client.get("/attention").text
        page = client.get(f"/exams/{a['study_uid']}")
        assert "waits for a person" in page.text and 'class="approve"' not in page.text
        assert client.get(f"/api/exams/{a['study_uid']}").json()["status"] == "review"
        forged = client.post("/exams/review", data={"csrf": csrf, "job": ja,
                                                    "decision": "approve"})
        assert forged.status_code == 403 and "operator" in forged.text
        client.post("/logout", data={"csrf": csrf})

        csrf = login(client, "otto")
        page = client.get(f"/exams/{a['study_uid']}")
        assert 'class="approve"' in page.text and 'class="reject"' in page.text
        form = {"job": ja, "decision": "approve"}
        assert client.post("/exams/review", data=form).status_code == 403  # no CSRF token
        assert client.post("/exams/review", data={**form, "csrf": "forged"}).status_code == 403
        assert where(station, ja) == "review/new"
        done = client.post("/exams/review", data={**form, "csrf": csrf, "reason": "fine"},
                           follow_redirects=False)
        assert done.status_code == 303, done.text
        assert done.headers["location"].startswith(f"/exams/{a['study_uid']}?reviewed=")
        assert where(station, ja) == "send/new"
        review = Job(station.spool.find(ja)[1]).read()["review"]
        assert review["by"] == "web:otto" and review["reason"] == "fine"
        again = client.post("/exams/review", data={**form, "csrf": csrf})
        assert again.status_code == 409 and "send/new" in again.text
        after = client.get(f"/exams/{a['study_uid']}").text
        assert "approved" in after and 'class="approve"' not in after

        api = {"job": jb, "decision": "reject"}
        headers = {"X-CSRF-Token": csrf}
        assert client.post("/api/review", json=api, headers=headers).status_code == 400
        assert client.post("/api/review", json={**api, "decision": "maybe"},
                           headers=headers).status_code == 400
        rejected = client.post("/api/review", json={**api, "reason": "artefacts"},
                               headers=headers)
        assert rejected.status_code == 200 and rejected.json()["to"] == "failed"
        assert where(station, jb) == "failed"
        assert client.post("/api/review", json={**api, "job": "20260101T000000.000000Z-0"},
                           headers=headers).status_code == 404
        rows = client.get("/api/attention").json()["jobs"]
        assert [(r["job"], r["kind"]) for r in rows] == [(jb, "failed")]
        assert "send" not in rows[0]["requeue_to"]  # rejected results are not requeued to send
    (approved,) = events(station, event="approved")
    assert approved["by"] == "web:otto"
    (rejected_event,) = events(station, event="rejected")
    assert rejected_event["by"] == "web:otto" and rejected_event["reason"] == "artefacts"


# -- end to end with Orthanc ------------------------------------------------------------

@pytest.mark.peers
@pytest.mark.slow
def test_a_shadow_stream_beside_a_live_one_sends_nothing_to_orthanc(
        tmp_path: Path, orthanc_factory: Callable[..., Orthanc]) -> None:
    """storescu -> dts watch (receive, classify, run, send) -> Orthanc: the study matches
    a live stream and a shadow stream that both name Orthanc; only the live result
    arrives, the shadow one is in done/ with the journal saying nothing was sent."""
    pacs = orthanc_factory("PACS")
    port = free_port()
    cfg = station_config(
        tmp_path, station={"ae_title": "DTS", "host": "127.0.0.1", "port": port,
                           "stable_seconds": 1, "rescan_seconds": 1},
        destinations=[{"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1",
                       "port": pacs.port}],
        streams=[model_stream("live", "2", destinations=["pacs"]),
                 model_stream("shadow", "3", shadow=True, destinations=["pacs"])])
    station = Station.open(cfg)
    proc = start_dts("watch", config=cfg, log=tmp_path / "watch.log")
    try:
        wait_for(lambda: any(e.get("pid") == proc.pid for e in events(
            station, event="watch-started")) or proc.poll() is not None, 30,
            what="dts watch to start")
        assert proc.poll() is None, (tmp_path / "watch.log").read_text()
        wait_port(port)
        study = make_study(tmp_path / "study", n_series=1, per_series=3, accession="SHD-1")
        sent = subprocess.run([STORESCU, "-aet", "MODALITY", "-aec", "DTS", "+sd", "+r",
                               "127.0.0.1", str(port), str(study["folder"])],
                              capture_output=True, text=True, timeout=60, check=False)
        assert sent.returncode == 0, sent.stderr

        def finished() -> bool:
            done = station.spool.list(Queue.DONE)
            return any(j.endswith(".live") for j in done) and \
                any(j.endswith(".shadow") for j in done)
        wait_for(finished, 60, what="the live and the shadow job in done/")
    finally:
        assert stop_process(proc, signal.SIGTERM, timeout=60) == 0
    done = station.spool.list(Queue.DONE)
    live = Job(station.spool.dir(Queue.DONE) / next(j for j in done if j.endswith(".live")))
    shadow = Job(station.spool.dir(Queue.DONE) / next(j for j in done if j.endswith(".shadow")))
    live_data, shadow_data = live.read(), shadow.read()
    assert live_data["destinations"]["pacs"]["status"] == "done"
    assert shadow_data["shadow"] is True and "destinations" not in shadow_data
    live_sops = {o["sop_uid"] for o in live_data["outputs"]}
    shadow_sops = {o["sop_uid"] for o in shadow_data["outputs"]}
    assert live_sops and shadow_sops and not live_sops & shadow_sops

    found = pacs.post("/tools/find", {"Level": "Instance", "Expand": True,
                                      "Query": {"StudyInstanceUID": study["study_uid"]}})
    in_pacs = {i["MainDicomTags"]["SOPInstanceUID"] for i in found}
    assert in_pacs == live_sops  # the live SR, and nothing of the shadow run
    kinds = [e["event"] for e in shadow.events()]
    assert "shadow-done" in kinds and not {"send-started", "stored", "sent"} & set(kinds)
    (said,) = [e for e in shadow.events() if e["event"] == "shadow-done"]
    assert "nothing sent" in said["message"]
    # the live job went the usual way, untouched by its shadow sibling
    assert [e["event"] for e in live.events()].count("sent") == 1
    assert live_data["results"][1]["value"] == 6.0 and shadow_data["results"][1]["value"] == 9.0


def test_a_failing_shadow_job_leaves_the_exam_of_its_live_job(tmp_path: Path) -> None:
    """The exam's status and reason are its live jobs'; the shadow job's failure is on the
    attention list all the same."""
    from dts.index import Index

    cfg = station_config(
        tmp_path, destinations=[{"name": "reports", "folder": str(tmp_path / "reports")}],
        streams=[model_stream("live", "2", destinations=["reports"]),
                 model_stream("shadow", "fail", shadow=True)])
    station = Station.open(cfg)
    study = make_study(tmp_path / "s", n_series=1, per_series=1)
    (jobs,) = process(station, study["folder"], failures=True).values()
    assert sender.serve(station, once=True).done == [jobs["live"]]
    assert where(station, jobs["shadow"]) == "failed"
    index = Index(station)
    index.sync()
    exam = index.exam(study["study_uid"])
    assert exam is not None and exam["status"] == "done" and exam["reason"] is None
    assert [(r["job"], r["kind"]) for r in index.attention()] == [(jobs["shadow"], "failed")]



def test_a_shadow_job_moved_into_send_by_hand_is_never_sent(tmp_path: Path) -> None:
    cfg = review_config(tmp_path)
    station = Station.open(cfg)
    a = make_study(tmp_path / "a", n_series=1, per_series=2, accession="REV-S")
    (jobs,) = process(station, a["folder"]).values()
    shadow = jobs["shadow"]
    # past dts requeue, which refuses it: a plain mv into send/new
    os.rename(station.spool.find(shadow)[1], station.spool.dir(Queue.SEND, State.NEW) / shadow)
    done = run_dts("send", "--once", config=cfg)
    assert done.returncode == 1, done.stderr
    assert where(station, shadow) == "failed"
    assert "shadow job is never sent" in Job(station.spool.find(shadow)[1]).read()["error"]
    reports = tmp_path / "reports"
    assert not reports.exists() or not any(reports.iterdir())
