"""Benchmark: dcmtk ``storescu`` sending one study to ``dts receive``, to dcmtk ``storescp``
and to Orthanc, alternating, in one run.

The study is ``tests.bench.data`` (default 1,000 CT images of 512×512, 16 bit; ``--small``
for 5,000 of 64×64). Each receiver is started fresh on a free loopback port, one
``/usr/bin/storescu`` sends the whole folder over one association, and the time until
storescu exits (every instance acknowledged) gives images/s. dts acknowledges an instance
only once it is fsynced; storescp and Orthanc do not fsync. Each round is run twice: with
dcmtk's defaults (Nagle on, as deployed in hospitals) and with ``TCP_NODELAY=1`` in the
environment of the dcmtk programs (storescu, storescp, Orthanc). Medians of ``--runs``.

    .venv/bin/python -m tests.bench.bench_receive [--images 1000] [--size 512] [--runs 3]
        [--small] [--peers dts,storescp,orthanc] [--modes default,nodelay] [--max-pdu N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.bench.data import make_study
from tests.helpers import DTS, ORTHANC, REPO, STORESCP, STORESCU, free_port, stop_process, wait_port

Starter = Callable[[Path, int, dict[str, str]], subprocess.Popen[bytes]]


def _env(nodelay: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DTS_") and k != "TCP_NODELAY"}
    if nodelay:
        env["TCP_NODELAY"] = "1"
    return env


def start_dts(work: Path, port: int, env: dict[str, str],
              max_pdu: int | None) -> subprocess.Popen[bytes]:
    cfg = work / "dts.toml"
    cfg.write_text(f"""
[station]
ae_title = "DTS"
host = "127.0.0.1"
port = {port}
spool = "{work / 'spool'}"
stable_seconds = 2
min_free_mb = 0
{'' if max_pdu is None else f'max_pdu = {max_pdu}'}
classify_rules = "{REPO / 'configuration' / 'classifyRules.json'}"
""")
    env = {k: v for k, v in env.items() if k != "TCP_NODELAY"}  # dts sets its own options
    return subprocess.Popen(DTS + ["-q", "--config", str(cfg), "receive"], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(work / "dts.log", "wb"),
                            cwd=REPO)


def start_storescp(work: Path, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    out = work / "out"
    out.mkdir()
    return subprocess.Popen([STORESCP, "-aet", "STORESCP", "-od", str(out), str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_orthanc(work: Path, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    cfg = {
        "Name": "bench", "StorageDirectory": str(work / "storage"),
        "IndexDirectory": str(work / "index"), "StorageCompression": False,
        "DicomAet": "ORTHANC", "DicomPort": port, "HttpPort": free_port(),
        "HttpServerEnabled": True, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "DicomAlwaysAllowStore": True, "Plugins": [],
        "SaveJobs": False, "StableAge": 60,
    }
    (work / "orthanc.json").write_text(json.dumps(cfg))
    return subprocess.Popen([ORTHANC, str(work / "orthanc.json")], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(work / "orthanc.log", "wb"))


def send(port: int, aec: str, data: Path, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([STORESCU, "-aet", "BENCH", "-aec", aec, "+sd", "+r", "-q",
                           "127.0.0.1", str(port), str(data)], env=env,
                          capture_output=True, timeout=3600, check=False)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"storescu to {aec} failed ({proc.returncode}): "
                         f"{proc.stderr.decode(errors='replace')[-2000:]}")
    return elapsed


def one_run(peer: str, data: Path, images: int, nodelay: bool, max_pdu: int | None) -> float:
    work = Path(tempfile.mkdtemp(prefix=f"bench-{peer}-", dir=data.parent))
    port = free_port()
    env = _env(nodelay)
    if peer == "dts":
        proc = start_dts(work, port, env, max_pdu)
    elif peer == "storescp":
        proc = start_storescp(work, port, env)
    else:
        proc = start_orthanc(work, port, env)
    try:
        wait_port(port, timeout=60)
        elapsed = send(port, {"dts": "DTS", "storescp": "STORESCP"}.get(peer, "ORTHANC"),
                       data, env)
        if peer == "dts":  # every acknowledged instance is really in the spool
            stored = sum(1 for _ in (work / "spool").rglob("*.dcm"))
            if stored != images:
                raise SystemExit(f"dts stored {stored} of {images} instances")
    finally:
        stop_process(proc)
        shutil.rmtree(work, ignore_errors=True)
    return images / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--small", action="store_true", help="5,000 images of 64x64")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--peers", default="dts,storescp,orthanc")
    ap.add_argument("--modes", default="default,nodelay")
    ap.add_argument("--max-pdu", type=int, default=None,
                    help="[station] max_pdu of dts (default: not set, dts's default)")
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "dts-bench")
    args = ap.parse_args()
    size = args.size or (64 if args.small else 512)
    images = args.images or (5000 if args.small else 1000)
    peers = [p for p in args.peers.split(",") if p]
    if "orthanc" in peers and not Path(ORTHANC).exists():
        peers.remove("orthanc")
    data = make_study(args.data / f"ct-{images}x{size}", images=images, size=size)
    print(f"study: {images} images of {size}x{size}, one association, median of {args.runs}")
    for mode in args.modes.split(","):
        nodelay = mode == "nodelay"
        rates: dict[str, list[float]] = {p: [] for p in peers}
        for _ in range(args.runs):
            for peer in peers:
                rates[peer].append(one_run(peer, data, images, nodelay, args.max_pdu))
        med = {p: statistics.median(r) for p, r in rates.items()}
        label = "TCP_NODELAY=1" if nodelay else "dcmtk defaults (Nagle on)"
        print(f"\n[{label}]")
        for peer in peers:
            runs = " ".join(f"{r:.0f}" for r in rates[peer])
            print(f"  {peer:9s} {med[peer]:7.1f} img/s   (runs: {runs})")
        for peer in peers:
            if peer != "dts" and "dts" in med:
                print(f"  dts / {peer}: {med['dts'] / med[peer]:.2f}")


if __name__ == "__main__":
    main()
