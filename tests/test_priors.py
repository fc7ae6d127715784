"""Prior studies (``priors`` of a stream, dts/priors.py): C-FIND, the choice, C-GET and
C-MOVE against a real Orthanc, the receiver's routing of C-MOVE sub-operations, and what
misbehaving peers get (a small pynetdicom SCP in this file: another patient's instance
on a C-GET or a C-MOVE, invalid UIDs in a C-FIND answer; Orthanc does neither)."""

from __future__ import annotations

import json
import re
import sys
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dts.config import Priors, load
from dts.errors import ConfigError
from dts.priors import Candidate, Current, choose
from dts.validate import InputFacts, InvalidOutput, check_output
from tests.helpers import (
    STORESCU,
    free_port,
    make_instance,
    make_study,
    run_dts,
    start_dts,
    station_config,
    stop_process,
    wait_for,
    wait_port,
)
from tests.plugins.engine import make_run_job
from tests.plugins.peers import Orthanc

# The test "model": writes down what it saw of its priors; MODE=copy-prior also copies a
# prior instance into its output (which must never leave the station).
MODEL = r'''
import json, os, shutil, sys
from pathlib import Path
inp, out = Path(sys.argv[1]), Path(sys.argv[2])
prior = inp / "prior"
(out / "seen.json").write_text(json.dumps({
    "prior": sorted(str(p.relative_to(prior)) for p in prior.rglob("*.dcm"))
             if prior.is_dir() else None,
    "task": json.loads((inp / "task.json").read_text())}))
if os.environ.get("MODE") == "copy-prior":
    shutil.copyfile(sorted(prior.rglob("*.dcm"))[0], out / "copy.dcm")
'''


def _model(folder: Path) -> str:
    path = folder / "model.py"
    path.write_text(MODEL)
    return str(path)


def _config(tmp_path: Path, pacs_port: int, *, priors: dict[str, Any],
            pacs_ae: str = "ORTHANC", station: dict[str, Any] | None = None,
            stream: dict[str, Any] | None = None) -> Path:
    return station_config(
        tmp_path, station={"stable_seconds": 0.5, **(station or {})},
        destinations=[{"name": "pacs", "ae_title": pacs_ae, "host": "127.0.0.1",
                       "port": pacs_port}],
        streams=[{"name": "model", "command": [sys.executable, _model(tmp_path), "{input}",
                                               "{output}"],
                  "priors": {"from": "pacs", **priors}, "expect_output": True,
                  **(stream or {})}])


def _job(tmp_path: Path, **kw: Any) -> Path:
    # the current study: CT of 2026-11-26 (make_instance's StudyDate) of PAT001
    return make_run_job(tmp_path / "spool", "model", n_series=1, per_series=2, **kw)[0]


def _where(spool: Path, job_id: str) -> str:
    hits = [str(p.parent.relative_to(spool)) for p in spool.glob(f"*/*/{job_id}")]
    hits += [str(p.parent.relative_to(spool)) for p in spool.glob(f"*/{job_id}")
             if p.parent.name in ("done", "failed", "unmatched")]
    assert len(hits) == 1, hits
    return hits[0]


def _events(job: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (job / "events.jsonl").read_text().splitlines()]


# -- the archive in Orthanc ---------------------------------------------------------------


def _upload(orthanc: Orthanc, files: list[Path]) -> None:
    for f in files:
        req = urllib.request.Request(orthanc.url + "/instances", data=f.read_bytes(),
                                     method="POST")
        with urllib.request.urlopen(req, timeout=10) as rsp:
            assert rsp.status == 200


def _study(folder: Path, *, date: str, patient_id: str = "PAT001", modality: str = "CT",
           description: str = "CT THORAX", per_series: int = 1) -> dict[str, Any]:
    study = make_study(folder, n_series=1, per_series=per_series, patient_id=patient_id,
                       modality=modality, StudyDate=date, StudyDescription=description)
    study["files"] = sorted(folder.rglob("*.dcm"))
    return study


