"""Run jobs on a real Slurm cluster (``executor = "slurm"``, ``dts.slurm``).

The ``slurm`` fixture (tests/plugins/slurm.py) is a one-node cluster of Debian's
slurm-wlm on free loopback ports; the node is this machine, so the spool is trivially
shared. dts runs as a subprocess (``dts run``, ``dts watch``) with ``SLURM_CONF`` pointing
at the cluster; what happened is checked in the spool, the journal, Slurm itself (squeue,
its job completion log) and, end to end, in Orthanc.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dts.journal import EventFilter, read_events
from dts.spool import Job, Queue, Spool
from tests.helpers import (
    STORESCU,
    free_port,
    make_study,
    run_dts,
    start_dts,
    station_config,
    stop_process,
    wait_for,
)
from tests.plugins.engine import Engine, make_run_job
from tests.plugins.peers import Orthanc
from tests.plugins.slurm import SlurmCluster

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.34"
EXAMPLE = ["{python}", "-m", "dts.examples.series_statistics", "{input}", "{output}"]


def slurm_table(slurm: SlurmCluster, **extra: Any) -> dict[str, Any]:
    return {"partition": slurm.partition, "poll_interval": "0.3s", "command_timeout": "15s",
            **extra}


def config(tmp_path: Path, slurm: SlurmCluster, streams: list[dict[str, Any]], *,
           port: int = 0, destinations: list[dict[str, Any]] | None = None,
           table: dict[str, Any] | None = None, station: dict[str, Any] | None = None) -> Path:
    table = table if table is not None else slurm_table(slurm)
    lines = ["[slurm]"] + [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    return station_config(
        tmp_path,
        station={"ae_title": "DTS", "host": "127.0.0.1", "port": port, "stable_seconds": 1,
                 "rescan_seconds": 2, **(station or {})},
        destinations=destinations or [], streams=streams, tail="\n".join(lines))


def events(spool: Path, job: str | None = None, event: str | None = None) -> list[dict[str, Any]]:
    return [e for e in read_events(Spool(spool), EventFilter(job=job))
            if event is None or e["event"] == event]


def where(spool: Path, job_id: str) -> str:
    loc = Spool(spool).locate(job_id)
    return str(loc[0]) if loc else "nowhere"


def job_data(spool: Path, job_id: str) -> dict[str, Any]:
    loc = Spool(spool).locate(job_id)
    assert loc is not None, job_id
    return dict(Job(loc[1]).read())


def slurm_state(spool: Path, job_id: str) -> str | None:
    loc = Spool(spool).locate(job_id)
    if loc is None:
        return None
    return (Job(loc[1]).read().get("slurm") or {}).get("state")


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        stop_process(p, signal.SIGKILL)


def waiting_stream(name: str, release: Path, **extra: Any) -> dict[str, Any]:
    """A command that waits (on the node) until the test creates ``release``."""
    return {"name": name, "executor": "slurm", "expect_output": False, "timeout": "5m",
            "command": ["sh", "-c", ('echo "waiting for $0"; while [ ! -e "$0" ]; do '
                                     'sleep 0.1; done; echo released'), str(release)],
            **extra}


def test_a_node_failure_runs_the_job_again_with_its_attempt_counted(
        tmp_path: Path, slurm: SlurmCluster, processes: list[subprocess.Popen[bytes]]) -> None:
    """First in this module: taking the node down ends every job on it (NODE_FAIL), so
    no other test's job may be running yet."""
    release = tmp_path / "release"
    cfg = config(tmp_path, slurm, [waiting_stream("wait", release)])
    spool = tmp_path / "spool"
    job_id = make_run_job(spool, "wait", n_series=1, per_series=1)[0].name
    proc = start_dts("run", config=cfg, env=slurm.env, log=tmp_path / "run.log")
    processes.append(proc)
    wait_for(lambda: slurm_state(spool, job_id) == "RUNNING", 30, what="the job running")
    first = job_data(spool, job_id)["slurm"]
    node = first["node"]
    down = slurm.run("/usr/bin/scontrol", "update", f"NodeName={node}", "State=DOWN",
                     "Reason=dts-test")
    assert down.returncode == 0, down.stderr
    try:
        wait_for(lambda: events(spool, job_id, "retry"), 30, what="the job put back")
    finally:
        # with ReturnToService=2 slurmd's next registration may have brought it back
        # already: then RESUME is refused ("Invalid node state specified")
        slurm.run("/usr/bin/scontrol", "update", f"NodeName={node}", "State=RESUME")
        slurm.wait_ready()
    retry = events(spool, job_id, "retry")[0]
    assert retry["slurm_state"] == "NODE_FAIL" and "NODE_FAIL" in retry["message"]
    release.touch()
    wait_for(lambda: where(spool, job_id) == "send/new", 60, what="the second run collected")
    assert stop_process(proc) == 0
    data = job_data(spool, job_id)
    assert data["attempts"] == 1
    assert data["slurm_history"][0]["job_id"] == first["job_id"]
    assert data["slurm_history"][0]["state"] == "NODE_FAIL"
    assert data["slurm"]["state"] == "COMPLETED" and data["slurm"]["job_id"] != first["job_id"]
    assert len(events(spool, job_id, "submitted")) == 2
    assert len(slurm.completed(first["name"])) == 2  # the failed one and the second run


