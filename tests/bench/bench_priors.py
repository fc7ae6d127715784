"""Benchmark: fetching a prior study from Orthanc, dts against dcmtk, alternating, in one run.

The study is ``tests.bench.data`` (default 300 CT images of 512×512, 16 bit) stored in one
Orthanc on a free loopback port. Each round retrieves the whole study four ways:

- ``dts C-GET``: ``dts.priors.retrieve_get`` (what ``dts run`` does for ``method = "get"``):
  every instance checked (study, patient, UIDs) and fsynced before it is acknowledged;
- ``getscu``: dcmtk's ``getscu`` into a folder (no fsync);
- ``dts C-MOVE``: ``dts.priors.retrieve_move`` to a running ``dts receive``, which routes
  the instances to ``spool/priors/<job>/`` (fsync) before the run stage renames them in;
- ``movescu``: dcmtk's ``movescu`` to dcmtk's ``storescp`` (no fsync).

The dcmtk programs and Orthanc run with ``TCP_NODELAY=1`` in their environment (with
dcmtk's default, Nagle on, getscu and movescu stall ~40 ms per image on loopback; see
docs/performance.md). Medians of ``--runs`` and the ratios dts/dcmtk are printed.

    .venv/bin/python -m tests.bench.bench_priors [--images 300] [--size 512] [--runs 3]
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
import urllib.request
from pathlib import Path

from tests.bench.data import make_study
from tests.helpers import (
    DTS,
    ORTHANC,
    REPO,
    STORESCP,
    STORESCU,
    free_port,
    stop_process,
    wait_for,
    wait_port,
)
from tests.plugins.peers import _orthanc_config

GETSCU = "/usr/bin/getscu"
MOVESCU = "/usr/bin/movescu"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    study = make_study(Path(tempfile.gettempdir()) / f"dts-bench-study-{args.images}-"
                       f"{args.size}", images=args.images, size=args.size)
    study_uid = _study_uid(study)
    work = Path(tempfile.mkdtemp(prefix="dts-bench-priors-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DTS_")}
    env["TCP_NODELAY"] = "1"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        dts_port, scp_port, pacs_port, http_port = (free_port() for _ in range(4))
        folder = work / "orthanc"
        folder.mkdir()
        cfg = _orthanc_config(folder, "ORTHANC", pacs_port, http_port,
                              {"DTS": ("DTS", "127.0.0.1", dts_port),
                               "STORESCP": ("STORESCP", "127.0.0.1", scp_port)},
                              False, False, {})
        (folder / "orthanc.json").write_text(json.dumps(cfg))
        procs.append(subprocess.Popen([ORTHANC, str(folder / "orthanc.json")], cwd=folder, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        wait_for(lambda: _alive(http_port), 30, what="Orthanc")
        wait_port(pacs_port)
        subprocess.run([STORESCU, "-aec", "ORTHANC", "+sd", "+r", "127.0.0.1", str(pacs_port),
                        str(study)], check=True, capture_output=True)
        config = _dts_config(work, dts_port, pacs_port)
        procs.append(subprocess.Popen([*DTS, "--config", str(config), "receive"], cwd=REPO,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        wait_port(dts_port)
        scp_out = work / "storescp"
        scp_out.mkdir()
        procs.append(subprocess.Popen([STORESCP, "-aet", "STORESCP", "-od", str(scp_out),
                                       str(scp_port)], env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.STDOUT))
        wait_port(scp_port)
        times: dict[str, list[float]] = {k: [] for k in ("dts C-GET", "getscu", "dts C-MOVE",
                                                         "movescu")}
        for _ in range(args.runs):
            times["dts C-GET"].append(_dts(config, study_uid, "get", args.images))
            times["getscu"].append(_dcmtk([GETSCU, "-aet", "DTS", "-aec", "ORTHANC", "-S",
                                           "-k", "QueryRetrieveLevel=STUDY",
                                           "-k", f"StudyInstanceUID={study_uid}",
                                           "-od", "{out}", "127.0.0.1", str(pacs_port)],
                                          work / "getscu", args.images, env))
            times["dts C-MOVE"].append(_dts(config, study_uid, "move", args.images))
            shutil.rmtree(scp_out)
            scp_out.mkdir()
            times["movescu"].append(_dcmtk([MOVESCU, "-aet", "DTS", "-aec", "ORTHANC",
                                            "-aem", "STORESCP", "-S",
                                            "-k", "QueryRetrieveLevel=STUDY",
                                            "-k", f"StudyInstanceUID={study_uid}",
                                            "127.0.0.1", str(pacs_port)],
                                           scp_out, args.images, env, made=True))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"prior study of {args.images} images of {args.size}x{args.size} from Orthanc "
              f"({args.runs} runs, medians):")
        for k, v in med.items():
            print(f"  {k:11s} {v:6.2f} s  {args.images / v:7.1f} images/s")
        print(f"  ratio dts C-GET / getscu   {med['dts C-GET'] / med['getscu']:.2f} (time)")
        print(f"  ratio dts C-MOVE / movescu {med['dts C-MOVE'] / med['movescu']:.2f} (time)")
        return 0
    finally:
        for proc in procs:
            stop_process(proc)
        shutil.rmtree(work, ignore_errors=True)


def _study_uid(folder: Path) -> str:
    import pydicom

    first = next(folder.glob("*.dcm"))
    return str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)


def _alive(http_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/system", timeout=1):
            return True
    except OSError:
        return False


def _dts_config(work: Path, port: int, pacs_port: int) -> Path:
    cfg = work / "dts.toml"
    cfg.write_text(f"""
[station]
ae_title = "DTS"
host = "127.0.0.1"
port = {port}
spool = "{work / 'spool'}"
min_free_mb = 0
classify_rules = "{REPO / 'configuration' / 'classifyRules.json'}"

[[destination]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {pacs_port}

[[stream]]
name = "bench"
command = ["true"]
priors = {{ from = "pacs" }}
""")
    return cfg


def _dts(config: Path, study_uid: str, method: str, images: int) -> float:
    """One retrieval the way the run stage does it, into a fresh job folder."""
    from pydicom.uid import CTImageStorage

    from dts import priors
    from dts.spool import Job
    from dts.station import Station

    station = Station.open(config)
    stream = station.config.streams[0]
    assert stream.priors is not None
    net = priors.Network.of(station, stream.priors)
    job = station.spool.create_tmp_job()
    root = job.path / priors.FETCH_DIR
    root.mkdir()
    candidate = priors.Candidate(study_uid=study_uid, sop_classes=(str(CTImageStorage),))
    start = time.perf_counter()
    if method == "get":
        got = priors.retrieve_get(net, candidate, "BENCH001", root, station.spool.tmp)
    else:
        got = priors.retrieve_move(station, net, Job(job.path), candidate, "BENCH001", root)
    took = time.perf_counter() - start
    assert got.instances == images and not got.refused, (got.instances, got.refused[:3])
    shutil.rmtree(job.path)
    return took


def _dcmtk(argv: list[str], out: Path, images: int, env: dict[str, str],
           made: bool = False) -> float:
    if not made:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
    argv = [str(out) if a == "{out}" else a for a in argv]
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, env=env)
    took = time.perf_counter() - start
    got = sum(1 for _ in out.iterdir())
    assert got == images, (argv[0], got)
    return took


if __name__ == "__main__":
    raise SystemExit(main())
