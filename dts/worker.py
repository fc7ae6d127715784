"""The claim loop every queue stage shares: recover, claim, process, tally.

A stage supplies ``process(station, claim) -> Outcome``; the process function
decides where the claimed job goes next (it must move it or leave it to the
claim's default, which is back to ``new/``).
"""

from __future__ import annotations

import logging
import threading
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


@dataclass
class Tally:
    done: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    retry: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def add(self, job_id: str, outcome: Outcome) -> None:
        getattr(self, outcome.value).append(job_id)

    def merge(self, other: "Tally") -> None:
        for name in ("done", "failed", "retry", "skipped"):
            getattr(self, name).extend(getattr(other, name))

    @property
    def exit_code(self) -> int:
        if self.failed:
            return EXIT_FAILED
        if self.retry:
            return EXIT_TEMPFAIL
        return EXIT_OK

    def as_dict(self) -> dict[str, list[str]]:
        return {"done": self.done, "failed": self.failed, "retry": self.retry,
                "skipped": self.skipped}


Process = Callable[[Station, Claim], Outcome]


STAGE_OF = {Queue.CLASSIFY: Stage.CLASSIFY, Queue.RUN: Stage.RUN, Queue.SEND: Stage.SEND}


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


def drain(station: Station, queue: Queue, process: Process,
          ready: Callable[[Job], bool] | None = None,
          stop: threading.Event | None = None) -> Tally:
    """Process every claimable job in ``queue/new`` until none is left (or ``stop``)."""
    tally = Tally()
    seen: set[str] = set()
    while stop is None or not stop.is_set():
        def fresh(job: Job) -> bool:
            # each job at most once per drain: a retried job waits for the next round
            return job.id not in seen and (ready is None or ready(job))
        claim = station.spool.claim_next(queue, fresh)
        if claim is None:
            break
        seen.add(claim.id)
        tally.add(claim.id, run_one(station, claim, process))
    return tally


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


def serve(station: Station, queue: Queue, process: Process, *, once: bool,
          job_ids: list[str] | None = None, ready: Callable[[Job], bool] | None = None,
          stop: threading.Event | None = None, poll: float = 1.0,
          on_recovered: Callable[[Job], None] | None = None) -> Tally:
    """The body of ``dts classify|run|send``: recover, then ids, once, or forever."""
    recover(station, queue, on_recovered)
    if job_ids:
        return process_ids(station, queue, job_ids, process)
    if once:
        return drain(station, queue, process, ready)
    stop = stop or threading.Event()
    tally = Tally()
    while not stop.is_set():
        tally.merge(drain(station, queue, process, ready, stop))
        stop.wait(poll)
    return tally