@dataclass
class SlowJob:
    spool: Path
    job_id: str
    proc: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def slow_job(tmp_path_factory: pytest.TempPathFactory,
             slurm: SlurmCluster) -> Iterator[SlowJob]:
    """A job of a stream with ``timeout = "1m"`` under a ``dts run`` of its own. Slurm checks
    time limits every 30 s and counts whole minutes, so it ends TIMEOUT 60-90 s after it
    started: the first test of this module starts it, the last one looks at the result,
    and the tests between run meanwhile."""
    tmp = tmp_path_factory.mktemp("slow")
    cfg = config(tmp, slurm, [waiting_stream("slow", tmp / "never", timeout="1m")])
    job_id = make_run_job(tmp / "spool", "slow", n_series=1, per_series=1)[0].name
    proc = start_dts("run", config=cfg, env=slurm.env, log=tmp / "run.log")
    try:
        yield SlowJob(tmp / "spool", job_id, proc)
    finally:
        stop_process(proc, signal.SIGKILL)


def test_a_command_job_runs_on_the_cluster(tmp_path: Path, slurm: SlurmCluster,
                                           slow_job: SlowJob) -> None:
    cfg = config(tmp_path, slurm, [{"name": "stats", "command": EXAMPLE, "executor": "slurm",
                                    "timeout": "5m", "memory": "256m", "cpus": 1}])
    spool = tmp_path / "spool"
    path, _study = make_run_job(spool, "stats", n_series=1, per_series=2)
    job_id = path.name
    proc = run_dts("run", job_id, config=cfg, env=slurm.env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert where(spool, job_id) == "send/new", proc.stderr
    data = job_data(spool, job_id)
    assert data["slurm"]["state"] == "COMPLETED"
    assert data["run"]["executor"] == "slurm" and data["run"]["exit_code"] == 0
    names = [e["event"] for e in events(spool, job_id)]
    assert names.index("submitted") < names.index("started") < names.index("finished")
    assert len(slurm.completed(data["slurm"]["name"])) == 1


def storescu(port: int, folder: Path) -> None:
    proc = subprocess.run([STORESCU, "-aet", "MODALITY", "-aec", "DTS", "+sd", "+r",
                           "127.0.0.1", str(port), str(folder)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr


def payload(tmp_path: Path, study: dict[str, Any], patient_id: str) -> str:
    import base64

    from pydicom.uid import generate_uid

    from tests.helpers import make_instance

    path = make_instance(tmp_path / "payload" / f"{generate_uid()}.dcm",
                         study_uid=study["study_uid"], series_uid=generate_uid(),
                         patient_id=patient_id, modality="OT", rows=4, cols=4)
    return base64.b64encode(path.read_bytes()).decode()


def test_storescu_to_orthanc_through_the_cluster_command_and_container(
        tmp_path: Path, slurm: SlurmCluster, engine: Engine, orthanc: Orthanc,
        processes: list[subprocess.Popen[bytes]]) -> None:
    """One study, two streams on the cluster: the example module as a command and the
    test image through podman on the node (no network: it lists its interfaces)."""
    from pydicom.uid import generate_uid

    port = free_port()
    study = make_study(tmp_path / "study", n_series=1, per_series=3, accession="SLURM-E2E",
                       patient_id="PAT-SL", FrameOfReferenceUID=generate_uid())
    cfg = config(
        tmp_path, slurm, port=port,
        destinations=[{"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1",
                       "port": orthanc.port}],
        streams=[{"name": "stats", "command": EXAMPLE, "executor": "slurm", "timeout": "5m",
                  "parameters": {"threshold": "300"}, "destinations": ["pacs"]},
                 {"name": "boxed", "image": engine.image, "executor": "slurm",
                  "timeout": "5m", "memory": "256m", "cpus": 1, "destinations": ["pacs"],
                  "parameters": {"MODE": "network",
                                 "PAYLOAD": payload(tmp_path, study, "PAT-SL")}}],
        table=slurm_table(slurm, runtime_command=engine.podman))
    env = {**slurm.env, "CONTAINERS_CONF": (engine.podman_env or {})["CONTAINERS_CONF"]}
    spool = tmp_path / "spool"
    proc = start_dts("watch", config=cfg, env=env, log=tmp_path / "watch.log")
    processes.append(proc)

    def listening() -> bool:
        assert proc.poll() is None, (tmp_path / "watch.log").read_text()
        return bool(events(spool, event="receiver-started"))
    wait_for(listening, 30, what="dts watch to listen")
    storescu(port, tmp_path / "study")
    orthanc.wait_for_instances(3, timeout=120)  # an SR and a SEG of the example, the payload
    tags = list(orthanc.instances().values())
    assert {t["StudyInstanceUID"] for t in tags} == {study["study_uid"]}
    assert {t["PatientID"] for t in tags} == {"PAT-SL"}
    assert sum(t["SOPClassUID"] == COMPREHENSIVE_SR for t in tags) == 1

    def run_jobs() -> list[str]:
        return [j for j in Spool(spool).list(Queue.DONE) if job_data(spool, j).get("stream")]
    wait_for(lambda: len(run_jobs()) == 2, 30, what="both run jobs in done/")
    for job_id in run_jobs():
        data = job_data(spool, job_id)
        info = data["slurm"]
        assert info["state"] == "COMPLETED" and info["node"] and info["job_id"]
        assert len(slurm.completed(info["name"])) == 1  # exactly one cluster job
        names = [e["event"] for e in events(spool, job_id)]
        for name in ("submitted", "started", "finished", "sent"):
            assert names.count(name) == 1, (name, names)
        started = next(e for e in events(spool, job_id, "started"))
        assert started["node"] == info["node"] and started["slurm_job_id"] == info["job_id"]
        if data["stream"] == "boxed":
            out = Path(Spool(spool).locate(job_id)[1]) / "output"  # type: ignore[index]
            assert (out / "net.txt").read_text().split() == ["lo"]  # --network=none
            assert "--network=none" in info["command"]
            assert data["run"]["runtime"] == "podman"
    log = run_dts("log", "--accession", "SLURM-E2E", config=cfg, check=True).stdout
    assert " submitted " in log and " started " in log and "running on" in log
    assert stop_process(proc) == 0


def test_kill_9_of_dts_run_while_the_job_runs_adopts_it(
        tmp_path: Path, slurm: SlurmCluster, processes: list[subprocess.Popen[bytes]]) -> None:
    release = tmp_path / "release"
    cfg = config(tmp_path, slurm, [waiting_stream("wait", release)])
    spool = tmp_path / "spool"
    job_id = make_run_job(spool, "wait", n_series=1, per_series=1)[0].name
    first = start_dts("run", config=cfg, env=slurm.env, log=tmp_path / "run1.log")
    processes.append(first)
    wait_for(lambda: slurm_state(spool, job_id) == "RUNNING", 60, what="the job running")
    assert where(spool, job_id) == "run/slurm"
    # dts status and dts show name the cluster job while it runs
    st = json.loads(run_dts("status", "--json", config=cfg, check=True).stdout)
    assert st["queues"]["run"]["slurm"] == 1
    (row,) = st["slurm"]["jobs"]
    assert row["job"] == job_id and row["state"] == "RUNNING" and row["node"]
    shown = run_dts("show", job_id, config=cfg, check=True).stdout
    assert f"# slurm job {row['slurm_job_id']} " in shown and "RUNNING" in shown
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    name = job_data(spool, job_id)["slurm"]["name"]
    assert [j["state"] for j in slurm.jobs(name)] == ["RUNNING"]  # not orphaned, not stopped
    second = start_dts("run", config=cfg, env=slurm.env, log=tmp_path / "run2.log")
    processes.append(second)
    release.touch()
    wait_for(lambda: where(spool, job_id) == "send/new", 60, what="the job collected")
    assert stop_process(second) == 0
    assert len(events(spool, job_id, "submitted")) == 1
    assert len(events(spool, job_id, "started")) == 1
    assert len(events(spool, job_id, "finished")) == 1
    assert len(slurm.jobs(name)) == 1
    wait_for(lambda: len(slurm.completed(name)) == 1, 20, what="the job completion log")
    assert len(slurm.completed(name)) == 1
    assert "released" in (Spool(spool).find(job_id)[1] / "logs" / "run-stdout.log").read_text()


KILLED_AFTER_SBATCH = r"""
import os, sys
from dts import slurm, worker
from dts.spool import Queue
from dts.station import Station
real = slurm.Cluster.submit
def submit(self, argv, env):
    real(self, argv, env)
    os._exit(9)  # killed after sbatch answered, before dts wrote the job id down
slurm.Cluster.submit = submit
from dts import runner
station = Station.open(sys.argv[1])
worker.process_ids(station, Queue.RUN, [sys.argv[2]], runner.process)
"""


def test_a_submission_interrupted_after_sbatch_is_found_by_name_not_repeated(
        tmp_path: Path, slurm: SlurmCluster) -> None:
    release = tmp_path / "release"
    release.touch()
    cfg = config(tmp_path, slurm, [waiting_stream("wait", release)])
    spool = tmp_path / "spool"
    job_id = make_run_job(spool, "wait", n_series=1, per_series=1)[0].name
    import os
    proc = subprocess.run([sys.executable, "-c", KILLED_AFTER_SBATCH, str(cfg), job_id],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, **slurm.env})
    assert proc.returncode == 9, proc.stderr
    data = job_data(spool, job_id)
    assert where(spool, job_id) == "run/slurm" and data["slurm"]["state"] == "SUBMITTING"
    assert "job_id" not in data["slurm"]
    name = data["slurm"]["name"]
    wait_for(lambda: len(slurm.jobs(name)) == 1, 20, what="the job Slurm accepted")
    proc2 = run_dts("run", "--once", config=cfg, env=slurm.env)
    assert proc2.returncode == 0, proc2.stderr
    wait_for(lambda: run_dts("run", "--once", config=cfg, env=slurm.env).returncode == 0
             and where(spool, job_id) == "send/new", 60, what="the job collected")
    assert len(slurm.jobs(name)) == 1
    assert len(slurm.completed(name)) == 1
    assert job_data(spool, job_id)["slurm"]["job_id"] == slurm.jobs(name)[0]["id"]


def test_a_refusal_and_an_outside_scancel_fail_naming_slurms_reason(
        tmp_path: Path, slurm: SlurmCluster, processes: list[subprocess.Popen[bytes]]) -> None:
    never = tmp_path / "never"
    cfg = config(tmp_path, slurm, [waiting_stream("victim", never),
                                   waiting_stream("greedy", never, memory="100000g")])
    spool = tmp_path / "spool"
    victim = make_run_job(spool, "victim", n_series=1, per_series=1)[0].name
    greedy = make_run_job(spool, "greedy", n_series=1, per_series=1)[0].name
    proc = start_dts("run", config=cfg, env=slurm.env, log=tmp_path / "run.log")
    processes.append(proc)
    # sbatch refuses: failed at once, with Slurm's reason
    wait_for(lambda: where(spool, greedy) == "failed", 30, what="the refused job failed")
    failure = job_data(spool, greedy)["failure"]
    assert failure["reason"] == "slurm-refused"
    assert "Requested node configuration is not available" in failure["message"]
    # scancel from outside: failed naming the state
    wait_for(lambda: slurm_state(spool, victim) == "RUNNING", 30, what="the victim running")
    victim_id = job_data(spool, victim)["slurm"]["job_id"]
    assert slurm.run("/usr/bin/scancel", victim_id).returncode == 0
    wait_for(lambda: where(spool, victim) == "failed", 30, what="the cancelled job failed")
    failure = job_data(spool, victim)["failure"]
    assert failure["reason"] == "cancelled" and "CANCELLED" in failure["message"]
    assert f"slurm job {victim_id}" in failure["message"]
    assert f"JOB {victim_id} ON" in failure["log_tail"]  # slurmstepd's line in its stderr
    assert stop_process(proc) == 0


def test_slurmctld_down_is_a_temporary_failure_then_the_job_runs(
        tmp_path: Path, slurm: SlurmCluster) -> None:
    release = tmp_path / "release"
    cfg = config(tmp_path, slurm, [waiting_stream("wait", release)],
                 table=slurm_table(slurm, command_timeout="20s"))
    spool = tmp_path / "spool"
    first = make_run_job(spool, "wait", n_series=1, per_series=1)[0].name
    # submitted while the controller is up, and running
    assert run_dts("run", "--once", config=cfg, env=slurm.env).returncode == 0
    wait_for(lambda: run_dts("run", "--once", config=cfg, env=slurm.env).returncode == 0
             and slurm_state(spool, first) == "RUNNING", 30, what="the first job running")
    second = make_run_job(spool, "wait", n_series=1, per_series=1)[0].name
    slurm.stop_controller()
    try:
        proc = run_dts("run", "--once", config=cfg, env=slurm.env)
        assert proc.returncode == 75, proc.stdout + proc.stderr
        # the waiting job: back in run/new with its attempt counted
        assert where(spool, second) == "run/new"
        data = job_data(spool, second)
        assert data["attempts"] == 1 and "Unable to contact slurm controller" in \
            data["last_error"]
        assert events(spool, second, "retry")
        # the job on the cluster: still followed, not resubmitted
        assert where(spool, first) == "run/slurm"
        assert events(spool, event="slurm-unreachable")
        release.touch()
    finally:
        slurm.start_controller()
    proc = run_dts("run", second, config=cfg, env=slurm.env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert where(spool, second) == "send/new"
    wait_for(lambda: run_dts("run", "--once", config=cfg, env=slurm.env).returncode == 0
             and where(spool, first) == "send/new", 60, what="the first job collected")
    for job_id in (first, second):
        assert len(events(spool, job_id, "submitted")) == 1
        assert len(slurm.completed(job_data(spool, job_id)["slurm"]["name"])) == 1


def test_max_submitted_and_a_requeue_that_cancels_the_cluster_job(
        tmp_path: Path, slurm: SlurmCluster, processes: list[subprocess.Popen[bytes]]) -> None:
    release = tmp_path / "release"
    cfg = config(tmp_path, slurm, [waiting_stream("wait", release)],
                 table=slurm_table(slurm, max_submitted=1))
    spool = tmp_path / "spool"
    a = make_run_job(spool, "wait", n_series=1, per_series=1)[0].name
    b = make_run_job(spool, "wait", n_series=1, per_series=1)[0].name
    proc = start_dts("run", config=cfg, env=slurm.env, log=tmp_path / "run.log")
    processes.append(proc)
    wait_for(lambda: slurm_state(spool, a) == "RUNNING", 30, what="the first job running")
    assert where(spool, b) == "run/new"  # one on the cluster at a time
    a_info = job_data(spool, a)["slurm"]
    out = run_dts("requeue", a, "--to", "run", config=cfg, env=slurm.env)
    assert out.returncode == 0, out.stderr
    wait_for(lambda: slurm.jobs(a_info["name"])[-1]["state"] == "CANCELLED", 20,
             what="the requeued job's cluster job cancelled")
    history = job_data(spool, a)["slurm_history"]
    assert history[-1]["job_id"] == a_info["job_id"] and history[-1]["cancelled_at"]
    requeued = events(spool, a, "requeued")[-1]
    assert requeued["slurm_cancelled"] == a_info["job_id"]
    # the slot is free: one of the two goes to the cluster (the requeued one, unless its
    # cancelled cluster job was still completing: then it waits a round), the other waits
    def one_on_the_cluster() -> bool:
        places = sorted([where(spool, a), where(spool, b)])
        fresh = where(spool, b) == "run/slurm" or \
            job_data(spool, a).get("slurm", {}).get("job_id") not in (None, a_info["job_id"])
        return places == ["run/new", "run/slurm"] and fresh
    wait_for(one_on_the_cluster, 30, what="the next job on the cluster")
    release.touch()
    wait_for(lambda: where(spool, a) == "send/new" and where(spool, b) == "send/new", 60,
             what="both collected")
    assert stop_process(proc) == 0
    assert len(events(spool, a, "submitted")) == 2  # once before the requeue, once after
    assert len(slurm.completed(a_info["name"])) == 2  # the cancelled one and the new one


def test_a_spool_path_that_does_not_show_the_spool_is_refused_at_start(
        tmp_path: Path, slurm: SlurmCluster) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cfg = config(tmp_path, slurm, [waiting_stream("wait", tmp_path / "x")],
                 table=slurm_table(slurm, spool_path=str(elsewhere)))
    for argv in (["run", "--once"], ["watch", "--no-receive"]):
        proc = run_dts(*argv, config=cfg, env=slurm.env, timeout=60)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "spool_path" in proc.stderr and "does not show" in proc.stderr
    # the same folder under another name (a bind mount, a symbolic link) is accepted
    (tmp_path / "alias").symlink_to(tmp_path / "spool")
    cfg = config(tmp_path, slurm, [waiting_stream("wait", tmp_path / "x")],
                 table=slurm_table(slurm, spool_path=str(tmp_path / "alias")))
    proc = run_dts("run", "--once", config=cfg, env=slurm.env, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_without_slurms_commands_a_slurm_stream_is_refused_at_start(
        tmp_path: Path, slurm: SlurmCluster) -> None:
    cfg = config(tmp_path, slurm, [waiting_stream("wait", tmp_path / "x")],
                 table=slurm_table(slurm, bin_dir=str(tmp_path)))
    proc = run_dts("run", "--once", config=cfg, env=slurm.env)
    assert proc.returncode == 2 and "sbatch" in proc.stderr and "bin_dir" in proc.stderr


@pytest.mark.slow
def test_the_streams_timeout_is_enforced_by_slurm(slow_job: SlowJob) -> None:
    """Last in this module: the job started by the first test has had its time."""
    spool, job_id = slow_job.spool, slow_job.job_id
    wait_for(lambda: where(spool, job_id) == "failed", 150, interval=0.5,
             what="the job Slurm stopped at its time limit")
    data = job_data(spool, job_id)
    assert "--time=1" in data["slurm"]["sbatch"]
    assert data["failure"]["reason"] == "timeout" and data["slurm"]["state"] == "TIMEOUT"
    assert "TIMEOUT" in data["failure"]["message"]
    assert "DUE TO TIME LIMIT" in data["failure"]["log_tail"]  # slurmstepd's line
    failed = events(spool, job_id, "failed")
    assert len(failed) == 1 and failed[0]["reason"] == "timeout"
    assert stop_process(slow_job.proc) == 0


# -- without a cluster: the configuration, the batch files, the decisions ---------------------


def test_slurm_keys_are_parsed_and_checked(tmp_path: Path) -> None:
    from dts import config as config_mod
    from dts.errors import ConfigError

    def load(table: str, stream: str = 'executor = "slurm"') -> Any:
        path = station_config(tmp_path, streams=[{"name": "s", "command": ["true"]}],
                              stream_text=stream, tail=table)
        return config_mod.load(path)

    cfg = load('[slurm]\npartition = "gpu"\naccount = "ai"\nqos = "hi"\n'
               'options = ["--constraint=v100"]\nmax_submitted = 5\npoll_interval = "2s"\n'
               'spool_path = "/shared/spool"\nruntime_command = ["podman", "--root", "/x"]')
    assert cfg.slurm.partition == "gpu" and cfg.slurm.options == ("--constraint=v100",)
    assert cfg.slurm.max_submitted == 5 and cfg.slurm.poll_interval == 2.0
    assert cfg.slurm.spool_path == Path("/shared/spool")
    assert cfg.streams[0].executor == "slurm"
    assert config_mod.effective(cfg)["slurm"]["partition"] == "gpu"
    for table, stream, key, words in (
            ("[slurm]\npartitions = 'x'", 'executor = "slurm"', "slurm.partitions", "unknown"),
            ("[slurm]\noptions = ['--time=5']", 'executor = "slurm"', "slurm.options",
             "sets --time itself"),
            ("[slurm]\noptions = ['-pgpu']", 'executor = "slurm"', "slurm.options", "-p"),
            ("[slurm]\noptions = ['constraint']", 'executor = "slurm"', "slurm.options",
             "not an option"),
            ("[slurm]\nmax_submitted = 0", 'executor = "slurm"', "slurm.max_submitted",
             "at least 1"),
            ("[slurm]\nruntime = 'apptainer'", 'executor = "slurm"', "slurm.runtime",
             "podman"),
            ("[slurm]\npartition = 'a b'", 'executor = "slurm"', "slurm.partition", "name"),
            ("", 'executor = "cloud"', "stream.s.executor", "local, slurm"),
            ("", 'executor = "slurm"\ngpus = "all"', "stream.s.gpus", "number"),
            ("", 'executor = "slurm"\nuser = "1000"', "stream.s.user", "submits"),
    ):
        with pytest.raises(ConfigError) as err:
            load(table, stream)
        assert err.value.key == key and words in err.value.reason, (key, err.value)


def test_sbatch_gets_the_streams_limits_as_argv_items(tmp_path: Path) -> None:
    from dts import config as config_mod
    from dts import slurm as slurm_mod

    path = station_config(tmp_path, streams=[{
        "name": "m", "image": "model:1", "executor": "slurm", "timeout": "90s",
        "memory": "1.5g", "cpus": 2.5, "gpus": "2",
        "parameters": {"A": "x; rm -rf / $(reboot)"}}],
        tail='[slurm]\npartition = "gpu"\nqos = "hi"\noptions = ["--constraint=v100"]\n'
             f'spool_path = "{tmp_path}/node-view"\nruntime_command = ["podman", "--root", "/r"]')
    cfg = config_mod.load(path)
    spool = Spool(tmp_path / "spool").ensure()
    job_path = make_run_job(spool.root, "m", n_series=1, per_series=1)[0]
    slurm_dir = spool.dir(Queue.RUN, slurm_mod.State.SLURM) / job_path.name
    job_path.rename(slurm_dir)
    job = Job(slurm_dir)
    (job.path / "view").mkdir()
    (job.path / "output").mkdir()
    argv, env, command = slurm_mod.write_batch(job, cfg.streams[0], cfg.slurm, spool, "t0k")
    node = f"{tmp_path}/node-view/run/slurm/{job.id}"
    assert argv[:2] == ["--parsable", f"--job-name=dts-{job.id}"]
    for item in ("--comment=dts:t0k", "--time=2", "--mem=1536M", "--cpus-per-task=3",
                 "--gres=gpu:2", "--partition=gpu", "--qos=hi", "--constraint=v100",
                 "--no-requeue", "--export=ALL", f"--output={node}/logs/run-stdout.log"):
        assert item in argv, item
    assert argv[-2:] == [str(job.path / "slurm" / "job.sh"), f"{node}/slurm"]
    assert command[:4] == ["podman", "--root", "/r", "run"]
    for item in (f"--volume={node}/view:/input:ro", f"--volume={node}/output:/output:rw",
                 "--network=none", "--env=A", "--env=DTS_PARAMETERS", "--memory=1.5g"):
        assert item in command, item
    assert command[-1] == "model:1"
    # the value travels in the environment, never in a command text
    assert env["A"] == "x; rm -rf / $(reboot)" and env["DTS_INPUT"] == "/input"
    assert not any("reboot" in a for a in argv + command)
    assert (job.path / "slurm" / "job.sh").read_text() == slurm_mod.BATCH_SCRIPT
    assert (job.path / "slurm" / "argv").read_bytes().split(b"\0")[:-1] == \
        [a.encode() for a in command]
    cleanup = (job.path / "slurm" / "cleanup").read_bytes().split(b"\0")[:-1]
    assert cleanup == [b"podman", b"--root", b"/r", b"rm", b"--force", b"--time=0",
                       f"dts-{job.id}".encode()]


def test_the_decisions_on_slurms_answers() -> None:
    from dts import slurm as slurm_mod

    assert slurm_mod.sbatch_minutes(1) == 1 and slurm_mod.sbatch_minutes(3600) == 60
    assert slurm_mod.sbatch_minutes(3601) == 61
    assert slurm_mod.sbatch_memory("512m") == "512M"
    assert slurm_mod.sbatch_memory("8g") == "8192M"
    assert slurm_mod.sbatch_memory("1000") == "1M"
    fields = slurm_mod.parse_scontrol(
        "JobId=7 JobName=dts-x JobState=CANCELLED Reason=None ExitCode=0:15 "
        "Command=/a b c WorkDir=/w Comment=dts:abc NodeList=n1")
    assert fields["Command"] == "/a b c" and fields["ExitCode"] == "0:15"
    assert slurm_mod.job_name("2026.x/y z") == "dts-2026.x_y_z"
    local = [("vm", "127.0.0.1")]
    others = [("vm", "127.0.0.1"), ("gpu01", "10.1.2.3")]
    assert slurm_mod.shared_verdict("ext4", local) is None           # one node: this host
    assert "gpu01" in (slurm_mod.shared_verdict("ext4", others) or "")
    assert slurm_mod.shared_verdict("nfs4", others) is None
    assert slurm_mod.shared_verdict("lustre", others) is None


KILLED_BEFORE_SBATCH = KILLED_AFTER_SBATCH.replace(
    "    real(self, argv, env)\n    os._exit(9)", "    os._exit(9)  # killed before sbatch ran")


def test_a_submission_interrupted_before_sbatch_is_submitted_once_later(
        tmp_path: Path, slurm: SlurmCluster) -> None:
    import os

    release = tmp_path / "release"
    release.touch()
    cfg = config(tmp_path, slurm, [waiting_stream("wait", release)],
                 table=slurm_table(slurm, command_timeout="2s"))
    spool = tmp_path / "spool"
    job_id = make_run_job(spool, "wait", n_series=1, per_series=1)[0].name
    proc = subprocess.run([sys.executable, "-c", KILLED_BEFORE_SBATCH, str(cfg), job_id],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, **slurm.env})
    assert proc.returncode == 9, proc.stderr
    assert slurm_state(spool, job_id) == "SUBMITTING"
    name = job_data(spool, job_id)["slurm"]["name"]
    assert slurm.jobs(name) == []
    # within command_timeout it waits (an sbatch of the dead process might still land),
    # then it goes back to run/new and is submitted there
    wait_for(lambda: run_dts("run", "--once", config=cfg, env=slurm.env).returncode in (0, 75)
             and where(spool, job_id) == "send/new", 60, interval=0.5,
             what="the job submitted again and collected")
    assert len(slurm.completed(name)) == 1 and len(slurm.jobs(name)) == 1
    assert len(events(spool, job_id, "submitted")) == 1
    assert events(spool, job_id, "recovered")
    assert job_data(spool, job_id)["attempts"] == 1


def test_a_job_slurm_forgot_is_collected_from_its_exit_file_or_run_again(
        tmp_path: Path, slurm: SlurmCluster) -> None:
    """Ended longer than MinJobAge ago (dts was stopped), no accounting: the exit code the
    batch script wrote into the job decides; a job that left none runs again."""
    from dts import slurm as slurm_mod

    release = tmp_path / "release"
    cfg = config(tmp_path, slurm, [waiting_stream("wait", release)])
    spool = Spool(tmp_path / "spool").ensure()
    ids = []
    for n, exit_file in enumerate(("0\n", None)):
        path = make_run_job(spool.root, "wait", n_series=1, per_series=1)[0]
        job = Job(spool.dir(Queue.RUN, slurm_mod.State.SLURM) / path.name)
        path.rename(job.path)
        (job.path / "slurm").mkdir()
        (job.path / "output").mkdir()
        if exit_file is not None:
            (job.path / "slurm" / "exit").write_text(exit_file)
            (job.path / "slurm" / "node").write_text("gone-node\n")
        data = job.read()
        data["slurm"] = {"name": slurm_mod.job_name(job.id), "token": f"forgotten{n}",
                         "job_id": str(900000 + n), "state": "RUNNING",
                         "submitted_at": "2026-01-01T00:00:00.000000Z",
                         "started_at": "2026-01-01T00:00:01.000000Z"}
        job.write(data)
        ids.append(job.id)
    proc = run_dts("run", "--once", config=cfg, env=slurm.env)
    assert proc.returncode == 75, proc.stdout + proc.stderr  # one runs again: a retry
    kept, vanished = ids
    assert where(spool.root, kept) == "send/new"
    data = job_data(spool.root, kept)
    assert data["run"]["slurm_state"] == "COMPLETED" and data["run"]["node"] == "gone-node"
    # the vanished one went back to run/new and was submitted there, with a new token
    retry = events(spool.root, vanished, "retry")
    assert retry and "no longer knows" in retry[0]["message"]
    data = job_data(spool.root, vanished)
    assert data["attempts"] == 1 and data["slurm_history"][0]["state"] == "VANISHED"
    assert where(spool.root, vanished) == "run/slurm"
    assert data["slurm"]["token"] != "forgotten1"
    release.touch()
    wait_for(lambda: run_dts("run", "--once", config=cfg, env=slurm.env).returncode == 0
             and where(spool.root, vanished) == "send/new", 60, what="the rerun collected")


def test_a_cluster_job_whose_dts_job_was_removed_by_hand_is_cancelled(
        tmp_path: Path, slurm: SlurmCluster, processes: list[subprocess.Popen[bytes]]) -> None:
    import shutil

    cfg = config(tmp_path, slurm, [waiting_stream("wait", tmp_path / "never")])
    spool = tmp_path / "spool"
    job_id = make_run_job(spool, "wait", n_series=1, per_series=1)[0].name
    proc = start_dts("run", config=cfg, env=slurm.env, log=tmp_path / "run.log")
    processes.append(proc)
    wait_for(lambda: slurm_state(spool, job_id) == "RUNNING", 30, what="the job running")
    info = job_data(spool, job_id)["slurm"]
    shutil.rmtree(Spool(spool).find(job_id)[1])  # a person removes it by hand
    wait_for(lambda: slurm.jobs(info["name"])[0]["state"] == "CANCELLED", 30, interval=0.3,
             what="the orphaned cluster job cancelled")
    (ev,) = [e for e in events(spool, event="orphan-stopped")]
    assert ev["slurm_job_id"] == info["job_id"] and "removed by hand" in ev["message"]
    assert stop_process(proc) == 0
