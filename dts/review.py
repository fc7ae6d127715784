"""Owns the ``review/`` queue and where a run's validated results go next.

The run stage, once a job's output is valid, hands the claimed job to ``hand_on``:

- a **shadow** job (its stream has ``shadow = true``, or ``dts replay`` made it without
  ``--live``: job.json ``shadow: true``) goes to ``done/`` with a ``shadow-done`` event;
  nothing of it is ever sent;
- a job of a **review** stream (``review = true``) goes to ``review/new/`` with a
  ``review-waiting`` event and ``review.waiting_since`` in job.json, and waits there for
  a person: ``approve`` moves it on to ``send/new/``, ``reject`` ends it in ``failed/``
  with the reason; who decided, when and why go into job.json ``review`` and the journal
  (stage ``review``, ``approved`` / ``rejected``);
- any other job goes to ``send/new/`` as before.

``review/`` follows the rules of every queue: a decision claims the job first (flock,
rename ``review/new`` -> ``review/cur``), changes job.json only under that claim and
finishes with one rename; a claimer that died leaves the job in ``review/cur`` unlocked,
and ``recover`` (called by every ``dts review`` and by ``dts watch`` at start) puts it
back. Nothing here prints: ``dts review`` (``dts.cli.review``) and the page
(``dts.web.actions``) show what these functions return.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from . import worker
from .compare import produced
from .config import Stream
from .errors import SpoolError, TemporaryFailure, UsageError
from .jobrecord import JobRecord, ReviewDecision, ReviewEntry
from .journal import Event, Stage, Status
from .spool import Claim, Job, Queue, Spool, State, age_seconds, isotime, parse_isotime, utcnow
from .station import Station

log = logging.getLogger(__name__)


# -- the run stage's hook ------------------------------------------------------------------


def is_shadow(stream: Stream, data: JobRecord) -> bool:
    return stream.shadow or bool(data.get("shadow"))


def hand_on(station: Station, claim: Claim, stream: Stream, data: JobRecord) -> str:
    """Move a claimed run job whose output was validated (``data`` is its job.json as
    just written) to where it goes next; returns that place (``done``, ``review/new``,
    ``send/new``)."""
    job = claim.job
    outputs = len(data.get("outputs") or [])
    if is_shadow(stream, data):
        data["shadow"] = True
        job.write(data)
        station.journal.emit(Stage.RUN, Event.SHADOW_DONE, Status.OK,
                             f"shadow run of stream {stream.name}: {outputs} DICOM object(s) "
                             "kept in done/, nothing sent", job=job, job_data=data,
                             outputs=outputs, shadow=True)
        claim.move(Queue.DONE)
        return str(Queue.DONE)
    if stream.review:
        data["review"] = {"waiting_since": isotime()}
        job.write(data)
        station.journal.emit(Stage.REVIEW, Event.REVIEW_WAITING, Status.INFO,
                             f"{outputs} DICOM object(s) of stream {stream.name} wait in "
                             "review/ for a person (dts review approve|reject)", job=job,
                             job_data=data, outputs=outputs,
                             produced=produced(data))
        claim.move(Queue.REVIEW)
        return f"{Queue.REVIEW}/{State.NEW}"
    claim.move(Queue.SEND)
    return f"{Queue.SEND}/{State.NEW}"


# -- what waits ----------------------------------------------------------------------------


def waiting_seconds(data: JobRecord, job_id: str, now: float | None = None) -> float | None:
    """How long a job has waited in review/ (since ``review.waiting_since``; a job put
    there by hand without it: since its id's time)."""
    review = data.get("review")
    since = review.get("waiting_since") if isinstance(review, dict) else None
    if isinstance(since, str):
        try:
            t = parse_isotime(since).timestamp()
        except ValueError:
            pass
        else:
            ref = now if now is not None else utcnow().timestamp()
            return max(0.0, ref - t)
    return age_seconds(job_id, now)


@dataclass
class Waiting:
    """One job in review/, as ``dts review`` lists it."""

    job: str
    state: str                 # new, or cur while a decision is being made
    study_uid: str | None
    accession: str | None
    stream: str | None
    produced: dict[str, int]   # kind -> count (sr, seg, pdf, sc, kos, other)
    results: int               # values the model reported
    waiting_since: str | None
    waiting_seconds: float | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def waiting(station: Station, now: float | None = None) -> list[Waiting]:
    """The jobs in review/, oldest first."""
    spool = station.spool
    out: list[Waiting] = []
    for state in (State.NEW, State.CUR):
        for job_id in spool.list(Queue.REVIEW, state):
            data = Job(spool.dir(Queue.REVIEW, state) / job_id).read()
            review = data.get("review")
            stream = data.get("stream")
            out.append(Waiting(
                job=job_id, state=state.value, study_uid=data.get("study_uid"),
                accession=data.get("accession"),
                stream=stream if isinstance(stream, str) else None,
                produced=produced(data), results=len(data.get("results") or []),
                waiting_since=review.get("waiting_since") if isinstance(review, dict)
                else None, waiting_seconds=waiting_seconds(data, job_id, now)))
    out.sort(key=lambda w: -(w.waiting_seconds or 0.0))
    return out


def oldest_waiting(spool: Spool, now: float | None = None) -> float | None:
    """Seconds the longest-waiting job of review/ has waited (``dts status``)."""
    ages = []
    for state in (State.NEW, State.CUR):
        for job_id in spool.list(Queue.REVIEW, state):
            try:
                data = Job(spool.dir(Queue.REVIEW, state) / job_id).read()
            except SpoolError:  # an unreadable job.json: its id's time
                data = {}
            age = waiting_seconds(data, job_id, now)
            if age is not None:
                ages.append(age)
    return round(max(ages), 1) if ages else None


# -- deciding ------------------------------------------------------------------------------


@dataclass
class Decided:
    job: str
    decision: ReviewDecision
    by: str
    at: str
    reason: str | None
    to: str

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def recover(station: Station) -> list[str]:
    """Put back into review/new what a decision that died left in review/cur."""
    return worker.recover(station, Queue.REVIEW)


def _claim(station: Station, job_id: str) -> Claim:
    spool = station.spool
    loc, _path = spool.find(job_id)  # UsageError (exit 2): no such job
    if loc.queue is not Queue.REVIEW:
        raise UsageError(f"job {job_id} is in {loc}, not in review/: only results waiting "
                         "for review can be approved or rejected")
    claim = spool.claim(job_id, Queue.REVIEW) if loc.state is State.NEW else None
    if claim is None:
        raise TemporaryFailure(f"job {job_id} is being decided by someone else right now "
                               f"(it is in {Queue.REVIEW}/{State.CUR}); look again in a moment")
    return claim


def _decide(data: JobRecord, decision: ReviewDecision, by: str, reason: str | None) -> str:
    now = isotime()
    old = data.get("review")
    entry: ReviewEntry = old.copy() if isinstance(old, dict) else {}
    entry.update({"decision": decision, "by": by, "at": now})
    if reason:
        entry["reason"] = reason
    else:
        entry.pop("reason", None)
    data["review"] = entry
    return now


def approve(station: Station, job_id: str, *, by: str, reason: str | None = None) -> Decided:
    """Approve the results of ``job_id`` (in review/new): on to send/new."""
    by = _who(by)
    with _claim(station, job_id) as claim:
        data = claim.job.read()
        now = _decide(data, "approved", by, reason)
        claim.job.write(data)
        station.journal.emit(Stage.REVIEW, Event.APPROVED, Status.OK,
                             f"approved by {by}" + (f": {reason}" if reason else "")
                             + "; to send/new", job=claim.job, job_data=data, by=by,
                             reason=reason)
        claim.move(Queue.SEND)
    log.info("%s: approved by %s", job_id, by)
    return Decided(job_id, "approved", by, now, reason, f"{Queue.SEND}/{State.NEW}")


def reject(station: Station, job_id: str, *, by: str, reason: str) -> Decided:
    """Reject the results of ``job_id`` (in review/new): to failed/, nothing sent."""
    reason = (reason or "").strip()
    if not reason:
        raise UsageError("a rejection needs a reason (--reason TEXT)")
    by = _who(by)
    with _claim(station, job_id) as claim:
        data = claim.job.read()
        now = _decide(data, "rejected", by, reason)
        message = f"rejected in review by {by}: {reason}"
        data["error"] = message
        data["failed_at"] = now
        data["failure"] = {"stage": "review", "reason": "rejected", "message": message,
                           "log_tail": "", "time": now}
        claim.job.write(data)
        station.journal.emit(Stage.REVIEW, Event.REJECTED, Status.WARNING,
                             f"{message}; to failed/, nothing sent", job=claim.job,
                             job_data=data, by=by, reason=reason)
        claim.move(Queue.FAILED)
    log.info("%s: rejected by %s", job_id, by)
    return Decided(job_id, "rejected", by, now, reason, str(Queue.FAILED))


def _who(by: str) -> str:
    by = (by or "").strip()
    if not by or len(by) > 128 or any(ord(c) < 32 for c in by):
        raise UsageError(f"--by: expected a name (at most 128 printable characters), "
                         f"got {by!r}")
    return by