@dataclass
class Archive:
    recent: dict[str, Any]     # CT, 2025-03-10, two instances: the first prior
    older: dict[str, Any]      # CT, 2023-01-05: the second
    too_old: dict[str, Any]    # CT, 2019-01-01: beyond within = "5y"
    mr: dict[str, Any]         # MR, 2026-01-01: modality = "same" leaves it out
    other: dict[str, Any]      # CT, 2026-06-01 of PAT002: another patient, never fetched


def _archive(tmp_path: Path, orthanc: Orthanc, current: list[Path]) -> Archive:
    root = tmp_path / "archive"
    a = Archive(recent=_study(root / "recent", date="20250310", per_series=2),
                older=_study(root / "older", date="20230105"),
                too_old=_study(root / "too-old", date="20190101"),
                mr=_study(root / "mr", date="20260101", modality="MR"),
                other=_study(root / "other", date="20260601", patient_id="PAT002"))
    files = [f for s in (a.recent, a.older, a.too_old, a.mr, a.other) for f in s["files"]]
    _upload(orthanc, files + current)  # the current study itself too
    return a


def _check_fetched(job: Path, a: Archive, method: str, seen_file: Path | None = None) -> None:
    data = json.loads((job / "job.json").read_text())
    priors = data["priors"]
    assert priors["method"] == method and priors["source"] == "pacs"
    assert [s["study_uid"] for s in priors["studies"]] == [a.recent["study_uid"],
                                                          a.older["study_uid"]]
    assert [s["date"] for s in priors["studies"]] == ["20250310", "20230105"]
    assert [s["instances"] for s in priors["studies"]] == [2, 1]
    seen = json.loads((seen_file or job / "output" / "seen.json").read_text())
    expected = sorted(f"{s['study_uid']}/{series}/{sop}.dcm" for s in (a.recent, a.older)
                      for series, sops in s["series"].items() for sop in sops)
    assert seen["prior"] == expected
    listed = seen["task"]["priors"]
    assert [(p["study_uid"], p["date"], p["description"]) for p in listed] == [
        (a.recent["study_uid"], "20250310", "CT THORAX"),
        (a.older["study_uid"], "20230105", "CT THORAX")]
    assert [s["series_uid"] for s in listed[0]["series"]] == list(a.recent["series"])
    assert listed[0]["series"][0]["path"] == (f"prior/{a.recent['study_uid']}/"
                                             f"{next(iter(a.recent['series']))}")
    # the other patient's study (and the others left out) never reached the station
    on_disk = {p.name for p in (job / "prior").iterdir()}
    assert on_disk == {a.recent["study_uid"], a.older["study_uid"]}
    spool = next(p for p in job.parents if p.name == "spool")
    for study in (a.other, a.mr, a.too_old):
        assert not list(spool.rglob(f"{next(iter(study['series'].values()))[0]}.dcm"))
    events = [e["event"] for e in _events(job)]
    assert "priors-fetched" in events and events.index("priors-fetched") < events.index("started")


PRIORS = {"max": 2, "within": "5y", "modality": "same"}


def test_priors_by_c_get_from_orthanc(tmp_path: Path,
                                      orthanc_factory: Callable[..., Orthanc]) -> None:
    orthanc = orthanc_factory(modalities={"DTS": ("DTS", "127.0.0.1", free_port())})
    cfg = _config(tmp_path, orthanc.port, priors={**PRIORS, "method": "get"})
    job = _job(tmp_path)
    archive = _archive(tmp_path, orthanc, sorted((job / "input").rglob("*.dcm")))
    proc = run_dts("run", "--once", config=cfg)
    assert proc.returncode == 0, proc.stderr
    job = tmp_path / "spool" / "send" / "new" / job.name
    _check_fetched(job, archive, "get")
    assert not list((tmp_path / "spool" / "tmp").glob(".prior-*"))


