"""Benchmark: a burst of studies from several senders through one ``dts watch``.

``--senders`` (4) dcmtk ``storescu`` processes send ``--studies`` (20) synthetic CT studies
between them at once (each sender its share, one study after the other) to ``dts watch``,
whose one stream runs a model that takes ``--model-seconds`` (5) — the example module
``dts.examples.series_statistics`` after a sleep — with ``max_parallel_runs`` (2), and sends
its results to an Orthanc. For each study the clock starts when its storescu returns (every
instance acknowledged) and stops when Orthanc's REST API shows a result of that study.

What the time is made of, per study, from the study's journal events:

    received   storescu done -> ``received`` (the study published: stable_seconds)
    classify   ``received`` -> ``queued``/``matched`` (the run job made)
    slot       ``queued`` -> run ``started`` (waiting for one of the max_parallel_runs)
    model      the run's own duration (``finished``)
    send       ``finished`` -> ``sent``
    seen       ``sent`` -> visible in Orthanc's REST API (the peer's own indexing)

The contract (issue 16): latency - slot - model <= stable_seconds + 2 s at p95 — receive,
classify and send add no queueing of their own. The named peer is the floor of the model
part: with ``max_parallel_runs`` slots and N studies of ``model`` seconds, the last study
cannot finish before ceil(N / slots) * model; the run prints the burst's makespan against it.

    .venv/bin/python -m tests.bench.bench_burst [--studies 20] [--senders 4]
        [--model-seconds 5] [--parallel 2] [--images 20] [--size 128] [--stable 2]
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from dts.journal import EventFilter, read_events
from dts.spool import Spool
from tests.bench.bench_e2e import rest, start_orthanc
from tests.helpers import (
    DTS,
    REPO,
    STORESCU,
    free_port,
    make_study,
    stop_process,
    wait_for,
    wait_port,
)

MODEL = ("import runpy, sys, time; time.sleep(float(sys.argv[3])); "
         "sys.argv = sys.argv[:3]; "
         "runpy.run_module('dts.examples.series_statistics', run_name='__main__')")


def write_config(folder: Path, port: int, pacs_port: int, args: argparse.Namespace) -> Path:
    path = folder / "dts.toml"
    path.write_text(f"""
[station]
ae_title = "DTS"
host = "127.0.0.1"
port = {port}
spool = "{folder / 'spool'}"
stable_seconds = {args.stable}
max_parallel_runs = {args.parallel}
min_free_mb = 0
classify_rules = "{REPO / 'configuration' / 'classifyRules.json'}"

