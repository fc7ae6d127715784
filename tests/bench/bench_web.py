"""Benchmark: dcmtk ``storescu`` sending a study to ``dts receive`` with the page open and
refreshing, against the same without the page, alternating, in one run.

"With the page": ``dts web`` runs on the same station (its own process, as ``dts watch``
starts it) and a client asks for the overview, the exam list, the log and ``/metrics``
every ``--refresh`` seconds for as long as the study is sent (each answer syncs the index
from the journal). "Without": ``dts receive`` alone. The study is ``tests.bench.data``
(1,000 CT images of 512×512 by default); the time until storescu exits gives images/s.
Medians of ``--runs`` each, after one warm-up run that is not counted; the ratio is what
must stay within 5 %. Only 127.0.0.1.

    .venv/bin/python -m tests.bench.bench_web [--images 1000] [--runs 5] [--refresh 1]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import threading
import urllib.request
from pathlib import Path

from tests.bench.bench_receive import _env, send
from tests.bench.data import make_study
from tests.helpers import DTS, REPO, free_port, stop_process, wait_port

PAGES = ("/", "/exams", "/log", "/metrics")


def _config(work: Path, port: int, web_port: int) -> Path:
    cfg = work / "dts.toml"
    cfg.write_text(f"""
[station]
ae_title = "DTS"
host = "127.0.0.1"
port = {port}
spool = "{work / 'spool'}"
stable_seconds = 2
min_free_mb = 0
classify_rules = "{REPO / 'configuration' / 'classifyRules.json'}"

[web]
host = "127.0.0.1"
port = {web_port}
""")
    return cfg


class Refresher(threading.Thread):
    """A browser tab left open: every page, every ``interval`` seconds, until stopped."""

    def __init__(self, base: str, interval: float) -> None:
        super().__init__(daemon=True)
        self.base = base
        self.interval = interval
        self.halt = threading.Event()
        self.requests = 0
        self.failures = 0

    def run(self) -> None:
        while not self.halt.is_set():
            for page in PAGES:
                try:
                    with urllib.request.urlopen(self.base + page, timeout=30) as rsp:
                        rsp.read()
                    self.requests += 1
                except OSError:
                    self.failures += 1
            self.halt.wait(self.interval)


def one_run(data: Path, images: int, with_page: bool, refresh: float) -> float:
    work = Path(tempfile.mkdtemp(prefix="bench-web-", dir=data.parent))
    port = web_port = free_port()
    while web_port == port:  # two free ports, not the same one twice
        web_port = free_port()
    cfg = _config(work, port, web_port)
    env = _env(False)
    procs = [subprocess.Popen(DTS + ["-q", "--config", str(cfg), "receive"], env=env,
                              stdout=subprocess.DEVNULL, stderr=open(work / "rx.log", "wb"),
                              cwd=REPO)]
    refresher = None
    try:
        wait_port(port, timeout=60)
        if with_page:
            procs.append(subprocess.Popen(DTS + ["-q", "--config", str(cfg), "web"], env=env,
                                          stdout=subprocess.DEVNULL,
                                          stderr=open(work / "web.log", "wb"), cwd=REPO))
            wait_port(web_port, timeout=60)
            refresher = Refresher(f"http://127.0.0.1:{web_port}", refresh)
            refresher.start()
        elapsed = send(port, "DTS", data, env)
        stored = sum(1 for _ in (work / "spool").rglob("*.dcm"))
        if stored != images:
            raise SystemExit(f"dts stored {stored} of {images} instances")
        if refresher is not None and refresher.requests == 0:
            raise SystemExit(f"the page answered nothing ({refresher.failures} failures)")
    finally:
        if refresher is not None:
            refresher.halt.set()
            refresher.join(30)
        for proc in reversed(procs):
            stop_process(proc)
        shutil.rmtree(work, ignore_errors=True)
    return images / elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--refresh", type=float, default=1.0)
    args = ap.parse_args()
    data = make_study(Path(tempfile.gettempdir()) / f"dts-bench-study-{args.images}-"
                      f"{args.size}", images=args.images, size=args.size)
    rates: dict[bool, list[float]] = {False: [], True: []}
    one_run(data, args.images, False, args.refresh)  # warm-up: caches, not counted
    for i in range(args.runs):
        for with_page in (False, True) if i % 2 == 0 else (True, False):
            rate = one_run(data, args.images, with_page, args.refresh)
            rates[with_page].append(rate)
            print(f"run {i + 1} {'with' if with_page else 'without'} the page: "
                  f"{rate:.0f} images/s", flush=True)
    without, with_page_rate = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"without the page: {without:.0f} images/s (median of {args.runs})")
    print(f"with the page open, refreshing every {args.refresh:g} s: {with_page_rate:.0f} "
          f"images/s")
    print(f"ratio with/without: {with_page_rate / without:.3f} (must stay above 0.95)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