def test_priors_by_c_move_through_the_receiver(tmp_path: Path,
                                               orthanc_factory: Callable[..., Orthanc]) -> None:
    port = free_port()
    orthanc = orthanc_factory(modalities={"DTS": ("DTS", "127.0.0.1", port)})
    cfg = _config(tmp_path, orthanc.port, priors={**PRIORS, "method": "move"},
                  station={"port": port, "host": "127.0.0.1"})
    job = _job(tmp_path)
    archive = _archive(tmp_path, orthanc, sorted((job / "input").rglob("*.dcm")))
    spool = tmp_path / "spool"
    # without a receiver a C-MOVE has nowhere to go: a temporary failure, counted
    proc = run_dts("run", "--once", config=cfg)
    assert proc.returncode == 75, proc.stderr
    assert "no receiver runs" in json.loads((spool / "run/new" / job.name / "job.json")
                                           .read_text())["last_error"]
    receiver = start_dts("receive", config=cfg, log=tmp_path / "receive.log")
    try:
        wait_port(port)
        proc = run_dts("run", "--once", config=cfg)
        assert proc.returncode == 0, proc.stderr
    finally:
        stop_process(receiver)
    job = spool / "send" / "new" / job.name
    _check_fetched(job, archive, "move")
    # routed to the job, never into incoming/ or a classification of their own
    assert not list((spool / "incoming").iterdir())
    assert not list((spool / "classify" / "new").iterdir())
    assert not any(e.get("event") == "received" for e in _station_log(spool))
    assert [p.name for p in (spool / "priors").iterdir()] == ["expect"]  # staging gone
    assert list((spool / "priors" / "expect").iterdir()) == []  # and the expectation


@pytest.mark.slow
def test_priors_end_to_end_with_dts_watch(tmp_path: Path,
                                          orthanc_factory: Callable[..., Orthanc]) -> None:
    """storescu -> dts watch (receiver, classify, run with priors by C-MOVE into its own
    receiver, send to a folder): the priors arrive in the same process, are routed to
    the run job, and never become a study of their own."""
    port = free_port()
    orthanc = orthanc_factory(modalities={"DTS": ("DTS", "127.0.0.1", port)})
    box = tmp_path / "box"
    cfg = station_config(
        tmp_path, station={"stable_seconds": 0.5, "port": port, "host": "127.0.0.1"},
        destinations=[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                       "port": orthanc.port}, {"name": "box", "folder": str(box)}],
        streams=[{"name": "model", "command": [sys.executable, _model(tmp_path), "{input}",
                                               "{output}"],
                  "priors": {"from": "pacs", **PRIORS, "method": "move"},
                  "destinations": ["box"]}])
    current = _study(tmp_path / "current", date="20261126", per_series=2)
    archive = _archive(tmp_path, orthanc, current["files"])
    spool = tmp_path / "spool"
    watch = start_dts("watch", config=cfg, log=tmp_path / "watch.log")
    try:
        wait_port(port)
        _storescu(port, "MODALITY", current["files"])
        done = wait_for(lambda: list((spool / "done").glob("*.model")), 60,
                        what="the run job in done/")
    finally:
        stop_process(watch)
    seen = list(box.rglob("seen.json"))
    assert len(seen) == 1, (tmp_path / "watch.log").read_text()[-3000:]
    _check_fetched(done[0], archive, "move", seen_file=seen[0])
    received = [e for e in _station_log(spool) if e["event"] == "received"]
    assert [e["study_uid"] for e in received] == [current["study_uid"]]
    assert not list((spool / "unmatched").iterdir()) and not list((spool / "incoming").iterdir())


def _station_log(spool: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for f in sorted((spool / "log").glob("*.jsonl"))
            for line in f.read_text().splitlines()]


