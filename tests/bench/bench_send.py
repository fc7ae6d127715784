"""Benchmark: ``dts send --to`` against dcmtk ``storescu``, both into the same dcmtk ``storescp``.

One synthetic CT study (``tests.bench.data``: 1,000 images of 512x512, 16 bit, ≈0.5 MB
each by default) is sent to one storescp (writing files, ``-od``) over one association,
alternately by ``dts send --to`` and by ``/usr/bin/storescu``, ``--runs`` times each, each
timed as a whole command (start-up included); the medians of images/s and their ratio are
printed (target: dts ≥ 0.8 × storescu). Both dcmtk programs run with ``TCP_NODELAY=1``
in their environment (dcmtk leaves Nagle's algorithm on otherwise, see docs/performance.md);
``--no-nodelay`` measures the dcmtk defaults instead.
Only 127.0.0.1 is used.

    .venv/bin/python -m tests.bench.bench_send [--images 1000] [--size 512] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.data import make_study
from tests.helpers import DTS, REPO, STORESCP, STORESCU, free_port, wait_port


def run_storescu(port: int, data: Path, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([STORESCU, "-aec", "STORESCP", "-aet", "STORESCU", "+sd", "+r", "-q",
                    "127.0.0.1", str(port), str(data)], check=True, env=env)
    return time.perf_counter() - t0


def run_dts(port: int, data: Path, config: Path, spool: Path) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DTS_")}
    t0 = time.perf_counter()
    subprocess.run([*DTS, "--config", str(config), "--spool", str(spool), "send", "--to",
                    f"127.0.0.1:{port}", "--ae-title", "STORESCP", str(data)],
                   check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-nodelay", action="store_true",
                    help="run dcmtk without TCP_NODELAY=1 (its default)")
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    if not args.no_nodelay:
        env["TCP_NODELAY"] = "1"
    with tempfile.TemporaryDirectory(prefix="bench-send-") as tmp_text:
        tmp = Path(tmp_text)
        # the study is kept between benchmark runs (make_study reuses it when unchanged)
        data = make_study(Path(tempfile.gettempdir()) / f"dts-bench-study-{args.images}-"
                          f"{args.size}", images=args.images, size=args.size)
        n = sum(1 for p in data.rglob("*") if p.is_file())
        rx = tmp / "received"
        rx.mkdir()
        config = tmp / "dts.toml"
        rules = REPO / "configuration" / "classifyRules.json"
        config.write_text(f'[station]\nae_title = "DTS"\nspool = "{tmp / "spool"}"\n'
                          f'min_free_mb = 0\nclassify_rules = "{rules}"\n')
        port = free_port()
        scp = subprocess.Popen([STORESCP, "-aet", "STORESCP", "-od", str(rx), "-dhl", str(port)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(port)
            rates: dict[str, list[float]] = {"storescu": [], "dts send": []}
            for run in range(args.runs):
                for name in ("storescu", "dts send"):
                    shutil.rmtree(rx)
                    rx.mkdir()
                    os.sync()  # start each run without the previous run's dirty pages
                    secs = run_storescu(port, data, env) if name == "storescu" else \
                        run_dts(port, data, config, tmp / "spool")
                    got = sum(1 for _ in rx.iterdir())
                    if got != n:
                        print(f"{name}: storescp received {got} of {n} files", file=sys.stderr)
                        return 1
                    rates[name].append(n / secs)
                    print(f"run {run + 1}: {name:9s} {n / secs:7.1f} img/s ({secs:.2f}s)")
        finally:
            scp.terminate()
            scp.wait(10)
    med = {k: statistics.median(v) for k, v in rates.items()}
    nodelay = "without TCP_NODELAY (dcmtk default)" if args.no_nodelay else "TCP_NODELAY=1"
    print(f"\n{n} images {args.size}x{args.size}, one association, dcmtk {nodelay}, "
          f"median of {args.runs}:")
    print(f"  storescu  {med['storescu']:7.1f} img/s")
    print(f"  dts send  {med['dts send']:7.1f} img/s")
    print(f"  ratio dts/storescu = {med['dts send'] / med['storescu']:.2f} (target >= 1.00, issue 16)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