[[destination]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {pacs_port}

[[stream]]
name = "burst"
command = ["{{python}}", "-c", "{MODEL}", "{{input}}", "{{output}}", "{args.model_seconds}"]
destinations = ["pacs"]
""")
    return path


def _t(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["time"]).replace("Z", "+00:00")).timestamp()


def parts(spool: Spool, accession: str, acked: float, seen: float) -> dict[str, float]:
    """The study's time split by its journal events (seconds)."""
    events = list(read_events(spool, EventFilter(accession=accession)))

    def first(stage: str, *names: str) -> dict[str, Any]:
        for e in events:
            if e.get("stage") == stage and e.get("event") in names:
                return e
        raise SystemExit(f"study {accession}: no {stage} {'/'.join(names)} event")

    received = _t(first("receive", "received"))
    queued = _t(first("classify", "queued", "matched"))
    started = _t(first("run", "started"))
    finished = first("run", "finished")
    sent = _t(first("send", "sent"))
    model = float(finished.get("duration") or 0.0)
    return {"latency": seen - acked, "received": received - acked, "classify": queued - received,
            "slot": started - queued, "model": model,
            "run_other": _t(finished) - started - model, "send": sent - _t(finished),
            "seen": seen - sent}


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", type=int, default=20)
    ap.add_argument("--senders", type=int, default=4)
    ap.add_argument("--model-seconds", type=float, default=5.0)
    ap.add_argument("--parallel", type=int, default=2, help="[station] max_parallel_runs")
    ap.add_argument("--images", type=int, default=20, help="images per study (2 series)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--stable", type=float, default=2.0, help="[station] stable_seconds")
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DTS_")}
    env["TCP_NODELAY"] = "1"
    with tempfile.TemporaryDirectory(prefix="dts-bench-burst-") as tmp:
        root = Path(tmp)
        orthanc, pacs_port, http = start_orthanc(root / "orthanc")
        port = free_port()
        config = write_config(root, port, pacs_port, args)
        spool = Spool(root / "spool")
        studies = []
        for i in range(args.studies):
            info = make_study(root / f"study{i}", n_series=2,
                              per_series=max(1, args.images // 2), rows=args.size,
                              cols=args.size, accession=f"BURST-{i}")
            studies.append((f"BURST-{i}", info["study_uid"], info["folder"]))
        watch = subprocess.Popen([*DTS, "--config", str(config), "watch"], env=env, cwd=REPO,
                                 stdout=open(root / "watch.log", "wb"), stderr=subprocess.STDOUT)
        acked: dict[str, float] = {}
        errors: list[str] = []

        def sender(share: list[tuple[str, str, Path]]) -> None:
            for accession, _uid, folder in share:
                proc = subprocess.run([STORESCU, "-aet", "MODALITY", "-aec", "DTS", "+sd", "+r",
                                       "-q", "127.0.0.1", str(port), str(folder)], env=env,
                                      capture_output=True, timeout=600, check=False)
                if proc.returncode != 0:
                    errors.append(f"{accession}: storescu {proc.returncode}")
                acked[accession] = time.time()

        try:
            wait_port(port, 30)
            t0 = time.time()
            threads = [threading.Thread(target=sender, args=(studies[s::args.senders],))
                       for s in range(args.senders)]
            for t in threads:
                t.start()
            seen: dict[str, float] = {}
            deadline = time.monotonic() + 120 + args.studies * args.model_seconds * 2
            while len(seen) < len(studies):
                if time.monotonic() > deadline:
                    raise SystemExit(f"only {len(seen)} of {len(studies)} results in Orthanc")
                found = rest(http, "/tools/find", {"Level": "Study", "Query": {},
                                                    "Expand": True})
                now = time.time()
                for item in found:
                    acc = item["MainDicomTags"].get("AccessionNumber")
                    if acc and acc not in seen:
                        seen[acc] = now
                time.sleep(0.05)
            for t in threads:
                t.join(60)
            makespan = max(seen.values()) - t0
            if errors:
                raise SystemExit("; ".join(errors))
            wait_for(lambda: all(list(read_events(spool, EventFilter(accession=a, event="sent")))
                                 for a, _, _ in studies), 30, what="every sent event")
            rows = {a: parts(spool, a, acked[a], seen[a]) for a, _, _ in studies}
        finally:
            stop_process(watch, signal.SIGTERM)
            stop_process(orthanc, signal.SIGTERM)
    keys = ["latency", "received", "classify", "slot", "model", "run_other", "send", "seen"]
    print(f"burst: {args.studies} studies of 2 x {max(1, args.images // 2)} images "
          f"{args.size}x{args.size} from {args.senders} senders; model {args.model_seconds:g} s; "
          f"max_parallel_runs {args.parallel}; stable_seconds {args.stable:g}")
    print("  study       " + " ".join(f"{k:>9s}" for k in keys) + "  own share")
    own = []
    for acc in sorted(rows, key=lambda a: acked[a]):
        r = rows[acc]
        share = r["latency"] - r["slot"] - r["model"]
        own.append(share)
        print(f"  {acc:10s}  " + " ".join(f"{r[k]:9.2f}" for k in keys) + f"  {share:9.2f}")
    lat = [r["latency"] for r in rows.values()]
    bound = args.stable + 2.0
    floor = math.ceil(args.studies / args.parallel) * args.model_seconds
    print(f"\n  latency (last instance -> result in Orthanc): p50 {statistics.median(lat):.2f} s, "
          f"p95 {p95(lat):.2f} s")
    print(f"  own share (latency - slot - model): p50 {statistics.median(own):.2f} s, "
          f"p95 {p95(own):.2f} s; target <= stable_seconds + 2 = {bound:.2f} s "
          f"({'met' if p95(own) <= bound else 'NOT met'})")
    print(f"  makespan {makespan:.1f} s against the model floor "
          f"ceil({args.studies}/{args.parallel}) x {args.model_seconds:g} = {floor:.1f} s "
          f"-> {makespan / floor:.2f}x")
    sys.exit(0 if p95(own) <= bound else 1)


if __name__ == "__main__":
    main()