def test_pacs_down_is_a_temporary_failure(tmp_path: Path) -> None:
    cfg = _config(tmp_path, free_port(), priors={"method": "get"})
    job = _job(tmp_path)
    proc = run_dts("run", "--once", config=cfg)
    assert proc.returncode == 75, proc.stderr
    data = json.loads((tmp_path / "spool/run/new" / job.name / "job.json").read_text())
    assert data["attempts"] == 1 and "cannot reach pacs" in data["last_error"]
    assert [e["event"] for e in _events(tmp_path / "spool/run/new" / job.name)] == ["retry"]


# -- a peer that misbehaves on purpose ----------------------------------------------------


@dataclass
class FakePacs:
    """A small pynetdicom Q/R SCP: C-FIND answers ``answers``; C-GET and C-MOVE send
    ``files`` (whatever study was asked for)."""

    ae_title: str
    port: int
    answers: list[Dataset] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    moves: dict[str, tuple[str, int]] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)


@pytest.fixture
def fake_pacs() -> Iterator[Callable[..., FakePacs]]:
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        CTImageStorage,
        StudyRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelGet,
        StudyRootQueryRetrieveInformationModelMove,
    )

    servers: list[Any] = []

    def start(ae_title: str = "FAKEPACS") -> FakePacs:
        peer = FakePacs(ae_title, free_port())
        ae = AE(ae_title)
        for model in (StudyRootQueryRetrieveInformationModelFind,
                      StudyRootQueryRetrieveInformationModelGet,
                      StudyRootQueryRetrieveInformationModelMove):
            ae.add_supported_context(model)
        ae.add_supported_context(CTImageStorage, ALL_TRANSFER_SYNTAXES, scu_role=True,
                                 scp_role=True)
        ae.add_requested_context(CTImageStorage)  # for C-MOVE's own association

        def on_find(event: Any) -> Iterator[tuple[int, Dataset | None]]:
            peer.requests.append("find")
            for ds in peer.answers:
                yield 0xFF00, ds

        def on_get(event: Any) -> Iterator[Any]:
            peer.requests.append("get")
            yield len(peer.files)
            for f in peer.files:
                yield 0xFF00, pydicom.dcmread(f)

        def on_move(event: Any) -> Iterator[Any]:
            peer.requests.append("move")
            dest = event.move_destination
            dest = (dest.decode() if isinstance(dest, bytes) else str(dest)).strip()
            yield peer.moves.get(dest, (None, None))
            yield len(peer.files)
            for f in peer.files:
                yield 0xFF00, pydicom.dcmread(f)

        servers.append(ae.start_server(("127.0.0.1", peer.port), block=False, evt_handlers=[
            (evt.EVT_C_FIND, on_find), (evt.EVT_C_GET, on_get), (evt.EVT_C_MOVE, on_move)]))
        return peer

    yield start
    for server in servers:
        server.shutdown()


def _answer(study_uid: str, *, date: str = "20250310", patient_id: str = "PAT001",
            modalities: str = "CT") -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientID = patient_id
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = date
    ds.StudyTime = "101500"
    ds.StudyDescription = "CT THORAX"
    ds.ModalitiesInStudy = modalities
    return ds


def test_c_find_answers_with_invalid_uids_are_ignored_and_logged(
        tmp_path: Path, fake_pacs: Callable[..., FakePacs]) -> None:
    pacs = fake_pacs()
    good = _study(tmp_path / "good", date="20250310")
    pacs.answers = [_answer("1.2.3/../../etc"), _answer("1.2.abc"), _answer(good["study_uid"])]
    pacs.files = good["files"]
    cfg = _config(tmp_path, pacs.port, pacs_ae=pacs.ae_title, priors={"method": "get"})
    job = _job(tmp_path)
    proc = run_dts("run", "--once", config=cfg)
    assert proc.returncode == 0, proc.stderr
    job = tmp_path / "spool/send/new" / job.name
    data = json.loads((job / "job.json").read_text())
    assert [s["study_uid"] for s in data["priors"]["studies"]] == [good["study_uid"]]
    assert data["priors"]["ignored"] == 2
    fetched = next(e for e in _events(job) if e["event"] == "priors-fetched")
    assert fetched["status"] == "warning"
    assert "ignored 2 C-FIND answer(s)" in fetched["message"]
    assert "'1.2.abc' is not a valid UID" in fetched["message"]
    assert sorted(p.name for p in (tmp_path / "spool").rglob("*") if "etc" in p.name) == []


