"""End to end with real programs: storescu -> dts watch -> example module -> Orthanc.

dts runs as a subprocess (`dts watch` on a free port) with a configuration written here:
the example module `dts.examples.series_statistics` as the stream and an Orthanc as its
destination. What arrived is checked through Orthanc's REST API.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from dts.journal import EventFilter, read_events
from dts.spool import Queue, Spool, State
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
from tests.plugins.peers import Orthanc

pytestmark = pytest.mark.slow

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.34"  # 3D: what dts builds of results.json
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
STREAM = "series-statistics"


def e2e_config(tmp_path: Path, pacs: Orthanc, *, port: int, command: list[str] | None = None,
               stable: float = 1) -> Path:
    command = command or ["{python}", "-m", "dts.examples.series_statistics", "{input}",
                          "{output}"]
    return station_config(
        tmp_path,
        station={"ae_title": "DTS", "host": "127.0.0.1", "port": port, "stable_seconds": stable,
                 "rescan_seconds": 5},
        destinations=[{"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1",
                       "port": pacs.port}],
        streams=[{"name": STREAM, "command": command, "parameters": {"threshold": "300"},
                  "timeout": "2m", "destinations": ["pacs"]}])


def storescu(port: int, folder: Path) -> None:
    proc = subprocess.run([STORESCU, "-aet", "MODALITY", "-aec", "DTS", "+sd", "+r",
                           "127.0.0.1", str(port), str(folder)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


class WatchProcess:
    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> subprocess.Popen[bytes]:
        n = len(self.procs)
        proc = start_dts("watch", config=self.config, log=self.log.with_suffix(f".{n}.log"))
        self.procs.append(proc)
        spool = Spool(json.loads(run_dts("status", "--json", config=self.config,
                                         check=True).stdout)["spool"])

        def started() -> bool:
            assert proc.poll() is None, self.log.with_suffix(f".{n}.log").read_text()
            return any(e["event"] == "receiver-started" and e.get("pid") == proc.pid
                       for e in read_events(spool, EventFilter(stage="receive")))
        wait_for(started, 30, what="dts watch to listen")
        return proc


@pytest.fixture
def watch_process(tmp_path: Path) -> Iterator[Callable[[Path], WatchProcess]]:
    made: list[WatchProcess] = []

    def make(config: Path) -> WatchProcess:
        w = WatchProcess(config, tmp_path / "watch")
        made.append(w)
        return w
    yield make
    for w in made:
        for p in w.procs:
            stop_process(p, signal.SIGKILL)


def _srs(pacs: Orthanc) -> dict[str, dict[str, Any]]:
    return {uid: tags for uid, tags in pacs.instances().items()
            if tags.get("SOPClassUID") == COMPREHENSIVE_SR}


def test_storescu_to_orthanc_through_the_example_module(
        tmp_path: Path, orthanc: Orthanc,
        watch_process: Callable[[Path], WatchProcess]) -> None:
    port = free_port()
    config = e2e_config(tmp_path, orthanc, port=port)
    w = watch_process(config)
    proc = w.start()
    study = make_study(tmp_path / "study", n_series=2, per_series=4, accession="E2E-1",
                       patient_id="PAT-E2E", FrameOfReferenceUID=generate_uid())
    storescu(port, tmp_path / "study")
    # the example's results.json and masks, built by dts: one SR, one SEG per series
    orthanc.wait_for_instances(3, timeout=60)
    srs = _srs(orthanc)
    assert len(srs) == 1 and orthanc.instance_count() == 3
    segs = [t for t in orthanc.instances().values() if t["SOPClassUID"] == SEGMENTATION]
    assert len(segs) == 2
    assert {t["StudyInstanceUID"] for t in segs} == {study["study_uid"]}
    assert {t["PatientID"] for t in segs} == {"PAT-E2E"}
    (sr,) = srs.values()
    assert sr["StudyInstanceUID"] == study["study_uid"]  # the right study ...
    assert sr["PatientID"] == "PAT-E2E"                   # ... of the right patient
    assert sr["Modality"] == "SR"
    assert sr["SeriesInstanceUID"] not in study["series"]  # a new series of its own
    # the radiologist's question, in one command: every stage with times and outcomes
    log = run_dts("log", "--accession", "E2E-1", config=config, check=True).stdout
    lines = log.splitlines()
    for stage, event in (("receive", "received"), ("classify", "matched"), ("run", "finished"),
                         ("send", "sent")):
        assert any(line.split()[1:4:2] == [stage, event] for line in lines), (stage, log)
    assert stop_process(proc, signal.SIGTERM) == 0


def test_kill_9_mid_run_then_restart_finishes_everything_once(
        tmp_path: Path, orthanc: Orthanc,
        watch_process: Callable[[Path], WatchProcess]) -> None:
    port = free_port()
    # the example module, 2 s slower, so that a run is surely going on when dts is killed
    slow = ("import runpy, sys, time; time.sleep(2); "
            "runpy.run_module('dts.examples.series_statistics', run_name='__main__')")
    config = e2e_config(tmp_path, orthanc, port=port,
                        command=["{python}", "-c", slow, "{input}", "{output}"])
    spool = Spool(tmp_path / "spool")
    w = watch_process(config)
    first = w.start()
    studies = []
    for i in range(3):
        studies.append(make_study(tmp_path / f"study{i}", n_series=1, per_series=3,
                                  accession=f"K-{i}", patient_id=f"PAT-K{i}"))
        storescu(port, tmp_path / f"study{i}")

    def processing() -> list[str]:
        """Run jobs whose processing has started (the runner recorded its process)."""
        out = []
        for j in spool.list(Queue.RUN, State.CUR):
            try:
                data = json.loads((spool.dir(Queue.RUN, State.CUR) / j / "job.json").read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data.get("running"), dict) and data["running"].get("pid"):
                out.append(j)
        return out
    running = wait_for(processing, 60, interval=0.01, what="a run in progress")
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    assert spool.list(Queue.RUN, State.CUR) == running  # left behind, lock released

    w.start()

    def queues() -> dict[str, list[str]]:
        out = {f"{q}/{s}": spool.list(q, s) for q in (Queue.CLASSIFY, Queue.RUN, Queue.SEND)
               for s in (State.NEW, State.CUR)}
        for q in (Queue.DONE, Queue.FAILED, Queue.UNMATCHED):
            out[str(q)] = spool.list(q)
        return out

    def settled() -> bool:
        state = queues()
        return len(state["done"]) >= 6 and not any(
            v for k, v in state.items() if k not in ("done", "failed", "unmatched"))
    try:
        wait_for(settled, 120, what="every job done after restart")
    finally:
        print(json.dumps(queues(), indent=1))
    state = queues()
    assert len(state["done"]) == 6, state  # 3 studies, 3 run jobs: none twice
    assert state["failed"] == [] and state["unmatched"] == []
    assert list(spool.incoming.iterdir()) == []
    srs = _srs(orthanc)
    assert orthanc.instance_count() == 3
    assert sorted(t["StudyInstanceUID"] for t in srs.values()) == \
        sorted(s["study_uid"] for s in studies)  # one result per study: none lost, none twice
    assert {t["PatientID"] for t in srs.values()} == {"PAT-K0", "PAT-K1", "PAT-K2"}
    recovered = [e["job"] for e in read_events(spool, EventFilter(event="recovered"))]
    assert set(running) <= set(recovered)
    stopped = [e["job"] for e in read_events(spool, EventFilter(event="orphan-stopped"))]
    assert sorted(stopped) == sorted(running)
    for j in running:  # the killed run's process was stopped, not left to write its result
        assert json.loads((spool.dir(Queue.DONE) / j / "job.json").read_text())[
            "orphans_stopped"]
    for s in studies:
        sent = list(read_events(spool, EventFilter(study=s["study_uid"], event="sent")))
        assert len(sent) == 1
    # every instance that storescu was told was stored reached a job
    received = sum(json.loads((spool.dir(Queue.DONE) / j / "job.json").read_text())
                   .get("instances", 0) for j in spool.list(Queue.DONE)
                   if not j.endswith(STREAM))
    assert received == 9
    for p in w.procs[1:]:
        assert stop_process(p, signal.SIGTERM) == 0
