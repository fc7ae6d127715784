"""Benchmark: this checkout's ``dts send --to`` against another checkout's (before/after a
change), and dcmtk ``storescu``, alternating, to one dcmtk ``storescp`` in one run.

Separate runs of ``bench_send`` drift with the machine (the peer's own rate moved by a
third between two runs here); alternating both trees against the same receiver in one run
cancels most of that. The other checkout needs its own ``.venv`` (``make venv`` there),
e.g. ``git worktree add ../dts-before REV && make -C ../dts-before venv``. Only 127.0.0.1.

    .venv/bin/python -m tests.bench.bench_ab --other ../dts-before [--runs 7] [--images 1000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from tests.bench.data import make_study
from tests.helpers import REPO, STORESCP, STORESCU, free_port, stop_process, wait_port


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--other", type=Path, required=True, help="the checkout to compare with")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()
    other = args.other.resolve()
    if not (other / ".venv" / "bin" / "python").exists():
        ap.error(f"{other}/.venv/bin/python: no such file (make venv there first)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DTS_")}
    env["TCP_NODELAY"] = "1"
    data = make_study(Path(tempfile.gettempdir()) / f"dts-bench-study-{args.images}-"
                      f"{args.size}", images=args.images, size=args.size)
    n = sum(1 for p in data.rglob("*") if p.is_file())
    trees = {"this": REPO, "other": other}
    rates: dict[str, list[float]] = {"storescu": [], "this": [], "other": []}
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp_text:
        tmp = Path(tmp_text)
        rx = tmp / "received"
        rx.mkdir()
        config = tmp / "dts.toml"
        config.write_text(f'[station]\nspool = "{tmp / "spool"}"\nmin_free_mb = 0\n'
                          f'classify_rules = "{REPO / "configuration" / "classifyRules.json"}"\n')
        port = free_port()
        scp = subprocess.Popen([STORESCP, "-aet", "STORESCP", "-od", str(rx), "-dhl", str(port)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(port)
            for run in range(args.runs):
                for name in rates:
                    shutil.rmtree(rx)
                    rx.mkdir()
                    os.sync()
                    if name == "storescu":
                        cmd = [STORESCU, "-aec", "STORESCP", "-aet", "STORESCU", "+sd", "+r",
                               "-q", "127.0.0.1", str(port), str(data)]
                        cwd = REPO
                    else:
                        cwd = trees[name]
                        cmd = [str(cwd / ".venv" / "bin" / "python"), "-m", "dts", "--config",
                               str(config), "send", "--to", f"127.0.0.1:{port}", "--ae-title",
                               "STORESCP", str(data)]
                    t0 = time.perf_counter()
                    subprocess.run(cmd, check=True, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                                   timeout=600)
                    secs = time.perf_counter() - t0
                    got = sum(1 for _ in rx.iterdir())
                    if got != n:
                        print(f"{name}: storescp received {got} of {n} files")
                        return 1
                    rates[name].append(n / secs)
                    print(f"run {run + 1}: {name:8s} {n / secs:7.1f} img/s", flush=True)
        finally:
            stop_process(scp)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\n{n} images {args.size}x{args.size}, one association, TCP_NODELAY=1, "
          f"median of {args.runs}:")
    for name, rate in med.items():
        print(f"  {name:8s} {rate:7.1f} img/s")
    print(f"  this/other = {med['this'] / med['other']:.3f}   this/storescu = "
          f"{med['this'] / med['storescu']:.2f}   other/storescu = "
          f"{med['other'] / med['storescu']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
