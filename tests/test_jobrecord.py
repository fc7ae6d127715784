"""The job.json record (``dts.jobrecord``): every key documented, what the stages write
is in the record, and keys this dts does not know survive every stage that rewrites
job.json (a newer dts, or a site's own script, may have written them)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydicom.uid import generate_uid

from dts import classifier, importer, jobrecord, requeue, runner, sender
from dts.jobrecord import (
    DestinationState,
    Failure,
    JobRecord,
    OutputEntry,
    RequeueEntry,
    RunInfo,
    RunningInfo,
    Source,
    StreamVerdict,
)
from dts.journal import Event
from dts.spool import Job, Queue, Spool, State
from dts.station import Station
from tests.helpers import make_instance

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "configuration" / "classifyRules.json"
DESIGN = REPO.parent / "shared" / "DESIGN.md"  # the team's contract, beside the checkout

# What a newer dts might have written: a key of its own holding nested data.
UNKNOWN = {"x_site": {"ticket": 7, "tags": ["a", "b"], "deeper": {"n": None}}}

MODEL = r'''
import sys
from pathlib import Path
import pydicom
from pydicom.uid import generate_uid

inp, out = Path(sys.argv[1]), Path(sys.argv[2])
ds = pydicom.dcmread(sorted(inp.rglob("*.dcm"))[0])
ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
ds.SeriesInstanceUID = generate_uid()
ds.save_as(out / "result.dcm", enforce_file_format=True)
'''


def _keys(td: Any) -> set[str]:
    return set(td.__required_keys__) | set(td.__optional_keys__)


def test_every_key_is_documented_once_in_the_module_docstring() -> None:
    doc = jobrecord.__doc__ or ""
    # a key's entry: ``name`` (type) at the start of a docstring line
    documented = re.findall(r"^\s+``([a-z_]+)`` \(", doc, flags=re.MULTILINE)
    assert len(documented) == len(set(documented)), "a key is documented twice"
    assert set(documented) == _keys(JobRecord)
    assert len(documented) >= 40


def test_the_keys_of_the_design_contract_are_in_the_record() -> None:
    keys = _keys(JobRecord)
    contract = {"id", "study_uid", "patient_id", "accession", "calling_ae", "called_ae",
                "peer", "stream", "attempts", "destinations", "next_attempt_at", "children",
                "parent", "selection", "outputs", "other_files", "failure", "running",
                "orphans_stopped", "requeued", "fanout_pending", "classification",
                "duplicates", "series", "sources"}
    assert contract <= keys
    if DESIGN.is_file():  # the shared contract, where this checkout has it
        text = DESIGN.read_text()
        added = text.split("job.json keys beyond the list above:")[1].split(".\n")[0]
        assert set(re.findall(r"`([a-z_]+)`", added)) <= keys
    assert _keys(DestinationState) >= {"status", "sent", "failed"}


def test_read_write_keeps_unknown_keys(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool").ensure()
    job = spool.create_tmp_job()
    data: dict[str, Any] = {"study_uid": "1.2.3", **UNKNOWN,
                            "destinations": {"pacs": {"status": "done", "sent": ["1.2"],
                                                      "failed": {}, "x_note": "kept"}}}
    job.write(data)  # type: ignore[arg-type]  # a record with keys JobRecord does not know
    back: dict[str, Any] = dict(job.read())
    assert back["x_site"] == UNKNOWN["x_site"]
    assert back["destinations"]["pacs"]["x_note"] == "kept"
    assert back["id"] == job.id and back["updated_at"]
    assert "id" not in data  # write() does not change the caller's dict
    job.update(attempts=2)
    again: dict[str, Any] = dict(job.read())
    assert again["x_site"] == UNKNOWN["x_site"] and again["attempts"] == 2


def test_recovery_keeps_unknown_keys(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool").ensure()
    job = spool.create_tmp_job()
    data: dict[str, Any] = {"stream": "s", **UNKNOWN}
    job.write(data)  # type: ignore[arg-type]
    spool.publish(job, Queue.RUN)
    claim = spool.claim(job.id, Queue.RUN)
    assert claim is not None
    claim.release()  # the worker "dies": its job stays in run/cur, unlocked
    assert spool.recover(Queue.RUN) == [job.id]
    data = dict(Job(spool.dir(Queue.RUN, State.NEW) / job.id).read())
    assert data["x_site"] == UNKNOWN["x_site"] and data["attempts"] == 1


def _config(tmp_path: Path) -> Path:
    model = tmp_path / "model.py"
    model.write_text(MODEL)
    path = tmp_path / "dts.toml"
    path.write_text(f"""
