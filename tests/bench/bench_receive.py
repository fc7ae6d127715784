"""Benchmark: dcmtk ``storescu`` sending one study to ``dts receive``, to dcmtk ``storescp``
and to Orthanc, alternating, in one run.

The study is ``tests.bench.data`` (default 1,000 CT images of 512×512, 16 bit; ``--small``
for 5,000 of 64×64). Each receiver is started fresh on a free loopback port, one
``/usr/bin/storescu`` sends the whole folder over one association, and the time until
storescu exits (every instance acknowledged) gives images/s. With ``--senders N`` the study
is N series of images/N and N storescu processes send one series each at once (N parallel
associations; storescp then runs with ``--fork``, one process per association, as it is
deployed for parallel senders); the clock stops when the last one exits. Each round starts
with another peer, and what the runs received is removed only after the last round of a
mode (see ``LEFT``); before each run, whatever the previous one left unwritten is
written (``sync``), outside the clock. dts acknowledges an instance
only once it is fsynced; storescp and Orthanc do not fsync. Each round is run twice: with
dcmtk's defaults (Nagle on, as deployed in hospitals) and with ``TCP_NODELAY=1`` in the
environment of the dcmtk programs (storescu, storescp, Orthanc). Medians of ``--runs``,
each printed with its runs and their spread ((max - min) / median), the peers alternating
within every round. Before each round the machine's idle share over half a second is
read from /proc/stat; a round that starts on a busy machine (other work using more than
``--busy`` of a core) is flagged, because then the ratios say more about the other work.

    .venv/bin/python -m tests.bench.bench_receive [--images 1000] [--size 512] [--runs 3]
        [--small] [--senders 1] [--peers dts,storescp,orthanc] [--modes default,nodelay]
        [--max-pdu N]
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


WORKERS: int | None = None  # --workers: [station] receive_workers of dts (None: its default)


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
{'' if WORKERS is None else f'receive_workers = {WORKERS}'}
classify_rules = "{REPO / 'configuration' / 'classifyRules.json'}"
""")
    env = {k: v for k, v in env.items() if k != "TCP_NODELAY"}  # dts sets its own options
    return subprocess.Popen(DTS + ["-q", "--config", str(cfg), "receive"], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(work / "dts.log", "wb"),
                            cwd=REPO)


