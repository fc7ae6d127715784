"""The claim loop every queue stage shares: recover, claim, process, tally.

A stage supplies ``process(station, claim) -> Outcome``; the process function
decides where the claimed job goes next (it must move it or leave it to the
claim's default, which is back to ``new/``).

``ClaimLoop`` is the one engine that takes jobs from a queue, for ``dts
classify|run|send`` (``--once`` and forever) and for each stage of ``dts watch``:
rounds in which every job is taken at most once, not-before pauses for jobs put
back for a temporary reason, N claimers at a time, wake-ups and a stop event.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

from .errors import EXIT_FAILED, EXIT_OK, EXIT_TEMPFAIL, UsageError
from .journal import Event, Stage, Status
from .spool import Claim, Job, Queue, State
from .station import Station

log = logging.getLogger(__name__)


class Outcome(Enum):
    DONE = "done"        # moved on to the next queue (or a final one other than failed/)
    FAILED = "failed"    # moved to failed/
    RETRY = "retry"      # temporary failure; back in new/ for a later try
    SKIPPED = "skipped"  # nothing done (e.g. not due yet)
    SUBMITTED = "submitted"  # handed to the Slurm cluster: in run/slurm/, followed there


@dataclass
class Tally:
    done: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    retry: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    submitted: list[str] = field(default_factory=list)

    def add(self, job_id: str, outcome: Outcome) -> None:
        getattr(self, outcome.value).append(job_id)

    def merge(self, other: "Tally") -> None:
        for name in ("done", "failed", "retry", "skipped", "submitted"):
            getattr(self, name).extend(getattr(other, name))

    @property
    def exit_code(self) -> int:
        if self.failed:
            return EXIT_FAILED
        if self.retry:
            return EXIT_TEMPFAIL
        return EXIT_OK

    def as_dict(self) -> dict[str, list[str]]:
        out = {"done": self.done, "failed": self.failed, "retry": self.retry,
               "skipped": self.skipped}
        if self.submitted:
            out["submitted"] = self.submitted
        return out


Process = Callable[[Station, Claim], Outcome]
Ready = Callable[[Job], bool]


STAGE_OF = {Queue.CLASSIFY: Stage.CLASSIFY, Queue.RUN: Stage.RUN, Queue.REVIEW: Stage.REVIEW,
            Queue.SEND: Stage.SEND}


def recover(station: Station, queue: Queue,
            on_recovered: Callable[[Job], None] | None = None) -> list[str]:
    """Put back jobs of dead workers, with an event for each."""
    def hook(job: Job) -> None:
        if on_recovered is not None:
            on_recovered(job)
        station.journal.emit(STAGE_OF[queue], Event.RECOVERED, Status.WARNING,
                             f"{job.id} was left in {queue}/cur by a worker that stopped; "
                             "moved back to new/", job=job)
    return station.spool.recover(queue, hook)


def run_one(station: Station, claim: Claim, process: Process) -> Outcome:
    with claim:
        try:
            return process(station, claim)
        except Exception as exc:
            log.exception("%s: unexpected error while processing", claim.id)
            if not claim.held:  # the job had already moved on; nothing to put back
                return Outcome.RETRY
            return _unexpected_error(station, claim, exc)


def _unexpected_error(station: Station, claim: Claim, exc: Exception) -> Outcome:
    """Nothing is lost: the job goes back to new/ with the attempt counted, and to
    failed/ once ``max_attempts`` are used up (or at once when its job.json cannot be
    read), so an input that always trips the stage is never retried forever."""
    stage = STAGE_OF[claim.home.queue]
    try:
        data = claim.job.read()
    except Exception:
        data = None
    attempts = int((data or {}).get("attempts") or 0) + 1
    if data is None or attempts >= station.config.station.max_attempts:
        reason = f"unexpected error in the {stage.value} stage: {exc!r}"
        if data is not None:
            data.update({"attempts": attempts, "error": reason})
            claim.job.write(data)
        station.journal.emit(stage, Event.FAILED, Status.ERROR,
                             f"{reason} (attempt {attempts}); moved to failed/",
                             job=claim.job, job_data=data or {})
        claim.move(Queue.FAILED)
        return Outcome.FAILED
    data["attempts"] = attempts
    claim.job.write(data)
    station.journal.emit(stage, Event.INTERNAL_ERROR, Status.ERROR,
                         f"unexpected error, job put back (attempt {attempts} of "
                         f"{station.config.station.max_attempts}): {exc!r}",
                         job=claim.job, job_data=data)
    return Outcome.RETRY


def process_ids(station: Station, queue: Queue, job_ids: list[str],
                process: Process) -> Tally:
    """Process exactly these jobs, which must be waiting in ``queue/new``."""
    tally = Tally()
    for job_id in job_ids:
        loc, _path = station.spool.find(job_id)
        if loc.queue is not queue or loc.state is not State.NEW:
            raise UsageError(f"job {job_id} is in {loc}, not in {queue}/new "
                             f"(use 'dts requeue {job_id} --to {queue}')")
        claim = station.spool.claim(job_id, queue)
        if claim is None:
            raise UsageError(f"job {job_id} is being worked on by another process")
        tally.add(job_id, run_one(station, claim, process))
    return tally


OnResult = Callable[[str, Outcome], None]  # job id, outcome


class ClaimLoop:
    """``claimers`` workers taking jobs from ``queue/new``, oldest first, until ``stop``.

    A round ends when no job is left that the round has not taken: each job is taken
    at most once per round, by one claimer (they share the round), so a job put back
    waits for the next round. Between rounds a claimer sleeps until ``wake()``, the
    ``due()`` time (seconds; the sender's ``next_attempt_at``), the end of a job's
    pause, or ``poll`` seconds. A job that came back ``RETRY`` is not taken again for
    ``pause`` seconds: its own move back into new/ must not make a tight loop.

    ``stop`` ends claiming: in-flight jobs finish (cancelling them is the process
    function's business), nothing new is taken. An error outside a job's processing
    stops every claimer and is raised, unless ``keep_going`` (a service: logged, the
    claimer pauses and goes on).
    """

    def __init__(self, station: Station, queue: Queue, process: Process, *,
                 ready: Callable[[Job], bool] | None = None, claimers: int = 1,
                 stop: threading.Event | None = None, poll: float = 1.0,
                 pause: float = 0.0, due: Callable[[], float | None] | None = None,
                 on_result: OnResult | None = None, keep_going: bool = False,
                 name: str | None = None) -> None:
        self.station, self.queue, self.process, self.ready = station, queue, process, ready
        self.claimers = max(1, claimers)
        self.stop = stop if stop is not None else threading.Event()
        self.poll, self.pause, self.due = poll, pause, due
        self.on_result = on_result
        self.keep_going = keep_going
        self.name = name or f"dts-{queue}"
        self._lock = threading.Lock()
        self._seen: set[str] = set()             # taken (or being claimed) this round
        self._not_before: dict[str, float] = {}  # job id -> monotonic time it may be retaken
        self._active: set[str] = set()
        self._wakes = [threading.Event() for _ in range(self.claimers)]
        self._threads: list[threading.Thread] = []
        self._tally: Tally | None = None
        self._errors: list[BaseException] = []

    # -- for the stages ---------------------------------------------------------------------
    def drain(self) -> Tally:
        """One round (``--once``): every claimable job once, then return."""
        return self._run(once=True)

    def serve(self) -> Tally:
        """Rounds until ``stop`` is set; the tally of all of them."""
        return self._run(once=False)

    def start(self) -> None:
        """Serve in background threads (``dts watch``); ``join`` waits for them."""
        self._wake_on_stop()
        self._spawn(once=False)

    def join(self, timeout: float | None = None) -> list[str]:
        """Wait up to ``timeout`` seconds for the claimers; the names of those still busy."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return [t.name for t in self._threads if t.is_alive()]

    def wake(self) -> None:
        """End every idle claimer's wait now (new work may be there)."""
        for ev in self._wakes:
            ev.set()

    def active(self) -> list[str]:
        """The jobs being processed right now."""
        with self._lock:
            return sorted(self._active)

    # -- the loop ---------------------------------------------------------------------------
    def _run(self, once: bool) -> Tally:
        self._tally = Tally()
        if not once:
            self._wake_on_stop()
        try:
            if self.claimers == 1:
                self._claimer(0, once)
            else:
                self._spawn(once)
                self.join()
                if self._errors:
                    raise self._errors[0]
        finally:
            if not once:
                self.stop.set()  # also on an error: lets the stop watcher end
        return self._tally

    def _wake_on_stop(self) -> None:
        # threading has no wait for "this event or that one": a watcher turns stop into a wake
        def watch() -> None:
            self.stop.wait()
            self.wake()
        threading.Thread(target=watch, name=f"{self.name}-stop", daemon=True).start()

    def _spawn(self, once: bool) -> None:
        def target(i: int) -> None:
            try:
                self._claimer(i, once)
            except BaseException as exc:  # raised by _run once the others have stopped
                self._errors.append(exc)
                self.stop.set()
        self._threads = [threading.Thread(target=target, args=(i,), name=f"{self.name}-{i}",
                                          daemon=True) for i in range(self.claimers)]
        for t in self._threads:
            t.start()

    def _claimer(self, index: int, once: bool) -> None:
        wake = self._wakes[index]
        busy_wait = 0.0
        while not self.stop.is_set():
            wake.clear()
            busy = False
            try:
                self._round()
                busy = not once and self._locked_left()
            except Exception:
                if not self.keep_going:
                    raise
                log.exception("%s: unexpected error", self.name)  # a bug must not silence a stage
                self.stop.wait(1.0)
            if once or self.stop.is_set():
                break
            timeout = self._idle_timeout()
            if busy:
                # A job is there but its lock is held: typically its publisher between the
                # rename into new/ and releasing the lock, a moment later. Look again soon.
                busy_wait = min(timeout, max(0.02, busy_wait * 2))
                timeout = busy_wait
            else:
                busy_wait = 0.0
            wake.wait(timeout)
            with self._lock:
                self._seen.clear()  # the next round

    def _round(self) -> None:
        while not self.stop.is_set():
            claim = self._claim()
            if claim is None:
                return
            self._work(claim)

    def _may_take(self, job: Job) -> bool:
        with self._lock:
            if job.id in self._seen or self._not_before.get(job.id, 0.0) > time.monotonic():
                return False
        return self.ready is None or self.ready(job)

    def _claim(self) -> Claim | None:
        tried: list[str] = []

        def take(job: Job) -> bool:
            if not self._may_take(job):
                return False
            with self._lock:  # reserved before the rename: no other claimer tries it now
                if job.id in self._seen:
                    return False
                self._seen.add(job.id)
            tried.append(job.id)
            return True
        claim = self.station.spool.claim_next(self.queue, take)
        with self._lock:  # a job that could not be claimed (locked) stays in the round
            self._seen.difference_update(j for j in tried if claim is None or j != claim.id)
        return claim

    def _locked_left(self) -> bool:
        """Is a job waiting that the round may take, but its lock is held?"""
        new = self.station.spool.dir(self.queue, State.NEW)
        return any(self._may_take(Job(new / j))
                   for j in self.station.spool.list(self.queue, State.NEW))

    def _work(self, claim: Claim) -> None:
        job_id = claim.id
        with self._lock:
            self._active.add(job_id)
        try:
            outcome = run_one(self.station, claim, self.process)
        finally:
            with self._lock:
                self._active.discard(job_id)
        with self._lock:
            if outcome is Outcome.RETRY and self.pause > 0:
                self._not_before[job_id] = time.monotonic() + self.pause
            else:
                self._not_before.pop(job_id, None)
            if self._tally is not None:
                self._tally.add(job_id, outcome)
        if self.on_result is not None:
            try:
                self.on_result(job_id, outcome)
            except Exception:
                log.exception("%s: on_result failed", self.name)

    def _idle_timeout(self) -> float:
        timeout = self.poll
        if self.due is not None:
            due = self.due()
            if due is not None:
                timeout = min(timeout, due + 0.01)
        now = time.monotonic()
        with self._lock:
            for job_id in [j for j, t in self._not_before.items() if t <= now]:
                del self._not_before[job_id]  # paused long enough (or gone elsewhere)
            soonest = min(self._not_before.values(), default=None)
        if soonest is not None:  # wake when a paused job may be tried again
            timeout = min(timeout, max(0.05, soonest - now))
        return max(0.01, timeout)


def serve(station: Station, queue: Queue, process: Process, *, once: bool,
          job_ids: list[str] | None = None, ready: Callable[[Job], bool] | None = None,
          stop: threading.Event | None = None, poll: float = 1.0,
          on_recovered: Callable[[Job], None] | None = None) -> Tally:
    """The body of ``dts classify|send``: recover, then ids, once, or forever."""
    recover(station, queue, on_recovered)
    if job_ids:
        return process_ids(station, queue, job_ids, process)
    loop = ClaimLoop(station, queue, process, ready=ready, stop=stop, poll=poll)
    return loop.drain() if once else loop.serve()
