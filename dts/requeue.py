"""Owns manual reprocessing: ``dts requeue JOB --to classify|run|send``.

A job resting in ``failed/``, ``done/``, ``unmatched/`` or waiting in another
queue's ``new/`` is claimed where it is (``Spool.claim_at``; a job a live worker
holds is refused) and renamed into the target queue's ``new/``. Its history stays
with it: ``events.jsonl`` keeps every line, job.json gains a ``requeued`` entry, and
an event names who requeued it (user and host). What would stop the job from being
tried again is reset: ``attempts``, ``error``, ``next_attempt_at``; for ``send`` the
per-destination failures (``sent`` instances are kept unless ``resend_all``); for
``run`` the previous ``output/`` and ``logs/`` are kept under ``previous/<time>/``
so the new run starts empty and nothing of the old one is lost.
"""

from __future__ import annotations

import getpass
import os
import socket
from dataclasses import dataclass
from typing import Any, Literal

from . import slurm
from .errors import TemporaryFailure, UsageError
from .jobrecord import DestinationState, JobRecord
from .journal import Event, Stage, Status
from .spool import Location, Queue, State, isotime
from .station import Station

TARGETS = (Queue.CLASSIFY, Queue.RUN, Queue.SEND)
# job.json keys that describe the last try and would hold the job back
_RESET: tuple[Literal["error", "next_attempt_at", "failed_at", "recovered_at", "reason"], ...] = (
    "error", "next_attempt_at", "failed_at", "recovered_at", "reason")


@dataclass
class Requeued:
    job: str
    source: str
    target: str
    by: str
    host: str

    def as_dict(self) -> dict[str, str]:
        return {"job": self.job, "from": self.source, "to": self.target, "by": self.by,
                "host": self.host}


def who() -> str:
    """The person behind the command: the sudo caller if any, else the login name."""
    sudo = os.environ.get("SUDO_USER")
    if sudo:
        return sudo
    try:
        return getpass.getuser()
    except Exception:  # no name for this uid (containers)
        return f"uid {os.getuid()}"


def _check_target(job_id: str, data: JobRecord, target: Queue, has_output: bool) -> None:
    if target is Queue.CLASSIFY and data.get("parent"):
        raise UsageError(f"job {job_id} is a run job of stream {data.get('stream')} (from "
                         f"{data['parent']}): requeue {data['parent']} --to classify, or this "
                         "one --to run")
    if target in (Queue.RUN, Queue.SEND) and not data.get("stream"):
        raise UsageError(f"job {job_id} has no stream (it was never classified into one): "
                         f"requeue it --to classify")
    if target is Queue.SEND and not has_output:
        raise UsageError(f"job {job_id} has no output/ to send: requeue it --to run")
    review = data.get("review")
    if target is Queue.SEND and isinstance(review, dict) and review.get("decision") == "rejected":
        raise UsageError(f"the results of job {job_id} were rejected in review by "
                         f"{review.get('by')}: they are not sent; requeue it --to run for new "
                         "ones")
    if target is Queue.SEND and data.get("shadow"):
        raise UsageError(f"job {job_id} is a shadow job: its results are never sent "
                         "(dts replay --live runs the study as a live job)")


def requeue(station: Station, job_id: str, target: Queue, *, resend_all: bool = False,
            by: str | None = None) -> Requeued:
    """Move ``job_id`` into ``target``'s ``new/`` for another try, history kept."""
    if target not in TARGETS:
        raise UsageError(f"cannot requeue to {target}: choose one of "
                         f"{', '.join(q.value for q in TARGETS)}")
    spool = station.spool
    loc, _path = spool.find(job_id)
    if loc.queue is Queue.REVIEW:
        raise UsageError(f"job {job_id} waits in {loc} for a person: 'dts review approve "
                         f"{job_id}' or 'dts review reject {job_id} --reason TEXT'")
    claim = spool.claim_at(job_id)
    if claim is None:
        raise TemporaryFailure(f"job {job_id} is being worked on in {loc}; try again when it "
                               "has finished")
    by = by or who()
    host = socket.gethostname()
    with claim:
        # claim_at may have found it in a cur/ whose worker died: that is where it is now
        source = Location(loc.queue, loc.state)
        data = claim.job.read()
        _check_target(job_id, data, target, claim.job.output_dir.is_dir() and
                      any(claim.job.output_dir.iterdir()))
        now = isotime()
        for key in _RESET:
            data.pop(key, None)
        if source.queue is not Queue.CLASSIFY:
            # a plan left by a crash after the move to done/: new children this time
            data.pop("fanout_pending", None)
        data["attempts"] = 0
        cancelled = _cancel_on_cluster(station, data, now)
        if target is Queue.RUN:
            _keep_previous(claim.job.path, now)
            data.pop("destinations", None)  # new results: every destination again
        if target is Queue.SEND:
            data["destinations"] = _reset_destinations(data.get("destinations"), resend_all)
        history = list(data.get("requeued") or [])
        history.append({"at": now, "by": by, "host": host, "from": str(source),
                        "to": f"{target}/new"})
        data["requeued"] = history
        claim.job.write(data)
        station.journal.emit(Stage.REQUEUE, Event.REQUEUED, Status.INFO,
                             f"requeued from {source} to {target}/new by {by}@{host}"
                             + (f" (slurm job {cancelled} cancelled)" if cancelled else ""),
                             job=claim.job, job_data=data, by=by, source=str(source),
                             target=f"{target}/new", slurm_cancelled=cancelled)
        if claim.path.parent == spool.dir(target, State.NEW):
            claim.release()  # already waiting there: reset in place (due now)
        else:
            claim.move(target, State.NEW)
    return Requeued(job_id, str(source), f"{target}/new", by, host)


def _cancel_on_cluster(station: Station, data: JobRecord, now: str) -> str | None:
    """A job handed to Slurm whose cluster job may still run: scancel it (a controller
    that does not answer refuses the requeue with exit 75, the job stays where it is)
    and keep its record in ``slurm_history``; the next run is a new submission."""
    info = data.get("slurm")
    if not info:
        return None
    cancelled = slurm.cancel(station, info)
    if cancelled:
        info["cancelled_at"] = now
    data["slurm_history"] = [*(data.get("slurm_history") or []), info]
    data.pop("slurm", None)
    return cancelled


def _keep_previous(job_path: Any, now: str) -> None:
    """Move ``output/`` and ``logs/`` of the last run aside: ``previous/<time>/``."""
    stamp = now.replace(":", "").replace("-", "")
    moved = False
    for name in ("output", "logs"):
        src = job_path / name
        if src.is_dir() and any(src.iterdir()):
            dest = job_path / "previous" / stamp
            dest.mkdir(parents=True, exist_ok=True)
            os.rename(src, dest / name)
            moved = True
    if moved:
        (job_path / "output").mkdir(exist_ok=True)


def _reset_destinations(dests: dict[str, DestinationState] | None,
                        resend_all: bool) -> dict[str, DestinationState]:
    """Per destination: finished ones stay finished, the others forget their failures (so
    those instances are tried again) and keep what was ``sent``; ``resend_all`` forgets
    everything, so every result is delivered again."""
    out: dict[str, DestinationState] = {}
    if resend_all or not isinstance(dests, dict):
        return out
    for name, state in dests.items():
        if not isinstance(state, dict):
            continue
        state = state.copy()  # unknown keys of the state stay
        if state.get("status") != "done":
            state["failed"] = {}
            state.pop("error", None)
            state.pop("status", None)
        out[name] = state
    return out
