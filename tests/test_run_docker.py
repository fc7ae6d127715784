"""dts run with the docker executor against a real engine (podman's Docker API service,
see tests/plugins/engine.py). The test image's /bin/model does what MODE says; a DICOM
result the test prepared reaches it base64-encoded in the PAYLOAD parameter."""

from __future__ import annotations

import base64
import hashlib
import json
import signal
import threading
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from dts import runner
from dts.executors import device_requests
from dts.spool import Job, Queue, Spool, State
from dts.station import Station
from tests.helpers import make_instance, run_dts, start_dts, station_config, stop_process, wait_for
from tests.plugins.engine import Engine, make_run_job


def payload(tmp_path: Path, study: dict[str, Any], **changes: Any) -> str:
    """A small DICOM result for ``study`` (fresh UIDs unless ``changes`` say otherwise)."""
    attrs: dict[str, Any] = {"study_uid": study["study_uid"], "series_uid": generate_uid(),
                             "modality": "OT", "rows": 4, "cols": 4}
    attrs.update(changes)
    path = make_instance(tmp_path / "payload" / f"{generate_uid()}.dcm", **attrs)
    return base64.b64encode(path.read_bytes()).decode()


def write_config(tmp_path: Path, engine: Engine, mode: str, *, image: str | None = None,
                 payload: str = "", extra: str = "", station_extra: str = "") -> Path:
    return station_config(tmp_path, station_text=station_extra, streams=[{
        "name": "model", "image": image or engine.image,
        "parameters": {"MODE": mode, "PAYLOAD": payload, "level": "7"}}], stream_text=extra)


def new_job(tmp_path: Path) -> tuple[str, dict[str, Any]]:
    path, study = make_run_job(tmp_path / "spool", "model", n_series=2, per_series=2)
    return path.name, study


def job_at(tmp_path: Path, job_id: str) -> Job:
    return Job(Spool(tmp_path / "spool").find(job_id)[1])


def test_container_success(tmp_path: Path, engine: Engine) -> None:
    job_id, study = new_job(tmp_path)
    config = write_config(tmp_path, engine, "ok", payload=payload(tmp_path, study),
                          extra='memory = "256m"\ncpus = 0.5')
    proc = run_dts("--config", str(config), "run", "--once", env=engine.env)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    job = Job(tmp_path / "spool" / "send" / "new" / job_id)
    data = job.read()
    files = (job.output_dir / "input-files.txt").read_text().split()
    assert files == sorted([f"/input/main/{s}/{sop}.dcm" for s, sops in study["series"].items()
                            for sop in sops] + ["/input/task.json"])
    env = dict(line.split("=", 1) for line in (job.output_dir / "env.txt").read_text()
               .splitlines() if "=" in line)
    assert env["DTS_INPUT"] == "/input" and env["DTS_OUTPUT"] == "/output"
    assert env["DTS_JOB"] == job_id and env["MODE"] == "ok" and env["level"] == "7"
    assert json.loads(env["DTS_PARAMETERS"])["level"] == "7"
    [out] = data["outputs"]
    ds = pydicom.dcmread(job.output_dir / out["file"])
    assert out["sop_uid"] == ds.SOPInstanceUID and ds.StudyInstanceUID == study["study_uid"]
    assert sorted(data["other_files"]) == ["env.txt", "input-files.txt", "limits.txt"]
    # the stream's limits, as the container's cgroup shows them
    quota, period, memory = (job.output_dir / "limits.txt").read_text().split()
    assert int(quota) / int(period) == 0.5 and int(memory) == 256 * 1024 * 1024
    run = data["run"]
    assert run["executor"] == "docker" and run["image"] == engine.image
    assert run["image_id"] and run["exit_code"] == 0
    assert f"model: starting job {job_id}" in (job.logs_dir / "run-stdout.log").read_text()
    assert engine.job_containers(job_id) == []  # removed afterwards
    assert (tmp_path / "spool" / "produced" / ds.SOPInstanceUID).read_text().strip() == job_id