def test_a_c_get_delivering_another_patient_fails_the_job(
        tmp_path: Path, fake_pacs: Callable[..., FakePacs]) -> None:
    pacs = fake_pacs()
    prior = _study(tmp_path / "prior", date="20250310")
    stranger = make_instance(tmp_path / "stranger.dcm", study_uid=prior["study_uid"],
                             series_uid=generate_uid(), patient_id="PAT002")
    pacs.answers = [_answer(prior["study_uid"])]
    pacs.files = [prior["files"][0], stranger]
    cfg = _config(tmp_path, pacs.port, pacs_ae=pacs.ae_title, priors={"method": "get"})
    job = _job(tmp_path)
    proc = run_dts("run", "--once", config=cfg)
    assert proc.returncode == 1, proc.stderr
    job = tmp_path / "spool/failed" / job.name
    failure = json.loads((job / "job.json").read_text())["failure"]
    sop = pydicom.dcmread(stranger).SOPInstanceUID
    assert failure["reason"] == "priors"
    assert f"instance {sop}: its PatientID is another patient's" in failure["message"]
    assert "PAT002" not in failure["message"]
    assert not (job / "prior").exists() and not (job / ".prior-fetch").exists()
    assert "started" not in [e["event"] for e in _events(job)]  # the model never ran


def test_a_c_move_delivering_another_patient_is_refused_by_the_receiver(
        tmp_path: Path, fake_pacs: Callable[..., FakePacs]) -> None:
    port = free_port()
    pacs = fake_pacs()
    pacs.moves = {"DTS": ("127.0.0.1", port)}
    prior = _study(tmp_path / "prior", date="20250310")
    stranger = make_instance(tmp_path / "stranger.dcm", study_uid=prior["study_uid"],
                             series_uid=generate_uid(), patient_id="PAT002")
    pacs.answers = [_answer(prior["study_uid"])]
    pacs.files = [prior["files"][0], stranger]
    cfg = _config(tmp_path, pacs.port, pacs_ae=pacs.ae_title, priors={"method": "move"},
                  station={"port": port, "host": "127.0.0.1"})
    job = _job(tmp_path)
    spool = tmp_path / "spool"
    receiver = start_dts("receive", config=cfg, log=tmp_path / "receive.log")
    try:
        wait_port(port)
        proc = run_dts("run", "--once", config=cfg)
    finally:
        stop_process(receiver)
    assert proc.returncode == 1, proc.stderr
    failure = json.loads((spool / "failed" / job.name / "job.json").read_text())["failure"]
    sop = pydicom.dcmread(stranger).SOPInstanceUID
    assert failure["reason"] == "priors"
    assert f"instance {sop} of study {prior['study_uid']}: its PatientID is another " \
           "patient's" in failure["message"]
    refused = [e for e in _station_log(spool) if e["event"] == "instance-refused"]
    assert [e["sop_uid"] for e in refused] == [sop] and refused[0]["dimse_status"] == "0xC000"
    assert not list((spool / "incoming").iterdir())  # the good one went nowhere else either
    assert list((spool / "priors" / "expect").iterdir()) == []


