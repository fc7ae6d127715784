"""`dts classify`: study.json, streams, fan-out into run jobs, explain, guard, failures."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from dts import classifier
from dts import config as config_mod
from dts.provenance import register_produced
from dts.rules import load_rules
from dts.spool import Job, Queue, Spool, State
from dts.station import Station
from dts.studydoc import build_study
from tests.helpers import make_instance, run_dts, start_dts, station_config, stop_process, wait_for

REPO = Path(__file__).resolve().parent.parent
SEED_RULES = REPO / "configuration" / "classifyRules.json"

STREAMS = """
[[stream]]
name = "vibe"
called_ae = "^AICORE1$"
when = "length(series[?Modality=='MR']) > `1`"
select.old = "series[?SeriesDescription=='vibe_pre']"
select.new = "series[?SeriesDescription=='vibe_post']"
command = ["true"]

[[stream]]
name = "ct-only"
when = "contains(ModalitiesInStudy, 'CT')"
command = ["true"]

[[stream]]
name = "whole"
calling_ae = "^PACS$"
command = ["true"]
"""


def write_config(tmp_path: Path, streams: str = STREAMS, rules: Path = SEED_RULES) -> Path:
    return station_config(tmp_path, station={"classify_rules": str(rules)}, tail=streams)


def queue_job(spool: Spool, *, calling_ae: str = "PACS", called_ae: str = "AICORE1",
              descriptions: tuple[str, ...] = ("vibe_pre", "vibe_post", "other"),
              per_series: int = 3, **attrs: Any) -> tuple[str, dict[str, Any]]:
    """A received MR study waiting in classify/new, one series per description."""
    job = spool.create_tmp_job()
    study_uid = generate_uid()
    study: dict[str, Any] = {"series": {}, "by_description": {}}
    for number, description in enumerate(descriptions, start=1):
        uid = generate_uid()
        study["series"][uid] = []
        study["by_description"][description] = uid
        for i in range(per_series):
            sop = generate_uid()
            make_instance(job.input_dir / uid / f"{sop}.dcm", study_uid=study_uid,
                          series_uid=uid, sop_uid=sop, series_number=number,
                          instance_number=i + 1, modality="MR",
                          SeriesDescription=description, **attrs)
            study["series"][uid].append(sop)
    study["study_uid"] = study_uid
    job.write({"study_uid": study_uid, "patient_id": "PAT001", "accession": "ACC001",
               "calling_ae": calling_ae, "called_ae": called_ae, "peer": "127.0.0.1:4242",
               "received_at": "2026-11-26T10:00:00.000000Z", "stream": None, "attempts": 0,
               "error": None})
    spool.publish(job, Queue.CLASSIFY)
    return job.id, study


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    return write_config(tmp_path)


@pytest.fixture
def station(cfg: Path) -> Station:
    return Station.open(cfg)


def events(spool: Spool) -> list[dict[str, Any]]:
    return [json.loads(line) for f in sorted(spool.log_dir.glob("*.jsonl"))
            for line in f.read_text().splitlines() if line.strip()]


def test_fan_out_to_several_streams_with_hard_links(station: Station, cfg: Path) -> None:
    spool = station.spool
    jid, study = queue_job(spool)
    proc = run_dts("classify", "--once", config=cfg)
    assert proc.returncode == 0, proc.stderr
    assert f"{jid}\tdone" in proc.stdout

    parent = spool.dir(Queue.DONE) / jid
    pdata = json.loads((parent / "job.json").read_text())
    assert pdata["children"] == [f"{jid}.vibe", f"{jid}.whole"]
    assert pdata["streams"] == ["vibe", "whole"]
    assert pdata["classification"]["ct-only"]["matched"] is False
    assert sorted(spool.list(Queue.RUN, State.NEW)) == [f"{jid}.vibe", f"{jid}.whole"]

    by_desc = study["by_description"]
    vibe = spool.dir(Queue.RUN, State.NEW) / f"{jid}.vibe"
    vdata = json.loads((vibe / "job.json").read_text())
    assert vdata["stream"] == "vibe" and vdata["parent"] == jid and vdata["attempts"] == 0
    assert vdata["selection"] == {"old": [by_desc["vibe_pre"]], "new": [by_desc["vibe_post"]]}
    for key in ("study_uid", "patient_id", "accession", "calling_ae", "called_ae", "peer"):
        assert vdata[key] == pdata[key]
    # only the selected series, hard links to the parent's files
    assert sorted(p.name for p in (vibe / "input").iterdir()) == \
        sorted([by_desc["vibe_pre"], by_desc["vibe_post"]])
    for uid in (by_desc["vibe_pre"], by_desc["vibe_post"]):
        for sop in study["series"][uid]:
            a, b = vibe / "input" / uid / f"{sop}.dcm", parent / "input" / uid / f"{sop}.dcm"
            assert os.stat(a).st_ino == os.stat(b).st_ino and os.stat(a).st_nlink == 3
    assert vdata["instances"] == 6 and sorted(vdata["series"].values()) == [3, 3]
    whole = spool.dir(Queue.RUN, State.NEW) / f"{jid}.whole"
    wdata = json.loads((whole / "job.json").read_text())
    assert wdata["selection"] == {"study": sorted(study["series"],
                                                  key=list(by_desc.values()).index)}
    assert len(list((whole / "input").iterdir())) == 3

    sdoc = json.loads((parent / "study.json").read_text())
    assert json.loads((vibe / "study.json").read_text()) == sdoc
    assert sdoc["StudyInstanceUID"] == study["study_uid"]
    assert (sdoc["calling_ae"], sdoc["called_ae"], sdoc["peer"]) == \
        ("PACS", "AICORE1", "127.0.0.1:4242")
    assert sdoc["ModalitiesInStudy"] == ["MR"] and sdoc["NumImages"] == 9
    assert "PatientName" not in json.dumps(sdoc) and "Doe" not in json.dumps(sdoc)
    s0 = sdoc["series"][0]
    for key in ("SeriesInstanceUID", "SeriesNumber", "Modality", "SeriesDescription",
                "ProtocolName", "BodyPartExamined", "ImageType", "SequenceName",
                "Manufacturer", "ManufacturerModelName", "Rows", "Columns", "SliceThickness",
                "NumImages", "ClassifyType"):
        assert key in s0
    assert s0["Rows"] == 16 and s0["NumImages"] == 3 and s0["SliceThickness"] == 1.0

    evs = events(spool)
    matched = [e for e in evs if e["event"] == "matched"]
    assert sorted(e["stream"] for e in matched) == ["vibe", "whole"]
    assert all(e["job"] == jid and e["study_uid"] == study["study_uid"] for e in matched)
    queued = [e for e in evs if e["event"] == "queued"]
    assert sorted(e["job"] for e in queued) == [f"{jid}.vibe", f"{jid}.whole"]
    assert "Doe" not in json.dumps(evs)


def test_unmatched_with_reasons_and_reclassify_after_config_change(
        station: Station, cfg: Path, tmp_path: Path) -> None:
    spool = station.spool
    jid, _study = queue_job(spool, calling_ae="MODALITY", called_ae="DTS",
                           descriptions=("vibe_pre",))
    proc = run_dts("classify", "--once", config=cfg)
    assert proc.returncode == 0, proc.stderr
    assert spool.list(Queue.UNMATCHED) == [jid]
    data = Job(spool.dir(Queue.UNMATCHED) / jid).read()
    assert "called_ae 'DTS' does not match '^AICORE1$'" in data["unmatched"]["vibe"]
    assert any("ct-only" in json.dumps(e) for e in events(spool) if e["event"] == "unmatched")
    assert any("when `contains(ModalitiesInStudy, 'CT')` is false" in r
               for r in data["unmatched"]["ct-only"])
    assert any("calling_ae 'MODALITY' does not match '^PACS$'" in r
               for r in data["unmatched"]["whole"])
    # a rule change: now any calling AE may use "whole"
    cfg.write_text(cfg.read_text().replace('calling_ae = "^PACS$"', 'calling_ae = ".*"'))
    proc = run_dts("classify", jid, config=cfg)
    assert proc.returncode == 0, proc.stderr
    assert spool.list(Queue.UNMATCHED) == [] and spool.list(Queue.DONE) == [jid]
    assert spool.list(Queue.RUN, State.NEW) == [f"{jid}.whole"]
    # classifying the done job again creates a second child; the first is left alone
    first = spool.dir(Queue.RUN, State.NEW) / f"{jid}.whole" / "job.json"
    before = first.read_text()
    proc = run_dts("classify", jid, config=cfg)
    assert proc.returncode == 0, proc.stderr
    assert spool.list(Queue.RUN, State.NEW) == [f"{jid}.whole", f"{jid}.whole.2"]
    assert first.read_text() == before
    assert Job(spool.dir(Queue.DONE) / jid).read()["children"] == [f"{jid}.whole",
                                                                    f"{jid}.whole.2"]
    # a run job is not classified; an unknown job is a usage error
    proc = run_dts("classify", f"{jid}.whole", config=cfg)
    assert proc.returncode == 2 and "is in run/new" in proc.stderr
    proc = run_dts("classify", "20990101T000000.000000Z-00000000", config=cfg)
    assert proc.returncode == 2 and "no job" in proc.stderr


def test_explain_text_and_json_moves_nothing(station: Station, cfg: Path) -> None:
    spool = station.spool
    jid, _study = queue_job(spool, descriptions=("vibe_pre", "other"))
    proc = run_dts("classify", "--explain", jid, config=cfg)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "vibe: not matched" in out and "whole: MATCHED" in out
    assert "FAIL select.new `series[?SeriesDescription=='vibe_post']` selected no series" in out
    assert "ok   select.old" in out
    assert "FAIL when `contains(ModalitiesInStudy, 'CT')` is false" in out
    assert "outcome: run: whole" in out
    proc = run_dts("classify", "--explain", "--json", jid, config=cfg)
    assert proc.returncode == 0, proc.stderr
    e = json.loads(proc.stdout)
    streams = {d["stream"]: d for d in e["streams"]}
    assert streams["vibe"]["matched"] is False and streams["whole"]["matched"] is True
    assert streams["vibe"]["reasons"] == [
        "select.new `series[?SeriesDescription=='vibe_post']` selected no series (result [])"]
    assert [c["check"] for c in streams["vibe"]["checks"]] == \
        ["called_ae", "calling_ae", "when", "select.old", "select.new"]
    assert streams["whole"]["selection"] == {"study": [s["SeriesInstanceUID"]
                                                       for s in e["series"]]}
    assert e["study"]["NumImages"] == 6 and e["outcome"] == "run: whole"
    # nothing moved, nothing written
    assert spool.list(Queue.CLASSIFY, State.NEW) == [jid]
    assert not (spool.dir(Queue.CLASSIFY, State.NEW) / jid / "study.json").exists()
    assert spool.list(Queue.RUN, State.NEW) == []
    proc = run_dts("classify", "--explain", config=cfg)
    assert proc.returncode == 2 and "--explain needs" in proc.stderr


def _stream_cfg(tmp_path: Path, body: str) -> config_mod.Config:
    return config_mod.load(write_config(tmp_path, "[[stream]]\nname = \"s\"\n"
                                                  "command = [\"true\"]\n" + body))


DOC = {"calling_ae": "PACS", "called_ae": "DTS", "PatientSex": None,
       "series": [{"SeriesInstanceUID": "1.2.3", "Modality": "MR", "ClassifyType": ["A"]},
                  {"SeriesInstanceUID": "1.2.4", "Modality": "CT", "ClassifyType": []}]}


@pytest.mark.parametrize("body,matched,selection,reason", [
    ('when = "PatientSex"', False, None, "when `PatientSex` is null (null or empty: false)"),
    ("when = \"series[?Modality=='US']\"", False, None, "is [] (null or empty: false)"),
    ('when = "`0`"', True, {"study": ["1.2.3", "1.2.4"]}, None),  # jmespath: 0 is true
    ('when = "length(PatientSex) > `1`"', False, None, "when `length(PatientSex) > `1`` failed"),
    ('when = "series[0].Modality > `1`"', False, None, "failed: TypeError"),
    ("select.a = \"series[?Modality=='MR'] | [0]\"", True, {"a": ["1.2.3"]}, None),
    ("select.a = \"series[?Modality=='CT'].SeriesInstanceUID\"", True, {"a": ["1.2.4"]}, None),
    ("select.a = \"series[?Modality=='US']\"", False, None, "selected no series"),
    ("select.a = \"nothing\"", False, None, "selected no series (result null)"),
    ("select.a = \"length(series)\"", False, None, "yields 2, which is not a series"),
    ("select.a = \"series[].Modality\"", False, None, 'yields "MR", which is not a series'),
    ("select.a = \"abs(series)\"", False, None, "select.a `abs(series)` failed"),
    (("select.a = \"series[?contains(ClassifyType, 'A')]\"\n"
      "select.b = \"series[?contains(ClassifyType, 'B')]\""), False, None,
     "select.b `series[?contains(ClassifyType, 'B')]` selected no series"),
    ("called_ae = \"^DTS$\"\ncalling_ae = \"^PAC\"", True, {"study": ["1.2.3", "1.2.4"]}, None),
    ("enabled = false", False, None, "stream is disabled"),
    ("select.a = \"series[?contains(ProtocolName, 'x')]\"", False, None,
     "write e.g. `SeriesDescription || ''`"),
    ("select.a = \"series[?contains(ProtocolName || '', 'x')]\"", False, None,
     "selected no series"),
    # dts's regexp() function, as the predecessor's select statements used regexp
    ("select.a = \"series[?regexp(Modality, '^M')]\"", True, {"a": ["1.2.3"]}, None),
    ("select.a = \"series[?regexp(ClassifyType, '^A$')]\"", True, {"a": ["1.2.3"]}, None),
    ("select.a = \"series[?regexp(ProtocolName, '.*')]\"", False, None, "selected no series"),
    ("select.a = \"series[?regexp(Modality, '(')]\"", False, None, "invalid pattern '('"),
])
def test_stream_evaluation_edge_cases(tmp_path: Path, body: str, matched: bool,
                                      selection: dict[str, list[str]] | None,
                                      reason: str | None) -> None:
    stream = _stream_cfg(tmp_path, body).streams[0]
    d = classifier.evaluate_stream(stream, DOC)
    assert d.matched is matched, d.reasons
    if selection is not None:
        assert d.selection == selection
    if reason is not None:
        assert any(reason in r for r in d.reasons), d.reasons


def test_bad_jmespath_is_a_config_error_naming_the_stream(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, '[[stream]]\nname = "seg"\ncommand = ["true"]\n'
                                 'select.old = "series[?Modality=="\n')
    proc = run_dts("classify", "--once", config=cfg)
    assert proc.returncode == 2
    assert "stream.seg.select.old" in proc.stderr and "jmespath syntax error" in proc.stderr
    cfg = write_config(tmp_path, '[[stream]]\nname = "seg"\ncommand = ["true"]\n'
                                 'when = "length(series"\n')
    proc = run_dts("classify", "--once", config=cfg)
    assert proc.returncode == 2 and "stream.seg.when" in proc.stderr


def test_own_results_are_not_processed_again(station: Station, cfg: Path) -> None:
    spool = station.spool
    jid, study = queue_job(spool, descriptions=("vibe_pre", "vibe_post"))
    uid = study["by_description"]["vibe_post"]
    register_produced(spool, [study["series"][uid][0]], "20261126T090000.000000Z-aaaa.vibe")
    proc = run_dts("classify", "--once", config=cfg)
    assert proc.returncode == 0, proc.stderr
    assert spool.list(Queue.UNMATCHED) == [jid] and spool.list(Queue.RUN, State.NEW) == []
    ev = [e for e in events(spool) if e["job"] == jid and e["stage"] == "classify"]
    assert [e["event"] for e in ev] == ["own-result"]
    assert "1 of 6 instances were produced by this station" in ev[0]["message"]
    assert ev[0]["produced_by"] == ["20261126T090000.000000Z-aaaa.vibe"]
    proc = run_dts("classify", "--explain", "--json", jid, config=cfg)
    assert json.loads(proc.stdout)["outcome"] == "unmatched (own result)"


def test_unreadable_file_or_no_instances_fail_the_job(station: Station, cfg: Path) -> None:
    spool = station.spool
    jid, study = queue_job(spool, descriptions=("vibe_pre",))
    uid = next(iter(study["series"]))
    bad = spool.dir(Queue.CLASSIFY, State.NEW) / jid / "input" / uid / "1.2.3.4.dcm"
    bad.write_bytes(b"this is not DICOM at all")
    empty = spool.create_tmp_job()
    empty.input_dir.mkdir()
    empty.write({"study_uid": "1.2.3", "attempts": 0})
    spool.publish(empty, Queue.CLASSIFY)
    proc = run_dts("classify", "--once", "--json", config=cfg)
    assert proc.returncode == 1, proc.stderr
    assert sorted(json.loads(proc.stdout)["failed"]) == sorted([jid, empty.id])
    assert sorted(spool.list(Queue.FAILED)) == sorted([jid, empty.id])
    data = Job(spool.dir(Queue.FAILED) / jid).read()
    assert f"unreadable DICOM file {uid}/1.2.3.4.dcm" in data["error"]
    assert Job(spool.dir(Queue.FAILED) / empty.id).read()["error"] == "no instances in input/"
    failed = [e for e in events(spool) if e["event"] == "failed"]
    assert len(failed) == 2 and all(e["status"] == "error" for e in failed)
    # explain says why, with exit 1
    proc = run_dts("classify", "--explain", jid, config=cfg)
    assert proc.returncode == 1 and "cannot classify: unreadable DICOM file" in proc.stdout


def test_crash_mid_fan_out_adopts_published_children(station: Station,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    spool = station.spool
    jid, _study = queue_job(spool)
    real = classifier._create_child
    calls: list[str] = []

    def dies_on_second(*args: Any) -> None:
        calls.append(args[5])
        if len(calls) == 2:
            raise OSError("simulated crash after the first run job was published")
        real(*args)

    monkeypatch.setattr(classifier, "_create_child", dies_on_second)
    tally = classifier.serve(station, once=True)
    assert tally.retry == [jid] and spool.list(Queue.CLASSIFY, State.NEW) == [jid]
    assert spool.list(Queue.RUN, State.NEW) == [f"{jid}.vibe"]
    monkeypatch.setattr(classifier, "_create_child", real)
    tally = classifier.serve(station, once=True)
    assert tally.done == [jid]
    assert spool.list(Queue.RUN, State.NEW) == [f"{jid}.vibe", f"{jid}.whole"]
    data = Job(spool.dir(Queue.DONE) / jid).read()
    assert data["children"] == [f"{jid}.vibe", f"{jid}.whole"] and "fanout_pending" not in data


def test_crash_just_before_done_adopts_the_children_instead_of_doubling_them(
        station: Station, monkeypatch: pytest.MonkeyPatch) -> None:
    from dts.spool import Claim

    spool = station.spool
    jid, _study = queue_job(spool)
    real = Claim.move_keep

    def dies_before_done(self: Claim, queue: Queue, state: State | None = None) -> Path:
        if queue is Queue.DONE:
            raise OSError("simulated crash: every child published, the job not yet moved")
        return real(self, queue, state)

    monkeypatch.setattr(Claim, "move_keep", dies_before_done)
    assert classifier.serve(station, once=True).retry == [jid]
    assert spool.list(Queue.RUN, State.NEW) == [f"{jid}.vibe", f"{jid}.whole"]
    monkeypatch.setattr(Claim, "move_keep", real)
    assert classifier.serve(station, once=True).done == [jid]
    assert spool.list(Queue.RUN, State.NEW) == [f"{jid}.vibe", f"{jid}.whole"]  # no .2
    data = Job(spool.dir(Queue.DONE) / jid).read()
    assert data["children"] == [f"{jid}.vibe", f"{jid}.whole"] and "fanout_pending" not in data
    # asked for again by hand, a classification makes children of its own
    assert classifier.serve(station, job_ids=[jid]).done == [jid]
    assert spool.list(Queue.RUN, State.NEW) == [f"{jid}.vibe", f"{jid}.vibe.2",
                                                f"{jid}.whole", f"{jid}.whole.2"]


def test_heterogeneous_series_is_read_in_full(tmp_path: Path) -> None:
    """A tri-plane localizer: a sample would see one orientation, all images are read."""
    rules_path = tmp_path / "rules.json"
    rules_path.write_text(json.dumps([
        {"type": t, "rules": [{"tag": ["ImageOrientationPatient"], "operator": "approx",
                               "value": iop, "approxLevel": "0.0004"}]}
        for t, iop in (("axial", [1, 0, 0, 0, 1, 0]), ("coronal", [1, 0, 0, 0, 0, -1]),
                       ("sagittal", [0, 1, 0, 0, 0, -1]))
    ] + [{"type": "localizer", "rules": [
        {"tag": ["ClassifyType"], "value": t, "operator": "contains"}
        for t in ("axial", "coronal", "sagittal")]}]))
    rules = load_rules(rules_path)
    inp = tmp_path / "input"
    study_uid, loc_uid, uni_uid = "1.2.3", "1.2.3.1", "1.2.3.2"
    for i in range(30):
        iop = ([1.0, 0, 0, 0, 1, 0], [1.0, 0, 0, 0, 0, -1], [0.0, 1, 0, 0, 0, -1])[i % 3]
        make_instance(inp / loc_uid / f"1.2.3.1.{i}.dcm", study_uid=study_uid,
                      series_uid=loc_uid, sop_uid=f"1.2.3.1.{i}", instance_number=i + 1,
                      ImageOrientationPatient=iop, series_number=1)
    for i in range(30):
        make_instance(inp / uni_uid / f"1.2.3.2.{i}.dcm", study_uid=study_uid,
                      series_uid=uni_uid, sop_uid=f"1.2.3.2.{i}", instance_number=i + 1,
                      series_number=2)
    study = build_study(inp, {"calling_ae": "A"}, rules)
    types = {s["SeriesInstanceUID"]: s["ClassifyType"] for s in study.doc["series"]}
    assert types == {loc_uid: ["axial", "coronal", "sagittal", "localizer"],
                     uni_uid: ["axial"]}
    assert len(study.series[loc_uid].read) == 30  # all of the mixed series
    assert len(study.series[uni_uid].read) == 6  # ceil(sqrt(30)) of the uniform one
    assert study.doc["classification"]["headers_read"] == 36
    assert study.doc["series"][0]["SeriesNumber"] == 1 and study.doc["NumImages"] == 60


def test_serve_until_stopped(cfg: Path, station: Station, tmp_path: Path) -> None:
    spool = station.spool
    proc = start_dts("classify", config=cfg, log=tmp_path / "classify.log")
    try:
        jid, _ = queue_job(spool, descriptions=("vibe_pre", "vibe_post"))
        wait_for(lambda: spool.list(Queue.DONE) == [jid], timeout=30, what="classified")
        assert spool.list(Queue.RUN, State.NEW) == [f"{jid}.vibe", f"{jid}.whole"]
    finally:
        code = stop_process(proc, signal.SIGTERM)
    assert code == 0, (tmp_path / "classify.log").read_text()


def test_predecessor_select_statement_as_a_stream(tmp_path: Path) -> None:
    """select_statements.json's AIcore stream, written the two ways dts offers."""
    site_rules = json.loads(SEED_RULES.read_text()) + [
        {"type": "VIBE_OLD", "id": "VIBE_OLD", "rules": [
            {"tag": ["ProtocolName"], "value": "fl3d_vibe_tra_ 2mm_2min"},
            {"tag": ["0x0018", "0x0010"], "value": ".*Dotarem.*"}]},
        {"type": "VIBE_NEW", "rules": [
            {"tag": ["ProtocolName"], "value": "t1_vibe_dixon_tra_p2 FOV 250 _2min"},
            {"tag": ["0x0018", "0x0010"], "value": ".*Dotarem.*"}]}]
    rules = tmp_path / "classifyRules.json"
    rules.write_text(json.dumps(site_rules))
    cfg = write_config(tmp_path, """
[[stream]]
name = "AIcore-rules"
called_ae = "^AICORE1$"
select.old = "series[?contains(ClassifyType, 'VIBE_OLD')]"
select.new = "series[?contains(ClassifyType, 'VIBE_NEW')]"
image = "segm_ec_vibe:latest"

[[stream]]
name = "AIcore-regexp"
called_ae = "^AICORE1$"
select.old = "series[?regexp(ProtocolName, 'fl3d_vibe_tra_ 2mm_2min') && regexp(ContrastBolusAgent, '.*Dotarem.*')]"
select.new = "series[?regexp(ProtocolName, 't1_vibe_dixon_tra_p2 FOV 250 _2min') && regexp(ContrastBolusAgent, '.*Dotarem.*')]"
image = "segm_ec_vibe:latest"
""", rules=rules)
    station = Station.open(cfg)
    spool = station.spool
    job = spool.create_tmp_job()
    study_uid = generate_uid()
    uids = {}
    for number, (protocol, agent) in enumerate((
            ("fl3d_vibe_tra_ 2mm_2min", "Dotarem 10ml"),
            ("t1_vibe_dixon_tra_p2 FOV 250 _2min", "Dotarem 10ml"),
            ("t1_vibe_dixon_tra_p2 FOV 250 _2min", None)), start=1):
        uid = uids[number] = generate_uid()
        extra = {"ContrastBolusAgent": agent} if agent else {}
        make_instance(job.input_dir / uid / "1.2.9.1.dcm", study_uid=study_uid, series_uid=uid,
                      sop_uid=f"1.2.9.{number}", series_number=number, modality="MR",
                      Manufacturer="SIEMENS", ProtocolName=protocol, **extra)
    job.write({"study_uid": study_uid, "calling_ae": "PACS", "called_ae": "AICORE1",
               "attempts": 0})
    spool.publish(job, Queue.CLASSIFY)
    assert classifier.serve(station, once=True).done == [job.id]
    for stream in ("AIcore-rules", "AIcore-regexp"):
        child = Job(spool.dir(Queue.RUN, State.NEW) / f"{job.id}.{stream}").read()
        assert child["selection"] == {"old": [uids[1]], "new": [uids[2]]}


