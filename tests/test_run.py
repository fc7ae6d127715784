"""dts run with the command executor: the run contract, failures, output validation,
recovery after kill -9, parallel runs. The container engine is in test_run_docker.py."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from dts import runner
from dts.spool import Job, Queue, Spool, State
from dts.station import Station
from dts.validate import InputFacts, InvalidOutput, check_output
from tests.helpers import make_instance, run_dts, start_dts, station_config, stop_process, wait_for
from tests.plugins.engine import make_run_job

# The test "model": a Python script that the stream runs through {python}; MODE (a
# stream parameter, so an environment variable) picks what it does.
MODEL = r'''
import json, os, sys, time
from pathlib import Path
import pydicom
from pydicom.uid import generate_uid

inp, out = Path(sys.argv[1]), Path(sys.argv[2])
mode = os.environ["MODE"]
(out / "seen.json").write_text(json.dumps({
    "argv": sys.argv, "cwd": os.getcwd(),
    "env": {k: v for k, v in os.environ.items() if k.startswith("DTS_") or k in ("MODE", "level")},
    "files": sorted(str(p.relative_to(inp)) for p in inp.rglob("*") if p.is_file()),
    "task": json.loads((inp / "task.json").read_text())}))
print("model: mode", mode, flush=True)

def result(**changes):
    src = sorted(inp.rglob("*.dcm"))[0]
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    for k, v in changes.items():
        setattr(ds, k, v)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(out / "result.dcm", enforce_file_format=True)
    return src

if mode == "ok":
    result()
elif mode == "fail":
    print("model: loading weights", flush=True)
    print("model: RuntimeError: out of luck", file=sys.stderr)
    sys.exit(3)
elif mode == "sleep":
    import subprocess
    child = subprocess.Popen(["sleep", "600"])
    for name, pid in (("child.pid", child.pid), ("model.pid", os.getpid())):
        # written whole, then renamed: the test never reads half a number
        (out.parent / (name + ".tmp")).write_text(str(pid))
        os.rename(out.parent / (name + ".tmp"), out.parent / name)
    time.sleep(600)
elif mode == "empty":
    (out / "seen.json").unlink()
elif mode == "foreign-study":
    result(StudyInstanceUID=generate_uid())
elif mode == "new-study":
    result(StudyInstanceUID=generate_uid())
elif mode == "foreign-patient":
    result(PatientID="SOMEONE-ELSE")
elif mode == "reused-sop":
    src = result()
    ds = pydicom.dcmread(src)
    ds.save_as(out / "copy-of-input.dcm")
elif mode == "symlink":
    result()
    os.symlink("/etc/passwd", out / "secret.txt")
elif mode == "garbage":
    (out / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10")
elif mode == "rendezvous":
    # finishes only if another job runs at the same time (max_parallel_runs = 2)
    meet = Path(os.environ["MEET"])
    (meet / os.environ["DTS_JOB"]).touch()
    deadline = time.monotonic() + 30
    while len(list(meet.iterdir())) < 2:
        if time.monotonic() > deadline:
            sys.exit("nobody else came")
        time.sleep(0.02)
    result()
'''


def write_config(tmp_path: Path, mode: str, *, extra: str = "", station_extra: str = "",
                 parameters: dict[str, str] | None = None, timeout: str = "60s") -> Path:
    model = tmp_path / "model.py"
    model.write_text(MODEL)
    params = {"MODE": mode, "level": "7", **(parameters or {})}
    return station_config(tmp_path, station_text=station_extra, streams=[{
        "name": "model",
        "command": ["{python}", str(model), "{input}", "{output}", "--job={job}", "{literal}"],
        "parameters": params, "timeout": timeout}], stream_text=extra)


def station_for(config: Path) -> Station:
    return Station.open(config)


def where(spool: Path, job_id: str) -> str:
    return str(Spool(spool).find(job_id)[0])


def produced(spool: Path) -> list[str]:
    d = spool / "produced"
    return sorted(os.listdir(d)) if d.is_dir() else []


def test_success_follows_the_run_contract(tmp_path: Path) -> None:
    config = write_config(tmp_path, "ok")
    spool = tmp_path / "spool"
    job_path, study = make_run_job(spool, "model")
    job_id = job_path.name

    proc = run_dts("--config", str(config), "run", "--once", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["done"] == [job_id]
    assert where(spool, job_id) == "send/new"
    job = Job(spool / "send" / "new" / job_id)
    data = job.read()

    # what the processing saw: argv placeholders, environment, the input view, task.json
    seen = json.loads((job.output_dir / "seen.json").read_text())
    running = spool / "run" / "cur" / job_id  # where the job was while it ran
    view, output = str(running / "view"), str(running / "output")
    assert seen["argv"][1:] == [view, output, f"--job={job_id}", "{literal}"]
    assert seen["cwd"] == output
    assert seen["env"]["MODE"] == "ok" and seen["env"]["level"] == "7"
    assert json.loads(seen["env"]["DTS_PARAMETERS"]) == {"MODE": "ok", "level": "7"}
    assert seen["env"]["DTS_INPUT"] == view
    assert seen["env"]["DTS_OUTPUT"] == output
    assert seen["env"]["DTS_JOB"] == job_id
    expected = sorted(f"main/{s}/{sop}.dcm" for s, sops in study["series"].items()
                      for sop in sops) + ["task.json"]
    assert seen["files"] == expected
    task = seen["task"]
    assert task["job"] == job_id and task["stream"] == "model"
    assert task["selection"] == {"main": list(study["series"])}
    assert task["study"]["StudyInstanceUID"] == study["study_uid"]
    assert task["parameters"] == {"MODE": "ok", "level": "7"}
    # the view was made of hard links and is gone afterwards
    assert not (job.path / "view").exists()

    # what job.json records for the sender, and the provenance
    [out] = data["outputs"]
    ds = pydicom.dcmread(job.output_dir / "result.dcm")
    assert out == {"file": "result.dcm", "sop_uid": ds.SOPInstanceUID,
                   "sop_class": ds.SOPClassUID, "transfer_syntax": ds.file_meta.TransferSyntaxUID,
                   "study_uid": study["study_uid"], "series_uid": ds.SeriesInstanceUID}
    assert data["other_files"] == ["seen.json"]
    assert data["run"]["exit_code"] == 0 and data["run"]["executor"] == "command"
    assert data["run"]["command"][0] == sys.executable
    assert data["run"]["duration_seconds"] >= 0
    assert "running" not in data
    assert produced(spool) == [ds.SOPInstanceUID]
    assert "model: mode ok" in (job.logs_dir / "run-stdout.log").read_text()
    events = [(e["event"], e["status"]) for e in job.events() if e["stage"] == "run"]
    assert events == [("started", "info"), ("finished", "ok")]


def test_input_view_uses_hard_links(tmp_path: Path) -> None:
    config = write_config(tmp_path, "ok")
    spool = tmp_path / "spool"
    job_path, study = make_run_job(spool, "model", n_series=1, per_series=2)
    station = station_for(config)
    stream = station.config.stream("model")
    assert stream is not None
    job = Job(job_path)
    view = runner.build_view(job, job.read(), stream)
    series = next(iter(study["series"]))
    for sop in study["series"][series]:
        original = job.input_dir / series / f"{sop}.dcm"
        linked = view / "main" / series / f"{sop}.dcm"
        assert os.stat(original).st_ino == os.stat(linked).st_ino


def test_nonzero_exit_fails_with_reason_and_log_tail(tmp_path: Path) -> None:
    config = write_config(tmp_path, "fail")
    spool = tmp_path / "spool"
    job_path, _ = make_run_job(spool, "model")
    proc = run_dts("--config", str(config), "run", "--once")
    assert proc.returncode == 1
    assert f"{job_path.name}\tfailed" in proc.stdout
    data = Job(spool / "failed" / job_path.name).read()
    assert data["failure"]["reason"] == "exit-code"
    assert "exited with code 3" in data["error"]
    assert "RuntimeError: out of luck" in data["error"]
    assert "out of luck" in data["failure"]["log_tail"]
    assert data["run"]["exit_code"] == 3
    assert not (spool / "failed" / job_path.name / "view").exists()
    [ev] = [e for e in Job(spool / "failed" / job_path.name).events() if e["event"] == "failed"]
    assert ev["status"] == "error" and ev["reason"] == "exit-code"
    assert produced(spool) == []


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    config = write_config(tmp_path, "sleep", timeout="2s")
    spool = tmp_path / "spool"
    job_path, _ = make_run_job(spool, "model")
    tally = runner.serve(station_for(config), once=True)
    assert tally.failed == [job_path.name]
    failed = spool / "failed" / job_path.name
    data = Job(failed).read()
    assert data["failure"]["reason"] == "timeout"
    assert "timeout (2 s)" in data["error"]
    child = int((failed / "child.pid").read_text())
    wait_for(lambda: not _alive(child), timeout=10, what="the model's child to be killed")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_empty_output_fails_unless_expected(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    job_path, _ = make_run_job(spool, "model")
    tally = runner.serve(station_for(write_config(tmp_path, "empty")), once=True)
    assert tally.failed == [job_path.name]
    assert Job(spool / "failed" / job_path.name).read()["failure"]["reason"] == "no-output"

    job_path, _ = make_run_job(spool, "model")
    config = write_config(tmp_path, "empty", extra="expect_output = false")
    tally = runner.serve(station_for(config), once=True)
    assert tally.done == [job_path.name]
    assert Job(spool / "send" / "new" / job_path.name).read()["outputs"] == []


@pytest.mark.parametrize("mode,rule,file", [
    ("foreign-study", "foreign-study", "result.dcm"),
    ("foreign-patient", "foreign-patient", "result.dcm"),
    ("reused-sop", "reused-sop-uid", "copy-of-input.dcm"),
    ("symlink", "not-a-file", "secret.txt"),
    ("garbage", "unreadable", "broken.dcm"),
])
def test_invalid_output_is_refused(tmp_path: Path, mode: str, rule: str, file: str) -> None:
    config = write_config(tmp_path, mode)
    spool = tmp_path / "spool"
    job_path, _ = make_run_job(spool, "model")
    tally = runner.serve(station_for(config), once=True)
    assert tally.failed == [job_path.name]
    data = Job(spool / "failed" / job_path.name).read()
    assert data["failure"]["reason"] == "invalid-output"
    assert f"{file}: {rule}:" in data["error"]
    assert {"file": file, "rule": rule} in [{"file": v["file"], "rule": v["rule"]}
                                            for v in data["failure"]["violations"]]
    assert "outputs" not in data
    assert produced(spool) == [] and Spool(spool).list(Queue.SEND, State.NEW) == []


def test_allow_new_study_never_allows_another_patient(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    job_path, _ = make_run_job(spool, "model")
    config = write_config(tmp_path, "new-study", extra="allow_new_study = true")
    assert runner.serve(station_for(config), once=True).done == [job_path.name]

    job_path, _ = make_run_job(spool, "model")
    config = write_config(tmp_path, "foreign-patient", extra="allow_new_study = true")
    assert runner.serve(station_for(config), once=True).failed == [job_path.name]


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_validation_rules_directly(tmp_path: Path) -> None:
    study = generate_uid()
    inp = tmp_path / "input"
    sop = generate_uid()
    make_instance(inp / "1.2.3" / f"{sop}.dcm", study_uid=study, series_uid="1.2.3", sop_uid=sop)
    facts = InputFacts.from_job(inp, {"study_uid": study, "patient_id": "PAT001"})
    assert facts.sop_uids == {sop} and facts.patient_ids == {"PAT001"}
    out = tmp_path / "output"
    good = make_instance(out / "a" / "good.dcm", study_uid=study, series_uid="1.2.4")
    (out / "notes.txt").write_text("hello")
    checked = check_output(out, facts)
    assert [o.file for o in checked.dicom] == ["a/good.dcm"] and checked.other == ["notes.txt"]
    # the same SOP Instance UID twice in one output
    ds = pydicom.dcmread(good)
    ds.save_as(out / "twice.dcm")
    with pytest.raises(InvalidOutput, match="duplicate-sop-uid: SOPInstanceUID .* is also used by"):
        check_output(out, facts)
    (out / "twice.dcm").unlink()
    # a UID that cannot be a file name or a DICOM UID
    make_instance(out / "bad-uid.dcm", study_uid=study, series_uid="1.2.04")
    with pytest.raises(InvalidOutput, match="bad-uid.dcm: invalid-uid: SeriesInstanceUID"):
        check_output(out, facts)
    (out / "bad-uid.dcm").unlink()
    # a dataset written without preamble and file meta, under a name without .dcm
    raw = pydicom.dcmread(good)
    raw.PatientID = "SOMEONE-ELSE"
    raw.SOPInstanceUID = generate_uid()
    del raw.file_meta
    raw.save_as(out / "raw", implicit_vr=True, little_endian=True)
    with pytest.raises(InvalidOutput, match="raw: missing-attribute: TransferSyntaxUID"):
        check_output(out, facts)
    (out / "raw").unlink()
    # a file cut short (a model killed while writing)
    cut = make_instance(out / "cut.dcm", study_uid=study, series_uid="1.2.5")
    cut.write_bytes(cut.read_bytes()[:-100])
    with pytest.raises(InvalidOutput, match="cut.dcm: unreadable: truncated"):
        check_output(out, facts)


def test_job_ids_must_wait_in_run_new(tmp_path: Path) -> None:
    config = write_config(tmp_path, "ok")
    proc = run_dts("--config", str(config), "run", "20990101T000000.000000Z-none")
    assert proc.returncode == 2 and "no job" in proc.stderr
    spool = tmp_path / "spool"
    job_path, _ = make_run_job(spool, "model")
    other, _ = make_run_job(spool, "model")
    proc = run_dts("--config", str(config), "run", job_path.name)
    assert proc.returncode == 0, proc.stderr
    assert where(spool, job_path.name) == "send/new" and where(spool, other.name) == "run/new"


def test_unknown_stream_fails(tmp_path: Path) -> None:
    config = write_config(tmp_path, "ok")
    spool = tmp_path / "spool"
    job_path, _ = make_run_job(spool, "retired-stream")
    assert runner.serve(station_for(config), once=True).failed == [job_path.name]
    assert "not configured" in Job(spool / "failed" / job_path.name).read()["error"]


def test_kill9_of_dts_run_stops_the_orphan_and_runs_again(tmp_path: Path) -> None:
    config = write_config(tmp_path, "sleep")
    spool = tmp_path / "spool"
    job_path, _ = make_run_job(spool, "model")
    job_id = job_path.name
    cur = spool / "run" / "cur" / job_id
    proc = start_dts("--config", str(config), "run", log=tmp_path / "run.log")
    try:
        wait_for(lambda: (cur / "model.pid").exists() and (cur / "child.pid").exists(),
                 timeout=30, what="the model to start")
        model_pid = int((cur / "model.pid").read_text())
        child_pid = int((cur / "child.pid").read_text())
        assert Job(cur).read()["running"]["pid"] == model_pid
    finally:
        stop_process(proc, signal.SIGKILL)
    assert _alive(model_pid), "the model should outlive the killed dts run"

    write_config(tmp_path, "ok")  # the model works this time
    result = run_dts("--config", str(config), "run", "--once")
    assert result.returncode == 0, result.stderr
    wait_for(lambda: not _alive(model_pid) and not _alive(child_pid), timeout=10,
             what="the orphaned process group to be stopped")
    data = Job(spool / "send" / "new" / job_id).read()
    assert data["attempts"] == 1
    assert data["orphans_stopped"] == [f"process group {model_pid}"]
    events = [e["event"] for e in Job(spool / "send" / "new" / job_id).events()]
    assert events == ["started", "orphan-stopped", "recovered", "started", "finished"]


def test_sigterm_puts_the_running_job_back(tmp_path: Path) -> None:
    config = write_config(tmp_path, "sleep")
    spool = tmp_path / "spool"
    job_path, _ = make_run_job(spool, "model")
    cur = spool / "run" / "cur" / job_path.name
    proc = start_dts("--config", str(config), "run", log=tmp_path / "run.log")
    try:
        wait_for(lambda: (cur / "child.pid").exists(), timeout=30, what="the model to start")
        child_pid = int((cur / "child.pid").read_text())
    finally:
        code = stop_process(proc, signal.SIGTERM)
    assert code == 0, (tmp_path / "run.log").read_text()
    assert where(spool, job_path.name) == "run/new"
    data = Job(spool / "run" / "new" / job_path.name).read()
    assert data.get("attempts") == 0 and "running" not in data
    assert not (spool / "run" / "new" / job_path.name / "view").exists()
    wait_for(lambda: not _alive(child_pid), timeout=10, what="the model to be stopped")


def test_parallel_runs(tmp_path: Path) -> None:
    meet = tmp_path / "meet"
    meet.mkdir()
    config = write_config(tmp_path, "rendezvous", parameters={"MEET": str(meet)},
                          station_extra="max_parallel_runs = 2")
    spool = tmp_path / "spool"
    jobs = sorted(make_run_job(spool, "model", n_series=1, per_series=1)[0].name
                  for _ in range(2))
    tally = runner.serve(station_for(config), once=True)
    assert sorted(tally.done) == jobs, [Job(spool / "failed" / j).read().get("error")
                                        for j in tally.failed]


def test_serve_stops_on_event(tmp_path: Path) -> None:
    config = write_config(tmp_path, "ok")
    spool = tmp_path / "spool"
    station = station_for(config)
    stop = threading.Event()
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(runner.serve(station, stop=stop)))
    t.start()
    try:
        job_path, _ = make_run_job(spool, "model")
        wait_for(lambda: (spool / "send" / "new" / job_path.name).exists(), timeout=30,
                 what="the serving runner to take the new job")
    finally:
        stop.set()
        t.join(30)
    assert not t.is_alive() and result[0].done == [job_path.name]


def test_command_runs_as_the_streams_user(tmp_path: Path) -> None:
    config = write_config(tmp_path, "ok")
    config.write_text(config.read_text().replace(
        'name = "model"', 'name = "as-nobody"\nuser = "65534:65534"\n'
        'command = ["/bin/sh", "-c", "id -u > uid.txt"]\n\n[[stream]]\nname = "model"'))
    spool = tmp_path / "spool"
    job_path, _ = make_run_job(spool, "as-nobody")
    assert runner.serve(station_for(config), once=True).done == [job_path.name]
    uid_file = Job(spool / "send" / "new" / job_path.name).output_dir / "uid.txt"
    assert uid_file.read_text().strip() == "65534" and uid_file.stat().st_uid == 65534


def test_orphan_started_before_its_pid_was_recorded_is_stopped(tmp_path: Path) -> None:
    """kill -9 of dts run between starting a command and writing its pid to job.json: the
    orphan is found by DTS_JOB in its environment and killed before the job runs again; a
    container's process (DTS_OUTPUT=/output) is left to the engine."""
    import subprocess

    job = Job(tmp_path / "job-x")
    job.path.mkdir()
    job.write({"attempts": 1})  # no "running" record: the pid never reached job.json
    env = dict(os.environ, DTS_JOB=job.id, DTS_OUTPUT=str(job.output_dir))
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                              env=env, start_new_session=True)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                                 env=dict(os.environ, DTS_JOB=job.id, DTS_OUTPUT="/output"),
                                 start_new_session=True)
    try:
        wait_for(lambda: f"DTS_JOB={job.id}".encode() in
                 Path(f"/proc/{orphan.pid}/environ").read_bytes(), what="orphan started")
        runner.on_recovered(job)
        assert orphan.wait(10) == -signal.SIGKILL
        assert bystander.poll() is None
        assert job.read()["orphans_stopped"] == [f"process {orphan.pid}"]
    finally:
        stop_process(orphan)
        stop_process(bystander)
