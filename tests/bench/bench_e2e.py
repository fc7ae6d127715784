"""Benchmark: end-to-end latency of `dts watch`, from the last instance acknowledged to the
result stored in the destination PACS.

A real dcmtk ``storescu`` sends a synthetic CT study to ``dts watch`` (a subprocess on a free
127.0.0.1 port) whose stream is the example module ``dts.examples.series_statistics`` with
an Orthanc as destination. The clock starts when storescu returns (every instance
acknowledged) and stops when Orthanc's REST API lists the SR. The contract is

    latency <= stable_seconds + module run time + 2 s

where the module run time is the runner's own measure (``run``/``finished`` event). The
named peer measured in the same run is dcmtk ``storescu`` storing that very SR into the
same Orthanc directly (the floor of the last hop). Medians over ``--runs`` studies.

    .venv/bin/python -m tests.bench.bench_e2e [--runs 5] [--images 40] [--size 256] [--stable 2]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from dts.journal import EventFilter, read_events
from dts.spool import Queue, Spool
from tests.helpers import (
    DTS,
    ORTHANC,
    REPO,
    STORESCU,
    free_port,
    make_study,
    stop_process,
    wait_for,
    wait_port,
)


def rest(port: int, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=10) as rsp:
        return json.loads(rsp.read() or b"null")


def start_orthanc(folder: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    dicom, http = free_port(), free_port()
    cfg = {"Name": "bench", "StorageDirectory": str(folder / "storage"),
           "IndexDirectory": str(folder / "index"), "DicomAet": "ORTHANC", "DicomPort": dicom,
           "HttpPort": http, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
           "Plugins": [], "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False,
           "StorageCompression": False}
    folder.mkdir(parents=True)
    (folder / "orthanc.json").write_text(json.dumps(cfg))
    env = {**os.environ, "TCP_NODELAY": "1"}
    with open(folder / "orthanc.log", "wb") as log:
        proc = subprocess.Popen([ORTHANC, str(folder / "orthanc.json")], stdout=log,
                                stderr=subprocess.STDOUT, env=env)
    wait_port(dicom, 30)
    wait_port(http, 30)
    return proc, dicom, http


def write_config(folder: Path, port: int, pacs_port: int, stable: float) -> Path:
    path = folder / "dts.toml"
    path.write_text(f"""
[station]
ae_title = "DTS"
host = "127.0.0.1"
port = {port}
spool = "{folder / 'spool'}"
stable_seconds = {stable}
min_free_mb = 0
classify_rules = "{REPO / 'configuration' / 'classifyRules.json'}"

[[destination]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {pacs_port}

[[stream]]
name = "series-statistics"
command = ["{{python}}", "-m", "dts.examples.series_statistics", "{{input}}", "{{output}}"]
parameters = {{ threshold = "300" }}
destinations = ["pacs"]
""")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--images", type=int, default=40, help="images per study (2 series)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--stable", type=float, default=2.0, help="[station] stable_seconds")
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DTS_")}
    env["TCP_NODELAY"] = "1"
    with tempfile.TemporaryDirectory(prefix="dts-bench-e2e-") as tmp:
        root = Path(tmp)
        orthanc, pacs_port, http = start_orthanc(root / "orthanc")
        port = free_port()
        config = write_config(root, port, pacs_port, args.stable)
        spool = Spool(root / "spool")
        watch = subprocess.Popen([*DTS, "--config", str(config), "watch"], env=env, cwd=REPO,
                                 stdout=open(root / "watch.log", "wb"), stderr=subprocess.STDOUT)
        rows = []
        try:
            wait_port(port, 30)
            for i in range(args.runs):
                folder = root / f"study{i}"
                make_study(folder, n_series=2, per_series=max(1, args.images // 2),
                           rows=args.size, cols=args.size, accession=f"B-{i}")
                before = len(rest(http, "/instances"))
                subprocess.run([STORESCU, "-aet", "MODALITY", "-aec", "DTS", "+sd", "+r", "-q",
                                "127.0.0.1", str(port), str(folder)], check=True, env=env)
                acked = time.perf_counter()
                wait_for(lambda before=before: len(rest(http, "/instances")) > before, 120, interval=0.01,
                         what="the SR in Orthanc")
                stored = time.perf_counter()
                latency = stored - acked
                done = wait_for(lambda acc=f"B-{i}": [e for e in read_events(
                    spool, EventFilter(accession=acc, stage="run", event="finished"))],
                    30, what="the run's finished event")
                module = float(done[0].get("duration") or 0.0)
                # the named peer: storescu stores that same SR into Orthanc directly
                job_dir = spool.dir(Queue.DONE) / done[0]["job"]
                wait_for(job_dir.is_dir, 30, what="the run job in done/")
                sr_file = next(p for p in (job_dir / "output").rglob("*")
                               if p.is_file() and p.suffix != ".json")
                t0 = time.perf_counter()
                subprocess.run([STORESCU, "-aet", "PEER", "-aec", "ORTHANC", "-q", "127.0.0.1",
                                str(pacs_port), str(sr_file)], check=True, env=env)
                peer = time.perf_counter() - t0
                bound = args.stable + module + 2.0
                rows.append((latency, module, bound, peer))
                print(f"run {i + 1}: latency {latency:6.2f} s   module {module:5.2f} s   "
                      f"bound {bound:5.2f} s   dts overhead {latency - args.stable - module:5.2f} s"
                      f"   storescu SR->Orthanc {peer:5.2f} s", flush=True)
        finally:
            stop_process(watch, signal.SIGTERM)
            stop_process(orthanc, signal.SIGTERM)
    lat = statistics.median(r[0] for r in rows)
    mod = statistics.median(r[1] for r in rows)
    bound = statistics.median(r[2] for r in rows)
    peer = statistics.median(r[3] for r in rows)
    overhead = lat - args.stable - mod
    print()
    print(f"study: 2 series x {max(1, args.images // 2)} images of {args.size}x{args.size}; "
          f"stable_seconds {args.stable:g}; {len(rows)} runs (medians)")
    print(f"  last instance acknowledged -> SR stored in Orthanc: {lat:.2f} s")
    print(f"  contract: stable {args.stable:g} s + module {mod:.2f} s + 2 s = {bound:.2f} s "
          f"-> latency/bound = {lat / bound:.2f} ({'met' if lat <= bound else 'NOT met'})")
    print(f"  dts's own share (latency - stable - module): {overhead:.2f} s of the 2 s allowed")
    print(f"  named peer, storescu storing the SR directly: {peer:.2f} s "
          f"-> dts overhead / peer = {overhead / peer:.1f}x")
    sys.exit(0 if lat <= bound else 1)


if __name__ == "__main__":
    main()
