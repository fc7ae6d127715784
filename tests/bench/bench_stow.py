"""Benchmark: one study stored by STOW-RS into ``dts web`` and into Orthanc's DICOMweb
plugin, and by C-STORE (dcmtk storescu) into ``dts receive``, alternating, in one run.

The study is ``tests.bench.data`` (default 300 CT images of 512×512). The STOW-RS client
is plain ``requests``: the files as they are, ``--batch`` parts per request (the
``multipart/related`` bodies are built in memory before the clock starts), requests one
after the other; the time until the last answer gives images/s. dts answers only once every part is fsynced and renamed
into ``incoming/`` (Orthanc does not fsync). Medians of ``--runs``. Only 127.0.0.1.

    .venv/bin/python -m tests.bench.bench_stow [--images 300] [--batch 50] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import requests

from tests.bench.bench_receive import _env, send
from tests.bench.bench_receive import start_dts as start_receive
from tests.bench.data import make_study
from tests.helpers import DTS, ORTHANC, REPO, free_port, stop_process, wait_port

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
BOUNDARY = "bench-boundary-7d1f"
TOKEN = "bench-token"


def _bodies(data: Path, batch: int) -> list[bytes]:
    files = sorted(data.glob("*.dcm"))
    out = []
    for i in range(0, len(files), batch):
        body = b"".join(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                        + f.read_bytes() + b"\r\n" for f in files[i:i + batch])
        out.append(body + f"--{BOUNDARY}--\r\n".encode())
    return out


def _post_all(url: str, bodies: list[bytes], headers: dict[str, str]) -> float:
    session = requests.Session()
    session.trust_env = False
    t0 = time.perf_counter()
    for body in bodies:
        rsp = session.post(url, data=body, headers=headers, timeout=600)
        if rsp.status_code != 200:
            raise SystemExit(f"{url}: HTTP {rsp.status_code} {rsp.text[:500]}")
    return time.perf_counter() - t0


def _dts_web(work: Path, port: int) -> subprocess.Popen[bytes]:
    (work / "token").write_text(TOKEN)
    cfg = work / "dts.toml"
    cfg.write_text(f"""
[station]
spool = "{work / 'spool'}"
stable_seconds = 2
min_free_mb = 0
classify_rules = "{REPO / 'configuration' / 'classifyRules.json'}"
[web]
port = {port}
[stow]
enabled = true
token_file = "{work / 'token'}"
""")
    return subprocess.Popen(DTS + ["-q", "--config", str(cfg), "web"],
                            stdout=subprocess.DEVNULL, stderr=open(work / "web.log", "wb"),
                            cwd=REPO)


def _orthanc(work: Path, port: int) -> subprocess.Popen[bytes]:
    cfg = {"Name": "bench", "StorageDirectory": str(work / "storage"),
           "IndexDirectory": str(work / "index"), "StorageCompression": False,
           "DicomPort": free_port(), "HttpPort": port, "RemoteAccessAllowed": False,
           "AuthenticationEnabled": False, "Plugins": [PLUGIN], "SaveJobs": False,
           "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "StableAge": 60}
    (work / "orthanc.json").write_text(json.dumps(cfg))
    return subprocess.Popen([ORTHANC, str(work / "orthanc.json")], stdout=subprocess.DEVNULL,
                            stderr=open(work / "orthanc.log", "wb"))


def one_run(peer: str, data: Path, bodies: list[bytes], images: int) -> float:
    work = Path(tempfile.mkdtemp(prefix=f"bench-stow-{peer}-", dir=data.parent))
    port = free_port()
    if peer == "dts-web":
        proc = _dts_web(work, port)
    elif peer == "orthanc":
        proc = _orthanc(work, port)
    else:
        proc = start_receive(work, port, _env(False), None)
    try:
        wait_port(port, timeout=60)
        if peer == "dts-receive":
            elapsed = send(port, "DTS", data, _env(False))
        else:
            headers = {"Content-Type": f'multipart/related; type="application/dicom"; '
                                       f'boundary={BOUNDARY}'}
            if peer == "dts-web":
                headers["Authorization"] = f"Bearer {TOKEN}"
            elapsed = _post_all(f"http://127.0.0.1:{port}/dicom-web/studies", bodies, headers)
        if peer != "orthanc":
            stored = sum(1 for _ in (work / "spool").rglob("*.dcm"))
            if stored != images:
                raise SystemExit(f"{peer} stored {stored} of {images} instances")
    finally:
        stop_process(proc)
        shutil.rmtree(work, ignore_errors=True)
    return images / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    root = Path(tempfile.gettempdir()) / "dts-bench"
    data = make_study(root / f"study-{args.images}-512", images=args.images, size=512)
    bodies = _bodies(data, args.batch)
    peers = ("dts-web", "orthanc", "dts-receive")
    rates: dict[str, list[float]] = {p: [] for p in peers}
    for _ in range(args.runs):
        for peer in peers:
            rates[peer].append(one_run(peer, data, bodies, args.images))
    med = {p: statistics.median(r) for p, r in rates.items()}
    for p in peers:
        print(f"{p:12s} {med[p]:7.1f} images/s  (runs: "
              f"{', '.join(f'{r:.0f}' for r in rates[p])})")
    print(f"ratio dts-web / orthanc (STOW-RS): {med['dts-web'] / med['orthanc']:.2f}")
    print(f"ratio dts-web STOW-RS / dts-receive C-STORE: "
          f"{med['dts-web'] / med['dts-receive']:.2f}")


if __name__ == "__main__":
    main()