[station]
spool = "{tmp_path / 'spool'}"
classify_rules = "{RULES}"
min_free_mb = 0

[[destination]]
name = "reports"
folder = "{tmp_path / 'reports'}"

[[stream]]
name = "seg"
command = ["{{python}}", "{model}", "{{input}}", "{{output}}"]
destinations = ["reports"]
""")
    return path


def _add(job: Job, **extra: Any) -> None:
    """What another tool wrote into a waiting job (unknown keys, here and nested)."""
    data: dict[str, Any] = dict(job.read())
    data.update(extra)
    job.write(data)  # type: ignore[arg-type]


def _read(spool: Spool, job_id: str) -> dict[str, Any]:
    return dict(Job(spool.find(job_id)[1]).read())


def _undocumented(data: dict[str, Any]) -> list[str]:
    """Keys (nested ones too) a stage wrote that the record does not describe."""
    known = {"": _keys(JobRecord), "sources": _keys(Source), "running": _keys(RunningInfo),
             "run": _keys(RunInfo), "outputs": _keys(OutputEntry), "failure": _keys(Failure),
             "destinations": _keys(DestinationState), "requeued": _keys(RequeueEntry),
             "classification": _keys(StreamVerdict)}
    bad = [k for k in data if k not in known[""] and not k.startswith("x_")]
    for key, value in data.items():
        if key not in known or key == "":
            continue
        entries = value.values() if key in ("destinations", "classification") else \
            value if isinstance(value, list) else [value]
        for entry in entries:
            bad += [f"{key}.{k}" for k in entry if k not in known[key] and not k.startswith("x_")]
    return bad


def test_unknown_keys_survive_classify_run_send_and_requeue(tmp_path: Path) -> None:
    station = Station.open(_config(tmp_path))
    spool = station.spool
    study, series = generate_uid(), generate_uid()
    src = tmp_path / "study"
    for i in range(2):
        make_instance(src / f"{i}.dcm", study_uid=study, series_uid=series, instance_number=i + 1)
    imported = importer.import_paths(station, [src], calling_ae="MODALITY")
    job_id = imported.jobs[0].job_id
    entry = {"at": "2026-11-26T10:57:00.000000Z", "by": "someone", "host": "h",
             "from": "failed", "to": "classify/new", "x_note": "kept"}
    _add(Job(spool.find(job_id)[1]), **UNKNOWN, requeued=[entry])

    # classify: the job goes to done/ with its unknown keys; the run job is made fresh
    assert classifier.serve(station, once=True).done == [job_id]
    parent = _read(spool, job_id)
    assert str(spool.find(job_id)[0]) == "done"
    assert parent["x_site"] == UNKNOWN["x_site"] and parent["requeued"] == [entry]
    child_id = parent["children"][0]
    assert "x_site" not in _read(spool, child_id)  # a new job: only identity keys inherited

    # run
    _add(Job(spool.find(child_id)[1]), **UNKNOWN)
    assert runner.serve(station, once=True).done == [child_id]
    assert str(spool.find(child_id)[0]) == "send/new"
    assert _read(spool, child_id)["x_site"] == UNKNOWN["x_site"]

    # send: an unknown key inside a destination's state stays too
    _add(Job(spool.find(child_id)[1]), x_top=1,
         destinations={"reports": {"x_note": "kept"}, "x_gone": {"status": "done"}})
    assert sender.serve(station, once=True).done == [child_id]
    data = _read(spool, child_id)
    assert str(spool.find(child_id)[0]) == "done"
    assert data["x_site"] == UNKNOWN["x_site"] and data["x_top"] == 1
    state = data["destinations"]["reports"]
    assert state["status"] == "done" and state["x_note"] == "kept" and len(state["sent"]) == 1
    assert data["destinations"]["x_gone"] == {"status": "done"}

    # requeue to send and send again: still there
    requeue.requeue(station, child_id, Queue.SEND, by="tester")
    assert sender.serve(station, once=True).done == [child_id]
    data = _read(spool, child_id)
    assert data["x_site"] == UNKNOWN["x_site"]
    assert data["destinations"]["reports"]["x_note"] == "kept"
    assert [e["by"] for e in data["requeued"]] == ["tester"]

    # what the stages wrote is all described by the record, nested objects included
    for jid in (job_id, child_id):
        assert _undocumented(_read(spool, jid)) == [], jid
    # and every event of the run is a member of the enum
    names = {e["event"] for e in Job(spool.find(child_id)[1]).events()} | \
        {e["event"] for e in Job(spool.find(job_id)[1]).events()}
    assert names <= {e.value for e in Event}
    assert {"received", "matched", "queued", "started", "finished", "send-started", "stored",
            "sent", "requeued"} <= names