def test_a_prior_copied_to_the_output_never_leaves(
        tmp_path: Path, fake_pacs: Callable[..., FakePacs]) -> None:
    pacs = fake_pacs()
    prior = _study(tmp_path / "prior", date="20250310")
    pacs.answers = [_answer(prior["study_uid"])]
    pacs.files = prior["files"]
    cfg = _config(tmp_path, pacs.port, pacs_ae=pacs.ae_title, priors={"method": "get"},
                  stream={"allow_new_study": True, "parameters": {"MODE": "copy-prior"}})
    job = _job(tmp_path)
    proc = run_dts("run", "--once", config=cfg)
    assert proc.returncode == 1, proc.stderr
    failure = json.loads((tmp_path / "spool/failed" / job.name / "job.json").read_text())
    assert failure["failure"]["reason"] == "invalid-output"
    assert [v["rule"] for v in failure["failure"]["violations"]] == ["prior-instance"]


def test_no_prior_runs_without_or_waits_when_required(
        tmp_path: Path, fake_pacs: Callable[..., FakePacs]) -> None:
    pacs = fake_pacs()
    pacs.answers = [_answer(generate_uid(), date="20270101")]  # later than the study: no prior
    cfg = _config(tmp_path, pacs.port, pacs_ae=pacs.ae_title, priors={"method": "get"})
    job = _job(tmp_path)
    assert run_dts("run", "--once", config=cfg).returncode == 0
    sent = tmp_path / "spool/send/new" / job.name
    seen = json.loads((sent / "output" / "seen.json").read_text())
    assert seen["prior"] == [] and seen["task"]["priors"] == []
    assert json.loads((sent / "job.json").read_text())["priors"]["studies"] == []
    assert "priors-missing" in [e["event"] for e in _events(sent)]
    assert pacs.requests == ["find"]
    # required: a temporary failure until the attempts are spent, then failed naming it
    cfg = _config(tmp_path, pacs.port, pacs_ae=pacs.ae_title,
                  priors={"method": "get", "required": True}, station={"max_attempts": 2})
    job = _job(tmp_path)
    proc = run_dts("run", "--once", config=cfg)
    assert proc.returncode == 75, proc.stderr
    proc = run_dts("run", "--once", config=cfg)
    assert proc.returncode == 1, proc.stderr
    failure = json.loads((tmp_path / "spool/failed" / job.name / "job.json").read_text())
    assert failure["failure"]["reason"] == "priors-missing"
    assert "required, but no earlier study" in failure["failure"]["message"]
    assert "gave up after 2 attempts" in failure["failure"]["message"]


# -- the receiver's side of a C-MOVE, and dts clean ---------------------------------------


def _storescu(port: int, calling: str, files: list[Path]) -> str:
    """storescu (it stops at the first refused instance: one call per batch)."""
    import subprocess

    proc = subprocess.run([STORESCU, "-aet", calling, "-aec", "DTS", "127.0.0.1", str(port)]
                          + [str(f) for f in files], capture_output=True, text=True,
                          timeout=60, check=False)
    return proc.stdout + proc.stderr


