"""Benchmark: what ``dts run`` adds around a model, against named peers, same run.

One synthetic CT study (``tests.bench.data``: 1,000 images of 512x512 by default) is
put into a run job, then, ``--runs`` times each, alternately:

- the input view: ``dts.runner.build_view`` (hard links + task.json) against
  ``cp -r`` of the same files (the byte copy it avoids);
- the whole stage: ``dts run --once`` of the example stream (command executor,
  output validation, moves) against running the same example module directly
  (``python -m dts.examples.series_statistics IN OUT``).

Medians and ratios are printed. Wall-clock numbers drift between machines; the ratios
measured in one run are what to compare.

    .venv/bin/python -m tests.bench.bench_run [--images 1000] [--size 512] [--runs 3]
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
from tests.helpers import DTS, REPO


def timed(fn: object) -> float:
    t0 = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "dts-bench",
                    help="where the benchmark study is kept between runs")
    args = ap.parse_args()

    from dts import config as config_mod
    from dts.runner import build_view
    from dts.spool import Job, Queue, Spool, State, new_job_id

    study_dir = make_study(args.data / f"study-{args.images}x{args.size}" / "series",
                           images=args.images, size=args.size)
    stream = config_mod.load(None).stream("series-statistics")
    assert stream is not None
    work = Path(tempfile.mkdtemp(prefix="dts-bench-run-", dir=args.data))
    try:
        spool = Spool(work / "spool").ensure()

        def new_run_job(publish: bool = True) -> Job:
            job = spool.create_tmp_job(f"{new_job_id()}.series-statistics")
            series = job.input_dir / "1.2.3"
            series.mkdir(parents=True)
            for f in study_dir.iterdir():
                os.link(f, series / f.name)
            job.write({"stream": "series-statistics", "selection": {"main": ["1.2.3"]},
                       "patient_id": "BENCH001"})
            if publish:
                spool.publish(job, Queue.RUN)
            return job

        view_s, copy_s, stage_s, direct_s = [], [], [], []
        job = new_run_job(publish=False)  # stays in tmp/: only for the view
        for _ in range(args.runs):
            view_s.append(timed(lambda: build_view(job, job.read(), stream)))
            shutil.rmtree(job.path / "view")
            dest = work / "copy"
            copy_s.append(timed(lambda: subprocess.run(
                ["cp", "-r", str(job.input_dir), str(dest)], check=True)))
            shutil.rmtree(dest)

            new_run_job()
            env = {k: v for k, v in os.environ.items() if not k.startswith("DTS_")}
            stage_s.append(timed(lambda: subprocess.run(
                DTS + ["--spool", str(spool.root), "run", "--once"], check=True, env=env,
                cwd=REPO, stdout=subprocess.DEVNULL)))
            out = work / "direct-out"
            direct_s.append(timed(lambda: subprocess.run(
                [sys.executable, "-m", "dts.examples.series_statistics", str(study_dir),
                 str(out)], check=True, env={**env, "threshold": "300"}, cwd=REPO,
                stdout=subprocess.DEVNULL)))
            shutil.rmtree(out)
        assert len(spool.list(Queue.SEND, State.NEW)) == args.runs, "a run did not succeed"

        def line(name: str, ours: list[float], peer_name: str, peer: list[float]) -> None:
            a, b = statistics.median(ours), statistics.median(peer)
            print(f"{name:<34} {a:8.3f} s   {peer_name:<34} {b:8.3f} s   ratio {a / b:6.2f}")
        print(f"{args.images} images of {args.size}x{args.size}, median of {args.runs} runs")
        line("input view (hard links)", view_s, "cp -r of the input", copy_s)
        line("dts run --once (example stream)", stage_s, "example module run directly",
             direct_s)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