def test_dicom_file_without_preamble_is_read(station: Station, cfg: Path) -> None:
    spool = station.spool
    jid, study = queue_job(spool, descriptions=("vibe_pre",), per_series=1)
    (uid, (sop,)), = study["series"].items()
    path = spool.dir(Queue.CLASSIFY, State.NEW) / jid / "input" / uid / f"{sop}.dcm"
    path.write_bytes(path.read_bytes()[132:])  # no preamble, no DICM marker
    assert classifier.serve(station, once=True).done == [jid]
    doc = json.loads((spool.dir(Queue.DONE) / jid / "study.json").read_text())
    assert doc["series"][0]["SeriesDescription"] == "vibe_pre"


def test_per_image_tag_that_flips_no_clause_keeps_the_sample(tmp_path: Path) -> None:
    rules_path = tmp_path / "rules.json"
    rules_path.write_text(json.dumps([
        {"type": "upper", "rules": [{"tag": ["InstanceNumber"], "operator": ">",
                                     "value": "1000"}]},
        {"type": "numbered", "rules": [{"tag": ["InstanceNumber"], "operator": "exist"}]}]))
    rules = load_rules(rules_path)
    inp = tmp_path / "input"
    for i in range(40):
        make_instance(inp / "1.2.5" / f"1.2.5.{i}.dcm", study_uid="1.2", series_uid="1.2.5",
                      sop_uid=f"1.2.5.{i}", instance_number=i + 1)
    study = build_study(inp, {}, rules)
    # InstanceNumber differs in every image, but no clause result does: 7 of 40 read
    assert study.doc["series"][0]["ClassifyType"] == ["numbered"]
    assert study.headers_read == 7


def test_rules_broken_while_serving_jobs_wait(tmp_path: Path) -> None:
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([{"type": "a", "rules": [{"tag": ["Rows"], "value": "1"}]}]))
    station = Station.open(write_config(tmp_path, rules=rules))
    spool = station.spool
    jid, _study = queue_job(spool, descriptions=("vibe_pre",))
    rules.write_text(json.dumps([{"type": "a", "rules": [{"tag": ["Rows"], "value": "("}]}]))
    for _ in range(2):
        tally = classifier.serve(station, once=True)
        assert tally.retry == [jid] and spool.list(Queue.CLASSIFY, State.NEW) == [jid]
    errors = [e for e in events(spool) if e["event"] == "rules-error"]
    assert len(errors) == 1 and "invalid regular expression" in errors[0]["message"]
    rules.write_text(json.dumps([{"type": "a", "rules": [{"tag": ["Rows"], "value": "16"}]}]))
    assert classifier.serve(station, once=True).done == [jid]
    doc = json.loads((spool.dir(Queue.DONE) / jid / "study.json").read_text())
    assert doc["series"][0]["ClassifyType"] == ["a"]