def test_the_receiver_routes_only_what_is_expected(tmp_path: Path) -> None:
    from dts.expectations import expect
    from dts.spool import Spool

    port = free_port()
    cfg = _config(tmp_path, free_port(), priors={"method": "move"},
                  station={"port": port, "host": "127.0.0.1"})
    spool = Spool(tmp_path / "spool").ensure()
    prior = _study(tmp_path / "prior", date="20250310", per_series=2)
    stranger = make_instance(tmp_path / "stranger.dcm", study_uid=prior["study_uid"],
                             series_uid=generate_uid(), patient_id="PAT002")
    ordinary = _study(tmp_path / "ordinary", date="20250310")
    expect(spool, prior["study_uid"], "JOB1.model", "PAT001", "ORTHANC")
    receiver = start_dts("receive", config=cfg, log=tmp_path / "receive.log")
    try:
        wait_port(port)
        _storescu(port, "ORTHANC", prior["files"] + [stranger])
        _storescu(port, "ORTHANC", ordinary["files"])
        _storescu(port, "OTHER", prior["files"][:1])  # the expected study from someone else
        wait_for(lambda: list((spool.root / "classify/new").iterdir()), 20,
                 what="the ordinary study published")
    finally:
        stop_process(receiver)
    staged = spool.priors / "JOB1.model" / prior["study_uid"]
    assert sorted(p.stem for p in staged.rglob("*.dcm")) == sorted(
        sop for sops in prior["series"].values() for sop in sops)
    refused = [e for e in _station_log(spool.root) if e["event"] == "instance-refused"]
    assert [(e["calling_ae"], e["dimse_status"]) for e in refused] == [
        ("ORTHANC", "0xC000"), ("OTHER", "0xA700")]
    assert "another patient's" in refused[0]["reason"]
    assert "being retrieved as a prior from ORTHANC" in refused[1]["reason"]
    published = [json.loads((p / "job.json").read_text())["study_uid"]
                 for p in (spool.root / "classify/new").iterdir()]
    assert published == [ordinary["study_uid"]]
    notes = (spool.priors / "JOB1.model" / "refused.jsonl").read_text()
    assert pydicom.dcmread(stranger).SOPInstanceUID in notes and "PAT002" not in notes
    # the expectation outlived its run stage (nobody holds JOB1.model): dts clean
    proc = run_dts("clean", "--older-than", "30d", "--json", config=cfg)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["priors_removed"] == [
        f"expect/{prior['study_uid']}/JOB1.model.json", "JOB1.model"]
    assert list(spool.priors.iterdir()) == [spool.priors / "expect"]
    assert list((spool.priors / "expect").iterdir()) == []


def test_stale_expectations_are_ignored_and_swept(tmp_path: Path) -> None:
    from dts.expectations import expect, expected, route, sweep
    from dts.spool import Spool

    spool = Spool(tmp_path / "spool").ensure()
    study = generate_uid()
    path = expect(spool, study, "JOB2.model", "PAT001", "ORTHANC", seconds=-1)
    assert expected(str(spool.priors / "expect"), study)
    header = {"study_uid": study, "series_uid": generate_uid(), "sop_uid": generate_uid(),
              "patient_id": "PAT001"}
    assert route(spool, str(spool.tmp), "ORTHANC", header, "/nonexistent") is None
    assert sweep(spool) == [f"expect/{study}/JOB2.model.json"]
    assert not path.exists() and not path.parent.exists()


# -- configuration and the choice ------------------------------------------------------------


def _load_priors(tmp_path: Path, priors: Any, **stream: Any) -> Any:
    cfg = station_config(
        tmp_path, destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                                 "port": 104}, {"name": "box", "folder": str(tmp_path)}],
        streams=[{"name": "m", "command": ["true"], "priors": priors, **stream}])
    return load(cfg).streams[0].priors


