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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dts.journal import EventFilter, read_events
from dts.spool import Job, Queue, Spool, State
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


def test_a_command_job_runs_on_the_cluster(tmp_path: Path, slurm: SlurmCluster) -> None:
    cfg = config(tmp_path, slurm, [{"name": "stats", "command": EXAMPLE, "executor": "slurm",
                                    "timeout": "5m", "memory": "256m", "cpus": 1}])
    spool = tmp_path / "spool"
    path, study = make_run_job(spool, "stats", n_series=1, per_series=2)
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
