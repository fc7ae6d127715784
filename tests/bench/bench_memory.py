"""Benchmark: the peak memory of every dts process while a 2 GB study arrives.

The study (one, written once into ``--data`` and reused): ``--instances`` (2,000) CT images
of 1 MB (512×1024, 16 bit) in one series, plus one multi-frame instance of ``--frame-mb``
(500) MB (512×512 frames, 16 bit) in a second series. dcmtk ``storescu`` sends it over one
association to ``dts watch`` (receiver, classify, run and send in one process; the stream
runs a command that reads nothing and writes nothing), then the same to dcmtk ``storescp``,
the named peer. Every process of each receiver's process tree is sampled every 50 ms
(``/proc/<pid>/status``: VmHWM, the kernel's own peak resident set, and VmRSS); the
printout is each process's peak, and the ratio of dts's largest to storescp's.

The target (issue 16): every dts process below 200 MB.

    .venv/bin/python -m tests.bench.bench_memory [--instances 2000] [--frame-mb 500]
        [--data /tmp/dts-bench-memory]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dts.journal import EventFilter, read_events
from dts.spool import Spool
from tests.helpers import DTS, REPO, STORESCP, STORESCU, free_port, stop_process, wait_for, wait_port

TARGET_MB = 200.0
MULTIFRAME_CT = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT Image Storage


def _base(study_uid: str, series_uid: str, series_number: int) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.FrameOfReferenceUID = generate_uid()
    ds.PatientID, ds.PatientName = "MEM001", "Memory^Bench"
    ds.AccessionNumber = "MEM1"
    ds.StudyDate, ds.StudyTime, ds.StudyID = "20261202", "060000", "1"
    ds.Modality, ds.SeriesNumber = "CT", series_number
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 1
    return ds


def _save(ds: Dataset, sop_class: str, path: Path) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)


def make_data(folder: Path, instances: int, frame_mb: int) -> Path:
    stamp = folder.with_name(folder.name + ".study.txt")
    key = f"instances={instances} frame_mb={frame_mb}"
    if stamp.exists() and stamp.read_text().strip() == key:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    study = generate_uid()
    ds = _base(study, generate_uid(), 1)
    ds.Rows, ds.Columns = 512, 1024
    pixels = np.random.default_rng(1).integers(-1000, 2000, size=(512, 1024), dtype=np.int16)
    for i in range(instances):
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        ds.PixelData = np.roll(pixels, i, axis=1).tobytes()
        _save(ds, CTImageStorage, folder / "a" / f"{ds.SOPInstanceUID}.dcm")
    frames = frame_mb * 1024 * 1024 // (512 * 512 * 2)
    mf = _base(study, generate_uid(), 2)
    mf.SOPInstanceUID = generate_uid()
    mf.Rows = mf.Columns = 512
    mf.NumberOfFrames = frames
    mf.InstanceNumber = 1
    mf.PixelData = np.zeros((frames, 512, 512), dtype=np.int16).tobytes()
    _save(mf, MULTIFRAME_CT, folder / "b" / f"{mf.SOPInstanceUID}.dcm")
    del mf
    stamp.write_text(key + "\n")
    return folder


def _tree(root: int) -> list[int]:
    """``root`` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


class Sampler(threading.Thread):
    """Peak VmHWM (MB) of every process in a tree, by process id and command line."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root, self.peaks = root, {}
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            for pid in _tree(self.root):
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                except OSError:
                    continue
                hwm = next((int(line.split()[1]) / 1024 for line in status.splitlines()
                            if line.startswith("VmHWM:")), 0.0)
                label = cmd.decode(errors="replace").strip()[:90]
                if not label:  # a child that has exited (a zombie): nothing resident
                    continue
                old = self.peaks.get(pid, (label, 0.0))
                self.peaks[pid] = (label, max(old[1], hwm))
            self.stop_event.wait(0.05)

    def finish(self) -> dict[int, tuple[str, float]]:
        self.stop_event.set()
        self.join(5)
        return self.peaks


def send(port: int, aec: str, data: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([STORESCU, "-aet", "BENCH", "-aec", aec, "+sd", "+r", "-q", "127.0.0.1",
                    str(port), str(data)], check=True, timeout=3600,
                   env={**os.environ, "TCP_NODELAY": "1"})
    return time.perf_counter() - t0


def run_dts(data: Path, work: Path) -> tuple[float, dict[int, tuple[str, float]]]:
    port = free_port()
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

[[stream]]
name = "look"
command = ["true"]
expect_output = false
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DTS_")}
    proc = subprocess.Popen([*DTS, "-q", "--config", str(cfg), "watch"], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=open(work / "watch.log", "wb"))
    sampler = Sampler(proc.pid)
    try:
        wait_port(port, 60)
        sampler.start()
        elapsed = send(port, "DTS", data)
        spool = Spool(work / "spool")
        wait_for(lambda: list(read_events(spool, EventFilter(event="finished"))), 600,
                 interval=0.2, what="the run of the received study")
    finally:
        stop_process(proc, signal.SIGTERM)
    return elapsed, sampler.finish()


def run_storescp(data: Path, work: Path) -> tuple[float, dict[int, tuple[str, float]]]:
    port = free_port()
    (work / "out").mkdir()
    proc = subprocess.Popen([STORESCP, "-aet", "STORESCP", "-od", str(work / "out"), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TCP_NODELAY": "1"})
    sampler = Sampler(proc.pid)
    try:
        wait_port(port, 30)
        sampler.start()
        elapsed = send(port, "STORESCP", data)
    finally:
        stop_process(proc, signal.SIGTERM)
    return elapsed, sampler.finish()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=2000)
    ap.add_argument("--frame-mb", type=int, default=500)
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "dts-bench-memory")
    args = ap.parse_args()
    data = make_data(args.data, args.instances, args.frame_mb)
    size = sum(p.stat().st_size for p in data.rglob("*.dcm")) / 1e9
    print(f"study: {args.instances} instances of 1 MB + one of {args.frame_mb} MB "
          f"({size:.2f} GB), one association, storescu TCP_NODELAY=1")
    peaks: dict[str, dict[int, tuple[str, float]]] = {}
    for peer, fn in (("dts", run_dts), ("storescp", run_storescp)):
        work = Path(tempfile.mkdtemp(prefix=f"bench-mem-{peer}-", dir=args.data.parent))
        try:
            elapsed, peaks[peer] = fn(data, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f"\n[{peer}] received in {elapsed:.1f} s ({size * 1000 / elapsed:.0f} MB/s); "
              "peak resident memory per process:")
        for pid, (label, mb) in sorted(peaks[peer].items(), key=lambda kv: -kv[1][1]):
            print(f"  {mb:7.1f} MB  pid {pid:<7d} {label}")
    dts_max = max(mb for _, mb in peaks["dts"].values())
    scp_max = max(mb for _, mb in peaks["storescp"].values())
    print(f"\n  largest dts process {dts_max:.1f} MB (target < {TARGET_MB:.0f} MB: "
          f"{'met' if dts_max < TARGET_MB else 'NOT met'}); storescp {scp_max:.1f} MB; "
          f"dts / storescp = {dts_max / scp_max:.1f}x")
    sys.exit(0 if dts_max < TARGET_MB else 1)


if __name__ == "__main__":
    main()