def start_storescp(work: Path, port: int, env: dict[str, str],
                   fork: bool = False) -> subprocess.Popen[bytes]:
    out = work / "out"
    out.mkdir()
    return subprocess.Popen([STORESCP, "-aet", "STORESCP", *(["--fork"] if fork else []),
                             "-od", str(out), str(port)],
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


def send(port: int, aec: str, folders: list[Path], env: dict[str, str]) -> float:
    """Every folder by its own storescu, all at once; seconds until the last one exits."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen([STORESCU, "-aet", "BENCH", "-aec", aec, "+sd", "+r", "-q",
                               "127.0.0.1", str(port), str(folder)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for folder in folders]
    failed = []
    for proc in procs:
        _, err = proc.communicate(timeout=3600)
        if proc.returncode != 0:
            failed.append(f"({proc.returncode}): {err.decode(errors='replace')[-2000:]}")
    elapsed = time.perf_counter() - t0
    if failed:
        raise SystemExit(f"storescu to {aec} failed " + "; ".join(failed))
    return elapsed


def busy_cores(seconds: float = 0.5) -> float:
    """How many cores' worth of work the machine did over ``seconds`` (from /proc/stat)."""
    def read() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle
    total0, idle0 = read()
    time.sleep(seconds)
    total1, idle1 = read()
    cores = os.cpu_count() or 1
    span = max(1, total1 - total0)
    return cores * (1 - (idle1 - idle0) / span)


def study_folders(root: Path, images: int, size: int, senders: int) -> list[Path]:
    """The benchmark study as ``senders`` series of ``images / senders`` (one folder each)."""
    if senders == 1:
        return [make_study(root / f"ct-{images}x{size}", images=images, size=size)]
    study_uid = "2.25." + str(int.from_bytes(f"bench{images}x{size}".encode(), "big") % 10**30)
    return [make_study(root / f"ct-{images}x{size}-s{senders}" / f"part{k}",
                       images=images // senders, size=size, study_uid=study_uid)
            for k in range(senders)]


def one_run(peer: str, data: list[Path], images: int, nodelay: bool,
            max_pdu: int | None) -> float:
    os.sync()  # what the previous run left unwritten (storescp and Orthanc do not fsync)
    # is written now, not during this run
    work = Path(tempfile.mkdtemp(prefix=f"bench-{peer}-", dir=data[0].parent if len(data) == 1
                                else data[0].parent.parent))
    port = free_port()
    env = _env(nodelay)
    if peer == "dts":
        proc = start_dts(work, port, env, max_pdu)
    elif peer == "storescp":
        proc = start_storescp(work, port, env, fork=len(data) > 1)
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
        LEFT.append(work)
    return images / elapsed


# The folders of finished runs, removed only at the end: on ext4 without a journal (this
# machine's disk) the kernel skips inodes freed within the last 30 s when it allocates
# new ones, one lookup per skipped inode, so that a receiver started right after the
# previous run's 1,000 files were removed spent a third of its CPU making files.
LEFT: list[Path] = []


def remove_left() -> None:
    while LEFT:
        shutil.rmtree(LEFT.pop(), ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--small", action="store_true", help="5,000 images of 64x64")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--senders", type=int, default=1,
                    help="parallel storescu processes (associations), one series each")
    ap.add_argument("--workers", type=int, default=None,
                    help="[station] receive_workers of dts (default: not set, one per core)")
    ap.add_argument("--busy", type=float, default=0.3,
                    help="flag a round when other work uses more than this many cores")
    ap.add_argument("--peers", default="dts,storescp,orthanc")
    ap.add_argument("--modes", default="default,nodelay")
    ap.add_argument("--max-pdu", type=int, default=None,
                    help="[station] max_pdu of dts (default: not set, dts's default)")
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "dts-bench")
    args = ap.parse_args()
    global WORKERS
    WORKERS = args.workers
    size = args.size or (64 if args.small else 512)
    images = args.images or (5000 if args.small else 1000)
    peers = [p for p in args.peers.split(",") if p]
    if "orthanc" in peers and not Path(ORTHANC).exists():
        peers.remove("orthanc")
    images -= images % args.senders
    data = study_folders(args.data, images, size, args.senders)
    how = "one association" if args.senders == 1 else \
        f"{args.senders} associations at once (storescp --fork)"
    print(f"study: {images} images of {size}x{size}, {how}, median of {args.runs}")
    for mode in args.modes.split(","):
        nodelay = mode == "nodelay"
        rates: dict[str, list[float]] = {p: [] for p in peers}
        busy_rounds = []
        for i in range(args.runs):
            busy = busy_cores()
            if busy > args.busy:
                busy_rounds.append(f"round {i + 1}: {busy:.2f} cores busy before it started")
            for peer in peers[i % len(peers):] + peers[:i % len(peers)]:  # each first once
                try:
                    rates[peer].append(one_run(peer, data, images, nodelay, args.max_pdu))
                except BaseException:
                    failed = LEFT.pop() if LEFT else None
                    remove_left()
                    if failed is not None:
                        print(f"the failed run's folder is kept: {failed}")
                    raise
        remove_left()
        med = {p: statistics.median(r) for p, r in rates.items()}
        label = "TCP_NODELAY=1" if nodelay else "dcmtk defaults (Nagle on)"
        print(f"\n[{label}]")
        for line in busy_rounds:
            print(f"  NOT QUIET: {line}; its figures are unreliable")
        for peer in peers:
            runs = " ".join(f"{r:.0f}" for r in rates[peer])
            spread = (max(rates[peer]) - min(rates[peer])) / med[peer]
            print(f"  {peer:9s} {med[peer]:7.1f} img/s   (runs: {runs}; spread {spread:.0%})")
        for peer in peers:
            if peer != "dts" and "dts" in med:
                print(f"  dts / {peer}: {med['dts'] / med[peer]:.2f}")


if __name__ == "__main__":
    main()
