"""Benchmark: the index (``dts.index``) with a year of traffic against reading the journal
files, the way a sysadmin answers the same questions without it (``dts log --accession``,
the journal as it is on disk), in one run.

It writes ``--studies`` finished studies (50,000 by default) as journal lines spread over
365 days (eight events each: received, matched, queued, started, finished, send-started,
stored, sent), builds the index from them (the rebuild a deleted index costs), then times
the median of ``--runs`` calls each of: the exam list's first page, a search by accession,
a filtered list, a timeline (its job folders exist for the studies timed), the overview and
``/metrics``; and, as the peer, ``dts.journal.read_events`` filtered by the same
accession (what ``dts log --accession X`` does). Prints each figure and the ratio.

    .venv/bin/python -m tests.bench.bench_index [--studies 50000] [--runs 15]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydicom.uid import generate_uid

from dts.index import ExamQuery, Index
from dts.journal import EventFilter, read_events
from dts.metrics import render
from dts.spool import Job, Queue, isotime
from dts.station import Station
from tests.helpers import station_config

EVENTS = (("receive", "received"), ("classify", "matched"), ("classify", "queued"),
          ("run", "started"), ("run", "finished"), ("send", "send-started"),
          ("send", "stored"), ("send", "sent"))


def write_journal(station: Station, studies: int, seed: int = 7) -> list[dict[str, Any]]:
    """``studies`` finished studies over the last 365 days, as journal lines; returns
    the studies (uid, accession, job ids)."""
    rng = random.Random(seed)
    now = datetime.now(UTC)
    made: list[dict[str, Any]] = []
    lines: dict[str, list[str]] = {}
    for i in range(studies):
        start = now - timedelta(seconds=rng.uniform(0, 365 * 86400))
        uid, acc = generate_uid(), f"ACC{i:07d}"
        parent = start.strftime("%Y%m%dT%H%M%S.%f")[:-3] + f"-{i:06d}"
        child = f"{parent}.stats"
        made.append({"study_uid": uid, "accession": acc, "jobs": [parent, child],
                     "time": start})
        t = start
        for stage, event in EVENTS:
            t += timedelta(seconds=rng.uniform(0.1, 20))
            rec: dict[str, Any] = {
                "time": isotime(t), "job": parent if stage in ("receive", "classify")
                and event != "queued" else child, "stage": stage, "event": event,
                "status": "ok" if event in ("received", "finished", "sent", "stored")
                else "info", "message": f"{event} of study {uid}", "study_uid": uid,
                "accession": acc, "stream": None if stage == "receive" else "stats",
                "host": "bench", "pid": 1}
            if event == "received":
                rec.update(instances=rng.randint(50, 400), calling_ae="PACS",
                           called_ae="DTS", peer="127.0.0.1")
            elif event == "queued":
                rec["parent"] = parent
            elif event == "finished":
                rec.update(outputs=1, duration=round(rng.uniform(5, 300), 3))
            lines.setdefault(isotime(t)[:10], []).append(json.dumps(rec))
    station.spool.log_dir.mkdir(parents=True, exist_ok=True)
    for day, day_lines in lines.items():
        day_lines.sort(key=lambda line: json.loads(line)["time"])
        (station.spool.log_dir / f"{day}.jsonl").write_text("\n".join(day_lines) + "\n")
    return made


def job_folders(station: Station, study: dict[str, Any]) -> None:
    """The two job folders of ``study`` in done/, as a finished pipeline leaves them."""
    for job_id in study["jobs"]:
        path = station.spool.dir(Queue.DONE) / job_id
        (path / "input").mkdir(parents=True, exist_ok=True)
        job = Job(path)
        data: dict[str, Any] = {"study_uid": study["study_uid"],
                                "accession": study["accession"], "patient_id": "PID",
                                "calling_ae": "PACS", "instances": 100}
        if job_id.endswith(".stats"):
            data.update(stream="stats", parent=study["jobs"][0],
                        run={"executor": "command", "exit_code": 0, "duration_seconds": 9.5},
                        destinations={"pacs": {"status": "done", "sent": ["1.2.3"]}})
        else:
            data.update(classification={"stats": {"matched": True, "reasons": []}},
                        children=[study["jobs"][1]], streams=["stats"])
        job.write(data)  # type: ignore[arg-type]


def median_ms(fn: Callable[[], Any], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=50_000)
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="dts-bench-index-"))
    station = Station.open(station_config(folder, streams=[{"name": "stats",
                                                            "command": ["true"]}]))
    t0 = time.perf_counter()
    studies = write_journal(station, args.studies)
    print(f"journal: {args.studies} studies, {len(EVENTS) * args.studies} lines in "
          f"{time.perf_counter() - t0:.1f} s")
    index = Index(station)
    t0 = time.perf_counter()
    index.sync()
    print(f"index built from the journal (a rebuild) in {time.perf_counter() - t0:.1f} s")
    sample = random.Random(3).sample(studies, min(args.runs, len(studies)))
    for study in sample:
        job_folders(station, study)
    picks = iter(sample * 2)

    figures = {
        "exam list, first page": median_ms(lambda: index.exams(ExamQuery()), args.runs),
        "exam list, page 100": median_ms(lambda: index.exams(ExamQuery(page=100)), args.runs),
        "search by accession": median_ms(
            lambda: index.exams(ExamQuery(text=next(picks)["accession"])), args.runs),
        "filtered (status, stream)": median_ms(
            lambda: index.exams(ExamQuery(status="done", stream="stats")), args.runs),
        "timeline": median_ms(lambda: index.timeline(next(picks)["study_uid"]), args.runs),
        "overview": median_ms(index.overview, args.runs),
        "/metrics": median_ms(lambda: render(station, index), args.runs),
        "sync, nothing new": median_ms(index.sync, args.runs),
    }
    acc = sample[0]["accession"]
    peer = median_ms(lambda: list(read_events(station.spool, EventFilter(accession=acc))),
                     max(3, args.runs // 5))
    targets = {"exam list, first page": 200, "search by accession": 200, "timeline": 100,
               "/metrics": 50}
    for name, ms in figures.items():
        target = f"  (target < {targets[name]} ms)" if name in targets else ""
        print(f"{name:28s} {ms:8.1f} ms{target}")
    search = figures["search by accession"]
    print(f"{'peer: journal files scanned':28s} {peer:8.1f} ms  (dts log --accession)")
    print(f"ratio peer / index search: {peer / search:.0f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