def test_container_contained(tmp_path: Path, engine: Engine, docker_host: str) -> None:
    """Input read-only, no network, a user of the stream's choosing."""
    job_id, study = new_job(tmp_path)
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest()
              for p in job_at(tmp_path, job_id).input_dir.rglob("*.dcm")}
    # as root in the container: only the read-only mount stops it
    config = write_config(tmp_path, engine, "readonly", payload=payload(tmp_path, study))
    assert runner.serve(Station.open(config), once=True).done == [job_id]
    job = job_at(tmp_path, job_id)
    assert (job.output_dir / "ro.txt").read_text().split() == ["create-refused",
                                                                "modify-refused"]
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in job.input_dir.rglob("*.dcm")}
    assert list(before.values()) == list(after.values())

    job_id, study = new_job(tmp_path)
    for f in job_at(tmp_path, job_id).input_dir.rglob("*.dcm"):
        f.chmod(0o600)  # as a receiver may leave them
    config = write_config(tmp_path, engine, "network", payload=payload(tmp_path, study),
                          extra='user = "65534:65534"')
    assert runner.serve(Station.open(config), once=True).done == [job_id]
    out = job_at(tmp_path, job_id).output_dir
    assert (out / "net.txt").read_text().split() == ["lo"]
    assert (out / "uid.txt").read_text().strip() == "65534"
    assert (out / "read.txt").read_text().strip() == "ok"
    assert (out / "net.txt").stat().st_uid == 65534

    job_id, study = new_job(tmp_path)
    config = write_config(tmp_path, engine, "network", payload=payload(tmp_path, study),
                          extra="network = true")
    assert runner.serve(Station.open(config), once=True).done == [job_id]
    assert len((job_at(tmp_path, job_id).output_dir / "net.txt").read_text().split()) > 1


@pytest.mark.parametrize("mode,extra,reason,text", [
    ("fail", "", "exit-code", "CUDA error: out of luck"),
    ("sleep", 'timeout = "2s"', "timeout", "killed at the stream's timeout (2 s)"),
    ("oom", 'memory = "32m"', "oom", "out of memory (memory = 32m, exit code 137)"),
    ("empty", "", "no-output", "wrote nothing"),
])
def test_container_failures(tmp_path: Path, engine: Engine, docker_host: str, mode: str,
                            extra: str, reason: str, text: str) -> None:
    job_id, _ = new_job(tmp_path)
    config = write_config(tmp_path, engine, mode, extra=extra)
    assert runner.serve(Station.open(config), once=True).failed == [job_id]
    job = Job(tmp_path / "spool" / "failed" / job_id)
    data = job.read()
    assert data["failure"]["reason"] == reason, data["error"]
    assert text in data["error"]
    assert engine.job_containers(job_id) == []
    [ev] = [e for e in job.events() if e["event"] == "failed"]
    assert ev["reason"] == reason and ev["stage"] == "run"


@pytest.mark.parametrize("changes,rule", [
    ({"study_uid": "1.2.3.999"}, "foreign-study"),
    ({"patient_id": "OTHER"}, "foreign-patient"),
    ({"reuse": True}, "reused-sop-uid"),
])
def test_container_output_for_another_record_is_refused(
        tmp_path: Path, engine: Engine, docker_host: str, changes: dict[str, Any],
        rule: str) -> None:
    job_id, study = new_job(tmp_path)
    if changes.pop("reuse", False):
        series = next(iter(study["series"]))
        changes = {"sop_uid": study["series"][series][0], "series_uid": series}
    config = write_config(tmp_path, engine, "ok", payload=payload(tmp_path, study, **changes))
    assert runner.serve(Station.open(config), once=True).failed == [job_id]
    data = Job(tmp_path / "spool" / "failed" / job_id).read()
    assert f"result.dcm: {rule}:" in data["error"]
    assert Spool(tmp_path / "spool").list(Queue.SEND, State.NEW) == []
    assert not (tmp_path / "spool" / "produced").exists() or \
        not list((tmp_path / "spool" / "produced").iterdir())


def test_missing_image_is_an_error_that_says_so(tmp_path: Path, engine: Engine,
                                                docker_host: str) -> None:
    job_id, _ = new_job(tmp_path)
    config = write_config(tmp_path, engine, "ok", image="localhost/dts-no-such-model:9")
    assert runner.serve(Station.open(config), once=True).failed == [job_id]
    error = Job(tmp_path / "spool" / "failed" / job_id).read()["error"]
    assert "'localhost/dts-no-such-model:9' is not present" in error and "pull = true" in error


