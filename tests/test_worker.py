"""The shared claim loop: an unexpected error never loses a job nor retries it forever;
the engine (``worker.ClaimLoop``) takes each job once per round, respects not-before
pauses and due times, runs N claimers without taking a job twice, wakes at once and
stops without cutting a job short; ``stop_on_signals`` turns signals into its stop."""

from __future__ import annotations

import os
import signal
import threading
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from dts import worker
from dts.cli.common import stop_on_signals
from dts.spool import Claim, Job, Queue, State
from dts.station import Station
from tests.helpers import wait_for


def _broken(station: Station, claim: Claim) -> worker.Outcome:
    raise RuntimeError("stage bug")


def _publish(station: Station, data: bytes | None = None) -> str:
    job = station.spool.create_tmp_job()
    if data is None:
        job.write({"attempts": 0, "study_uid": "1.2.3"})
    else:
        job.job_file.write_bytes(data)
    station.spool.publish(job, Queue.CLASSIFY)
    return job.id


def test_a_job_that_always_trips_the_stage_fails_after_max_attempts(base_config: Path) -> None:
    station = Station.open(base_config)
    assert station.config.station.max_attempts == 3
    jid = _publish(station)
    outcomes = []
    for _ in range(3):
        tally = worker.serve(station, Queue.CLASSIFY, _broken, once=True)
        outcomes.append(tally.exit_code)
    assert outcomes == [75, 75, 1]
    assert station.spool.list(Queue.CLASSIFY, State.NEW) == []
    failed = Job(station.spool.dir(Queue.FAILED) / jid)
    data = failed.read()
    assert data["attempts"] == 3 and "stage bug" in data["error"]
    assert data["study_uid"] == "1.2.3"  # job.json kept, only annotated
    events = [e["event"] for e in failed.events()]
    assert events == ["internal-error", "internal-error", "failed"]


def test_an_unreadable_job_json_goes_to_failed_untouched(base_config: Path) -> None:
    station = Station.open(base_config)
    jid = _publish(station, b"{not json")

    def reads_job(station: Station, claim: Claim) -> worker.Outcome:
        claim.job.read()
        return worker.Outcome.DONE

    tally = worker.serve(station, Queue.CLASSIFY, reads_job, once=True)
    assert tally.failed == [jid] and tally.exit_code == 1
    failed = Job(station.spool.dir(Queue.FAILED) / jid)
    assert failed.job_file.read_bytes() == b"{not json"  # evidence kept as it was
    [ev] = failed.events()
    assert ev["event"] == "failed" and "unreadable job.json" in ev["message"]


# -- the engine -----------------------------------------------------------------------


def _jobs(station: Station, n: int) -> list[str]:
    return [_publish(station) for _ in range(n)]


class _Recorder:
    """A process function that notes what it took (and when), then gives ``outcome``;
    RETRY leaves the job to the claim's default: back in new/, claimable again."""

    def __init__(self, outcome: worker.Outcome = worker.Outcome.RETRY,
                 hold: float = 0.0) -> None:
        self.outcome, self.hold = outcome, hold
        self.lock = threading.Lock()
        self.taken: list[tuple[str, float]] = []
        self.running = 0
        self.most = 0

    def __call__(self, station: Station, claim: Claim) -> worker.Outcome:
        with self.lock:
            self.taken.append((claim.id, time.monotonic()))
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(self.hold)
        with self.lock:
            self.running -= 1
        if self.outcome is worker.Outcome.DONE:
            claim.move(Queue.DONE)
        return self.outcome

    def ids(self) -> list[str]:
        with self.lock:
            return [j for j, _ in self.taken]


class _Serving:
    """``loop.serve()`` in a thread; ``finish()`` stops it and returns its tally."""

    def __init__(self, loop: worker.ClaimLoop) -> None:
        self.loop = loop
        self.result: list[worker.Tally] = []
        self.thread = threading.Thread(target=lambda: self.result.append(loop.serve()),
                                       daemon=True)
        self.thread.start()

    def finish(self, within: float = 5.0) -> worker.Tally:
        self.loop.stop.set()
        self.thread.join(within)
        assert not self.thread.is_alive(), "the loop did not stop"
        return self.result[0]


def _idle_probe() -> tuple[threading.Event, Any]:
    """An event set each time a claimer is about to sleep (``due`` is asked just then)."""
    idle = threading.Event()

    def due() -> None:
        idle.set()
    return idle, due


def test_a_round_takes_each_job_once_oldest_first(base_config: Path) -> None:
    station = Station.open(base_config)
    jobs = _jobs(station, 4)
    rec = _Recorder(worker.Outcome.RETRY)  # each goes straight back into new/
    tally = worker.ClaimLoop(station, Queue.CLASSIFY, rec).drain()
    assert rec.ids() == sorted(jobs)
    assert tally.retry == sorted(jobs) and tally.exit_code == 75
    assert station.spool.list(Queue.CLASSIFY, State.NEW) == sorted(jobs)


def test_a_job_put_back_waits_for_the_next_round(base_config: Path) -> None:
    station = Station.open(base_config)
    _jobs(station, 1)
    rec = _Recorder(worker.Outcome.RETRY)
    serving = _Serving(worker.ClaimLoop(station, Queue.CLASSIFY, rec, poll=0.3))
    wait_for(lambda: len(rec.taken) >= 3, 10, what="three rounds")
    serving.finish()
    times = [t for _, t in rec.taken]
    assert all(b - a >= 0.25 for a, b in pairwise(times)), times