@pytest.mark.parametrize(("priors", "key", "reason"), [
    ({}, "priors.from", "need from"),
    ({"from": "nowhere"}, "priors.from", "'nowhere' is not a configured DICOM destination"),
    ({"from": "box"}, "priors.from", "(configured: pacs)"),
    ({"from": "pacs", "max": 0}, "priors.max", "1 to 20"),
    ({"from": "pacs", "within": "5 years"}, "priors.within", "not a duration"),
    ({"from": "pacs", "within": "11y"}, "priors.within", "longer than ten years"),
    ({"from": "pacs", "modality": ["ct"]}, "priors.modality", "modality codes"),
    ({"from": "pacs", "modality": "(CT"}, "priors.modality", "invalid regular expression"),
    ({"from": "pacs", "description": "[x"}, "priors.description", "invalid regular"),
    ({"from": "pacs", "method": "push"}, "priors.method", "\"get\" (C-GET) or \"move\""),
    ({"from": "pacs", "required": "yes"}, "priors.required", "true/false"),
    ({"from": "pacs", "maximum": 2}, "priors.maximum", "unknown key"),
])
def test_priors_keys_are_checked(tmp_path: Path, priors: dict[str, Any], key: str,
                                 reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        _load_priors(tmp_path, priors)
    assert err.value.key == f"stream.m.{key}"
    assert reason in err.value.reason


def test_priors_keys_parse_and_conflicts(tmp_path: Path) -> None:
    p = _load_priors(tmp_path, {"from": "pacs", "max": 3, "within": "5y",
                                "modality": ["CT", "MR"], "description": "(?i)thorax",
                                "method": "move", "required": True})
    assert (p.source, p.max, p.within, p.method, p.required) == (
        "pacs", 3, 5 * 365.25 * 86400, "move", True)
    assert p.modality == ("CT", "MR") and p.modality_pattern.fullmatch("MR")
    assert _load_priors(tmp_path, {"from": "pacs"}) == Priors(source="pacs")
    with pytest.raises(ConfigError, match=re.escape("stream.m.select.prior: the selection "
                                                    "name 'prior' is taken")):
        _load_priors(tmp_path, {"from": "pacs"}, select={"prior": "series"})
    # dts config show prints them as written, and that loads again
    from dts.config import effective

    cfg = station_config(tmp_path, destinations=[{"name": "pacs", "ae_title": "PACS",
                                                  "host": "127.0.0.1", "port": 104}],
                         streams=[{"name": "m", "command": ["true"], "priors": {
                             "from": "pacs", "modality": ["CT"], "within": "2y"}}])
    shown = effective(load(cfg))["stream"][0]["priors"]
    assert shown["from"] == "pacs" and shown["modality"] == ["CT"]
    assert "modality_pattern" not in shown and "source" not in shown


def _c(uid: str, date: str, modalities: tuple[str, ...] = ("CT",),
       description: str = "CT THORAX") -> Candidate:
    return Candidate(study_uid=uid, date=date, time="120000", description=description,
                     modalities=modalities)


def test_choose_the_most_recent_matching_earlier_studies() -> None:
    current = Current(study_uid="1.9", patient_id="P", date="20261126", time="101500",
                      modalities=frozenset({"CT", "SR"}))
    found = [_c("1.1", "20200101"), _c("1.2", "20250310"), _c("1.3", "20230105"),
             _c("1.9", "20261126"), _c("1.4", "20270101"), _c("1.5", "20260101", ("MR",)),
             _c("1.6", ""), _c("1.7", "20261126", description="HEAD"),
             _c("1.8", "20180101"), _c("1.10", "20260601", description="HEAD")]
    same = Priors(source="p", max=2, within=5 * 365.25 * 86400)
    assert [c.study_uid for c in choose(found, current, same)] == ["1.10", "1.2"]
    wide = Priors(source="p", max=10, modality="any")
    assert [c.study_uid for c in choose(found, current, wide)] == [
        "1.10", "1.5", "1.2", "1.3", "1.1", "1.8"]  # 1.7: later the same day (12:00 > 10:15)
    mr = Priors(source="p", max=10, modality=("MR",), modality_pattern=re.compile("MR"))
    assert [c.study_uid for c in choose(found, current, mr)] == ["1.5"]
    thorax = Priors(source="p", max=10, modality="any", description=re.compile("THORAX"),
                    within=2 * 365.25 * 86400)
    assert [c.study_uid for c in choose(found, current, thorax)] == ["1.5", "1.2"]


def test_output_in_a_prior_study_is_refused_even_with_allow_new_study(tmp_path: Path) -> None:
    out = tmp_path / "output"
    prior_study = generate_uid()
    make_instance(out / "r.dcm", study_uid=prior_study, series_uid=generate_uid())
    facts = InputFacts(study_uids={generate_uid()}, patient_ids={"PAT001"},
                       prior_study_uids={prior_study})
    with pytest.raises(InvalidOutput) as err:
        check_output(out, facts, allow_new_study=True)
    assert [v.rule for v in err.value.violations] == ["prior-study"]
    facts.prior_study_uids = set()
    assert len(check_output(out, facts, allow_new_study=True).dicom) == 1