def test_engine_down_is_temporary_until_attempts_run_out(tmp_path: Path) -> None:
    # no engine fixture: nothing listens on this socket
    down = {"DOCKER_HOST": f"unix://{tmp_path / 'nobody.sock'}"}
    job_id, _ = new_job(tmp_path)
    config = write_config(tmp_path, Engine("", "localhost/dts-test-model:1", {}, []), "ok",
                          station_extra="max_attempts = 3")
    for attempt in (1, 2):
        proc = run_dts("--config", str(config), "run", "--once", env=down)
        assert proc.returncode == 75, proc.stderr
        job = Job(tmp_path / "spool" / "run" / "new" / job_id)
        assert job.read()["attempts"] == attempt
        assert "unreachable" in job.read()["last_error"]
        assert not (job.path / "view").exists()
    proc = run_dts("--config", str(config), "run", "--once", env=down)
    assert proc.returncode == 1
    data = Job(tmp_path / "spool" / "failed" / job_id).read()
    assert data["failure"]["reason"] == "engine-unreachable" and data["attempts"] == 3
    events = [(e["event"], e["status"]) for e in Job(tmp_path / "spool" / "failed" / job_id)
              .events() if e["stage"] == "run"]
    assert events == [("started", "info"), ("retry", "warning"), ("started", "info"),
                      ("retry", "warning"), ("started", "info"), ("failed", "error")]


def test_kill9_while_container_runs(tmp_path: Path, engine: Engine) -> None:
    job_id, study = new_job(tmp_path)
    config = write_config(tmp_path, engine, "sleep")
    proc = start_dts("--config", str(config), "run", env=engine.env, log=tmp_path / "run.log")
    try:
        def running() -> Any:
            found = engine.job_containers(job_id)
            return found and found[0].status == "running" and found[0]
        container = wait_for(running, timeout=60, what="the model's container to run")
    finally:
        stop_process(proc, signal.SIGKILL)
    assert [c.id for c in engine.job_containers(job_id)] == [container.id]  # orphaned

    write_config(tmp_path, engine, "ok", payload=payload(tmp_path, study))
    result = run_dts("--config", str(config), "run", "--once", env=engine.env)
    assert result.returncode == 0, result.stderr
    job = Job(tmp_path / "spool" / "send" / "new" / job_id)
    data = job.read()
    assert data["attempts"] == 1 and data["orphans_stopped"] == [f"container {container.short_id}"]
    assert engine.job_containers(job_id) == []
    assert [e["event"] for e in job.events()] == ["started", "orphan-stopped", "recovered",
                                                  "started", "finished"]


def test_gpu_requests() -> None:
    [all_gpus] = device_requests("all")
    assert all_gpus["Count"] == -1 and all_gpus["Capabilities"] == [["gpu"]]
    [two] = device_requests("2")
    assert two["Count"] == 2
    [ids] = device_requests("device=0,2")
    assert ids["DeviceIDs"] == ["0", "2"]
    assert device_requests(None) == []


def test_engine_lost_while_a_model_runs(tmp_path: Path, engine: Engine,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The API service dies mid-run: temporary failure, job back in run/new with the
    attempt counted; the next attempt (engine back) removes the leftover container."""
    job_id, study = new_job(tmp_path)
    sock = tmp_path / "second.sock"
    service = engine.start_service(sock, tmp_path / "second.log")
    try:
        monkeypatch.setenv("DOCKER_HOST", f"unix://{sock}")
        config = write_config(tmp_path, engine, "sleep")
        station = Station.open(config)
        result: list[Any] = []
        t = threading.Thread(target=lambda: result.append(runner.serve(station, once=True)))
        t.start()
        try:
            def running() -> Any:
                found = engine.job_containers(job_id)
                return found and found[0].status == "running" and found[0]
            container = wait_for(running, timeout=60, what="the model's container to run")
        finally:
            stop_process(service, signal.SIGKILL)
            t.join(60)
    finally:
        stop_process(service, signal.SIGKILL)
    assert not t.is_alive() and result[0].retry == [job_id]
    job = Job(tmp_path / "spool" / "run" / "new" / job_id)
    assert job.read()["attempts"] == 1 and "lost the container engine" in job.read()["last_error"]
    assert [c.id for c in engine.job_containers(job_id)] == [container.id]  # still running

    monkeypatch.setenv("DOCKER_HOST", engine.docker_host)
    write_config(tmp_path, engine, "ok", payload=payload(tmp_path, study))
    assert runner.serve(Station.open(config), once=True).done == [job_id]
    assert engine.job_containers(job_id) == []