def test_a_paused_job_is_not_taken_before_its_time_and_is_taken_then(
        base_config: Path) -> None:
    station = Station.open(base_config)
    _jobs(station, 1)
    rec = _Recorder(worker.Outcome.RETRY)
    # polling every minute: the retry can only come from the end of the pause
    loop = worker.ClaimLoop(station, Queue.CLASSIFY, rec, poll=60.0, pause=0.5)
    serving = _Serving(loop)
    wait_for(lambda: len(rec.taken) >= 3, 15, what="two retries after their pauses")
    serving.finish()
    times = [t for _, t in rec.taken]
    gaps = [b - a for a, b in pairwise(times)]
    assert all(0.5 <= g < 5.0 for g in gaps), gaps


def test_n_claimers_never_take_one_job_twice(base_config: Path) -> None:
    station = Station.open(base_config)
    jobs = _jobs(station, 12)
    # put back at once: a claimer that did not share the round would take it again
    rec = _Recorder(worker.Outcome.RETRY, hold=0.05)
    tally = worker.ClaimLoop(station, Queue.CLASSIFY, rec, claimers=4).drain()
    assert sorted(rec.ids()) == sorted(jobs)  # each exactly once
    assert 1 < rec.most <= 4
    assert sorted(tally.retry) == sorted(jobs)


def test_n_claimers_serving_take_every_job_once(base_config: Path) -> None:
    station = Station.open(base_config)
    jobs = _jobs(station, 12)
    rec = _Recorder(worker.Outcome.DONE, hold=0.02)
    serving = _Serving(worker.ClaimLoop(station, Queue.CLASSIFY, rec, claimers=3, poll=0.05))
    wait_for(lambda: len(station.spool.list(Queue.DONE)) == 12, 15, what="every job done")
    tally = serving.finish()
    assert sorted(rec.ids()) == sorted(jobs) == sorted(tally.done)


def test_a_wake_ends_an_idle_wait_at_once_and_so_does_stop(base_config: Path) -> None:
    station = Station.open(base_config)
    idle, due = _idle_probe()
    rec = _Recorder(worker.Outcome.DONE)
    loop = worker.ClaimLoop(station, Queue.CLASSIFY, rec, poll=60.0, due=due)
    serving = _Serving(loop)
    assert idle.wait(5), "the loop never went idle"
    idle.clear()
    jid = _publish(station)  # arrives while the loop sleeps for a minute
    t0 = time.monotonic()
    loop.wake()
    wait_for(lambda: rec.ids() == [jid], 5, what="the woken loop to take the job")
    assert time.monotonic() - t0 < 5
    assert idle.wait(5)  # asleep again
    t0 = time.monotonic()
    assert serving.finish().done == [jid]
    assert time.monotonic() - t0 < 5


def test_a_due_time_ends_an_idle_wait(base_config: Path) -> None:
    """The sender's next_attempt_at: a job not ready before its time is taken at it."""
    station = Station.open(base_config)
    _jobs(station, 1)
    at = time.monotonic() + 0.5
    rec = _Recorder(worker.Outcome.DONE)
    loop = worker.ClaimLoop(station, Queue.CLASSIFY, rec, poll=60.0,
                            ready=lambda job: time.monotonic() >= at,
                            due=lambda: max(0.0, at - time.monotonic()))
    serving = _Serving(loop)
    wait_for(lambda: rec.taken, 5, what="the job at its due time")
    serving.finish()
    assert rec.taken[0][1] >= at


def test_stop_lets_the_running_job_finish_and_takes_nothing_new(base_config: Path) -> None:
    station = Station.open(base_config)
    first, second = _jobs(station, 2)
    started, release = threading.Event(), threading.Event()

    def slow(station: Station, claim: Claim) -> worker.Outcome:
        started.set()
        assert release.wait(10)
        claim.move(Queue.DONE)
        return worker.Outcome.DONE
    stop = threading.Event()
    serving = _Serving(worker.ClaimLoop(station, Queue.CLASSIFY, slow, stop=stop, poll=0.05))
    assert started.wait(5)
    stop.set()
    release.set()
    tally = serving.finish()
    assert tally.done == [first]
    assert station.spool.list(Queue.DONE) == [first]
    assert station.spool.list(Queue.CLASSIFY, State.NEW) == [second]


def test_an_error_outside_a_job_stops_all_claimers_unless_keep_going(
        base_config: Path) -> None:
    station = Station.open(base_config)
    [jid] = _jobs(station, 1)
    calls: list[int] = []

    def flaky_ready(job: Job) -> bool:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("ready broke")
        return True
    stop = threading.Event()
    loop = worker.ClaimLoop(station, Queue.CLASSIFY, _Recorder(), ready=flaky_ready,
                            claimers=2, stop=stop)
    with pytest.raises(RuntimeError, match="ready broke"):
        loop.serve()
    assert stop.is_set()
    calls.clear()
    rec = _Recorder(worker.Outcome.DONE)
    serving = _Serving(worker.ClaimLoop(station, Queue.CLASSIFY, rec, ready=flaky_ready,
                                        poll=0.05, keep_going=True))
    wait_for(lambda: rec.ids() == [jid], 10, what="the job after the error")
    serving.finish()


# -- signals ----------------------------------------------------------------------------


def test_stop_on_signals_sets_stop_runs_again_and_restores_handlers() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    again: list[int] = []
    with stop_on_signals(again=lambda: again.append(1)) as stop:
        assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(5) and again == []
        os.kill(os.getpid(), signal.SIGINT)  # the second: dts watch skips its grace period
        wait_for(lambda: again, 5, what="the second signal")
    assert {s: signal.getsignal(s) for s in before} == before
    with stop_on_signals(False) as stop:
        assert {s: signal.getsignal(s) for s in before} == before
        assert not stop.is_set()
