"""How long building study.json takes for a large study: sampled headers vs every header.

    .venv/bin/python -m tests.bench.bench_classify [--series 10] [--per-series 500]

Generates one MR study (default 5,000 instances of 64x64 in 10 series, Siemens-like so
the seed rule file has work to do), then, in alternating rounds, times
``dts.studydoc.build_study`` as dts runs it (a spread sample of headers per series, all
of them where the sample is not uniform) against the named peer "read every header"
(the same code reading all headers with pydicom, ``stop_before_pixels``), checks that
both give the same study document, and prints medians and the ratio. Last, it times the
whole classify stage for that study (``classifier.serve(once=True)``: study.json, the
feedback-loop guard, two streams, two run jobs of hard links).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from dts import classifier
from dts.rules import load_rules
from dts.spool import Queue, State
from dts.station import Station
from dts.studydoc import build_study
from tests.helpers import make_instance

REPO = Path(__file__).resolve().parent.parent.parent
SEED_RULES = REPO / "configuration" / "classifyRules.json"


def generate(folder: Path, n_series: int, per_series: int) -> None:
    study = generate_uid()
    for s in range(n_series):
        series = generate_uid()
        for i in range(per_series):
            sop = generate_uid()
            make_instance(folder / series / f"{sop}.dcm", study_uid=study, series_uid=series,
                          sop_uid=sop, series_number=s + 1, instance_number=i + 1,
                          modality="MR", rows=64, cols=64, Manufacturer="SIEMENS",
                          ImageType=["ORIGINAL", "PRIMARY", "M", "ND"],
                          SeriesDescription=f"series {s + 1}", SequenceName="*tfl3d1_16ns")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=int, default=10)
    ap.add_argument("--per-series", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rules = load_rules(SEED_RULES)
    with tempfile.TemporaryDirectory(prefix="dts-bench-classify-") as tmp:
        root = Path(tmp)
        inp = root / "input"
        t0 = time.perf_counter()
        generate(inp, args.series, args.per_series)
        n = args.series * args.per_series
        print(f"study: {n} instances in {args.series} series "
              f"(generated in {time.perf_counter() - t0:.1f}s)")
        ours: list[float] = []
        peer: list[float] = []
        floor: list[float] = []
        files = sorted(inp.glob("*/*.dcm"))
        for _ in range(args.rounds):
            t = time.perf_counter()
            for f in files:
                pydicom.dcmread(f, stop_before_pixels=True)
            floor.append(time.perf_counter() - t)
            t = time.perf_counter()
            full = build_study(inp, {}, rules, read_all=True)
            peer.append(time.perf_counter() - t)
            t = time.perf_counter()
            sampled = build_study(inp, {}, rules)
            ours.append(time.perf_counter() - t)
        for a, b in zip(full.doc["series"], sampled.doc["series"]):
            assert a == b, (a, b)
        m_ours, m_peer = statistics.median(ours), statistics.median(peer)
        m_floor = statistics.median(floor)
        print(f"dcmread of every header alone: {m_floor * 1000:8.1f} ms  "
              "(what any read-everything strategy costs at least)")
        print(f"read every header (peer):      {m_peer * 1000:8.1f} ms  "
              f"({full.headers_read} headers, {n / m_peer:,.0f} instances/s)")
        print(f"dts sampled headers:           {m_ours * 1000:8.1f} ms  "
              f"({sampled.headers_read} headers, {n / m_ours:,.0f} instances/s)")
        print(f"ratio peer/dts: {m_peer / m_ours:.1f}x faster; dcmread-alone/dts: "
              f"{m_floor / m_ours:.1f}x (medians of {args.rounds} alternating rounds)")

        # the whole stage on that study: two streams, run jobs of hard links
        spool_dir = root / "spool"
        cfg = root / "dts.toml"
        cfg.write_text(f'[station]\nspool = "{spool_dir}"\nclassify_rules = "{SEED_RULES}"\n'
                       '[[stream]]\nname = "all"\ncommand = ["true"]\n'
                       '[[stream]]\nname = "t1"\ncommand = ["true"]\n'
                       "select.t1 = \"series[?contains(ClassifyType, 'ABCD-T1')]\"\n")
        station = Station.open(cfg)
        job = station.spool.create_tmp_job()
        for series_dir in inp.iterdir():
            (job.input_dir / series_dir.name).mkdir(parents=True)
            for f in series_dir.iterdir():
                os.link(f, job.input_dir / series_dir.name / f.name)
        job.write({"calling_ae": "PACS", "called_ae": "DTS", "attempts": 0})
        station.spool.publish(job, Queue.CLASSIFY)
        t = time.perf_counter()
        tally = classifier.serve(station, once=True)
        stage = time.perf_counter() - t
        assert tally.done == [job.id], tally
        print(f"whole classify stage (study.json, guard, 2 streams evaluated, "
              f"{len(station.spool.list(Queue.RUN, State.NEW))} run jobs of hard links): "
              f"{stage * 1000:.1f} ms")


if __name__ == "__main__":
    main()
