"""Benchmark: does the page slow the receiver? dcmtk ``storescu`` sends one study to
``dts watch`` without the page, then to ``dts watch`` running ``dts web`` with a client
refreshing the overview, the exam list and the log as fast as they answer (bounded to
``--rate`` requests per second), alternating, in one run. Prints images/s of each and
their ratio (the issue's budget: within 5 %), and the page's median answer times.

The study is ``tests.bench.data`` (default 1,000 CT images of 512x512). Only loopback
addresses; every process started here is stopped by its PID.

    .venv/bin/python -m tests.bench.bench_web [--images 1000] [--size 512] [--runs 3]
        [--rate 4]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from tests.bench.bench_receive import send
from tests.bench.data import make_study
from tests.helpers import DTS, REPO, free_port, stop_process, wait_port

PAGES = ("/", "/exams", "/log", "/api/exams")


def start_watch(work: Path, port: int, web_port: int | None) -> subprocess.Popen[bytes]:
    web = (f'[web]\nenabled = true\nhost = "127.0.0.1"\nport = {web_port}\n'
           if web_port is not None else "")
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
{web}""")
    return subprocess.Popen(DTS + ["-q", "--config", str(cfg), "watch"],
                            stdout=subprocess.DEVNULL, stderr=open(work / "dts.log", "wb"),
                            cwd=REPO)


def refresher(base: str, stop: threading.Event, rate: float, times: list[float]) -> None:
    """A person's browser, impatient: the pages one after the other, ``rate`` a second."""
    i = 0
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(base + PAGES[i % len(PAGES)], timeout=10) as r:
                r.read()
            times.append(time.perf_counter() - t0)
        except OSError:
            pass
        i += 1
        stop.wait(max(0.0, 1.0 / rate - (time.perf_counter() - t0)))


def one_run(data: Path, images: int, with_web: bool, rate: float,
            times: list[float]) -> float:
    work = Path(tempfile.mkdtemp(prefix="bench-web-", dir=data.parent))
    port, web_port = free_port(), free_port()
    proc = start_watch(work, port, web_port if with_web else None)
    stop = threading.Event()
    client: threading.Thread | None = None
    try:
        wait_port(port, timeout=60)
        if with_web:
            wait_port(web_port, timeout=60)
            client = threading.Thread(target=refresher, daemon=True,
                                      args=(f"http://127.0.0.1:{web_port}", stop, rate, times))
            client.start()
        elapsed = send(port, "DTS", data, {})
    finally:
        stop.set()
        if client is not None:
            client.join(15)
        stop_process(proc, timeout=60)
        shutil.rmtree(work, ignore_errors=True)
    return images / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rate", type=float, default=4.0, help="page requests per second")
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "dts-bench")
    args = ap.parse_args()
    data = make_study(args.data / f"ct-{args.images}x{args.size}", images=args.images,
                      size=args.size)
    print(f"study: {args.images} images of {args.size}x{args.size}, one association, "
          f"median of {args.runs}; the page refreshed {args.rate:g}/s")
    rates: dict[bool, list[float]] = {False: [], True: []}
    times: list[float] = []
    for _ in range(args.runs):
        for with_web in (False, True):
            rates[with_web].append(one_run(data, args.images, with_web, args.rate, times))
    without, with_page = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"dts watch without the page: {without:8.1f} images/s")
    print(f"dts watch with the page:    {with_page:8.1f} images/s  "
          f"(ratio {with_page / without:.3f}; budget >= 0.95)")
    if times:
        print(f"page answers while receiving: median {statistics.median(times) * 1000:.0f} ms "
              f"over {len(times)} requests")


if __name__ == "__main__":
    main()
