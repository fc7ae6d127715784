"""Owns storage commitment: proof that a DICOM destination has taken the results into its
safekeeping (DICOM Storage Commitment Push Model, PS3.4 annex J), for destinations with
``commitment = true``.

After every object of a job is stored to such a destination, the send stage asks the
peer to commit them: an N-ACTION (action type 1) on the Storage Commitment Push Model SOP
class's well-known instance, with a new Transaction UID and the Referenced SOP Sequence.
The peer answers with an N-EVENT-REPORT (event type 1: all committed; 2: some failed,
listed with their Failure Reason) either on that association, for which the sender
waits a few seconds, or later on a new association to this station's receiver
(``dts receive``, or the receiver of ``dts watch``): another process, which may not touch
the job (only the claim's holder writes job.json). So the answer is kept beside the
queues, in ``spool/commitment/``:

- ``<TransactionUID>.pending``: written by the sender (holding the job's claim) before the
  N-ACTION goes out: the job, the destination, and the instances (SOP Instance UID ->
  SOP Class UID) of the transaction. A report for a transaction without this file was
  not started by this station and is refused.
- ``<TransactionUID>.json``: the validated answer, written by whoever received it
  (through a temporary name, fsync, rename). The sender merges it into job.json the next
  time it holds the job (``settle``), so an answer that arrives while no ``dts send``
  runs, or after a restart, still reaches its job. Transaction UIDs are kept in job.json
  too (``destinations.<name>.commitment``).

Both files go when the job leaves ``send/`` (``forget``). A report is refused, with a
failure status and a ``commit-report-refused`` event, and marks nothing committed when
its transaction is unknown or its Transaction UID malformed (0x0115 Invalid argument
value: the Event Information names something this station never asked for), when it
names an instance that was not in the transaction (0x0115 as well), or an instance with
another SOP class than was asked for (0x0119 Class-Instance conflict); an event type
other than 1 or 2 gets 0x0113 No such event type, a report on another SOP instance than
the well-known one 0x0112 No such SOP Instance, and an answer that cannot be written
(disk full) 0x0110 Processing failure, which a peer may retry.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import evt
from pynetdicom.presentation import build_context

from .config import Destination
from .dicom.store import Item, NetSettings, Peer, open_association, why_not
from .dicom.uid import valid_uid
from .jobrecord import CommitmentTransaction, DestinationState, JobRecord, SendStatus
from .journal import Event, Stage, Status
from .spool import Job, Spool, dump_json, fsync_dir, isotime, parse_isotime, utcnow
from .station import Station

log = logging.getLogger(__name__)

SOP_CLASS = "1.2.840.10008.1.20.1"      # Storage Commitment Push Model SOP Class
SOP_INSTANCE = "1.2.840.10008.1.20.1.1"  # its well-known SOP instance
ACTION_COMMIT = 1                        # N-ACTION: request storage commitment
EVENT_ALL_COMMITTED = 1                  # N-EVENT-REPORT: every instance committed
EVENT_SOME_FAILED = 2                    # ... some failed (Failed SOP Sequence)
SAME_ASSOCIATION_WAIT = 5.0  # seconds the sender keeps the association open for the answer

# N-EVENT-REPORT response statuses (PS3.7 10.1.1.1.8)
SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110
NO_SUCH_SOP_INSTANCE = 0x0112
NO_SUCH_EVENT_TYPE = 0x0113
INVALID_ARGUMENT_VALUE = 0x0115
CLASS_INSTANCE_CONFLICT = 0x0119
NO_SUCH_ACTION = 0x0123  # what the receiver answers an N-ACTION: dts commits nothing itself

# Failure Reason (0008,1197) values of PS3.4 J.3.2.1.1.4 / C.14.1.1
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0213: "resource limitation",
    0x0122: "referenced SOP class not supported",
    0x0119: "class/instance conflict",
    0x0131: "duplicate transaction UID",
}

PENDING = "pending"
COMMITTED = "committed"
FAILED_PREFIX = "failed: "


def failure_text(code: int | None) -> str:
    if code is None:
        return "no failure reason given"
    name = FAILURE_REASONS.get(code)
    return f"0x{code:04X} {name}" if name else f"0x{code:04X}"


# -- the files in spool/commitment/ ------------------------------------------------------------

def _pending_file(spool: Spool, uid: str) -> Path:
    assert valid_uid(uid)
    return spool.commitment / f"{uid}.pending"


def _answer_file(spool: Spool, uid: str) -> Path:
    assert valid_uid(uid)
    return spool.commitment / f"{uid}.json"


def _write_atomically(spool: Spool, path: Path, data: Any) -> None:
    """Written under ``tmp/``, fsynced, renamed into place (the spool's publish rule)."""
    spool.commitment.mkdir(exist_ok=True)
    tmp = spool.tmp / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(dump_json(data))
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.rename(tmp, path)
    fsync_dir(path.parent)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def register(spool: Spool, uid: str, job_id: str, destination: str,
             instances: dict[str, str]) -> None:
    """Record a transaction this station starts (before its N-ACTION is sent)."""
    _write_atomically(spool, _pending_file(spool, uid), {
        "transaction_uid": uid, "job": job_id, "destination": destination,
        "requested_at": isotime(), "instances": instances})


def unregister(spool: Spool, uid: str) -> None:
    for path in (_pending_file(spool, uid), _answer_file(spool, uid)):
        path.unlink(missing_ok=True)


def forget(spool: Spool, data: JobRecord) -> None:
    """Remove the files of every transaction of a job that leaves send/."""
    for state in (data.get("destinations") or {}).values():
        for uid in (state.get("commitment") or {}):
            if valid_uid(uid):
                unregister(spool, uid)


def has_answer(spool_root: Path, uid: str) -> bool:
    return valid_uid(uid) and (spool_root / "commitment" / f"{uid}.json").exists()


# -- receiving a report ----------------------------------------------------------------------

@dataclass
class Verdict:
    """What a received N-EVENT-REPORT was found to be."""

    status: int
    reason: str                       # why it was refused, or a summary when kept
    transaction_uid: str | None = None
    job: str | None = None
    committed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def _refs(info: Dataset, keyword: str) -> list[tuple[str, str, int | None]] | str:
    """(SOP class, SOP instance, failure reason) of a sequence of the report, or why not."""
    out: list[tuple[str, str, int | None]] = []
    for item in info.get(keyword) or []:
        cls = str(item.get("ReferencedSOPClassUID", "") or "")
        uid = str(item.get("ReferencedSOPInstanceUID", "") or "")
        if not valid_uid(uid) or not valid_uid(cls):
            return f"{keyword} holds an item without a valid Referenced SOP Class/Instance UID"
        reason = item.get("FailureReason")
        out.append((cls, uid, int(reason) if reason is not None else None))
    return out


def judge(spool: Spool, event_type: int | None, sop_instance: str | None,
          info: Dataset | None) -> Verdict:
    """Validate an N-EVENT-REPORT of the Storage Commitment Push Model against the
    transactions this station started; a Verdict with SUCCESS has been written durably."""
    if sop_instance is not None and str(sop_instance) != SOP_INSTANCE:
        return Verdict(NO_SUCH_SOP_INSTANCE, f"the report is about SOP instance "
                       f"{sop_instance!r}, not the well-known {SOP_INSTANCE}")
    if event_type not in (EVENT_ALL_COMMITTED, EVENT_SOME_FAILED):
        return Verdict(NO_SUCH_EVENT_TYPE, f"event type {event_type!r} is neither 1 (all "
                       "committed) nor 2 (some failed)")
    try:
        uid = str(info.get("TransactionUID", "") or "") if info is not None else ""
        ok = _refs(info, "ReferencedSOPSequence") if info is not None else []
        bad = _refs(info, "FailedSOPSequence") if info is not None else []
    except Exception as exc:  # noqa: BLE001 - an event information that does not decode
        return Verdict(INVALID_ARGUMENT_VALUE, f"the event information cannot be read: {exc}")
    if not valid_uid(uid):
        return Verdict(INVALID_ARGUMENT_VALUE, f"Transaction UID {uid[:70]!r} is not a valid UID")
    if isinstance(ok, str) or isinstance(bad, str):
        return Verdict(INVALID_ARGUMENT_VALUE, str(ok if isinstance(ok, str) else bad),
                       transaction_uid=uid)
    reg = _read(_pending_file(spool, uid))
    if reg is None or not isinstance(reg.get("instances"), dict):
        return Verdict(INVALID_ARGUMENT_VALUE, f"transaction {uid} was not started by this "
                       "station (or its job has finished)", transaction_uid=uid)
    asked: dict[str, str] = {str(k): str(v) for k, v in reg["instances"].items()}
    job = str(reg.get("job"))
    for cls, sop, _reason in [*ok, *bad]:
        if sop not in asked:
            return Verdict(INVALID_ARGUMENT_VALUE, f"instance {sop} was not in transaction "
                           f"{uid}", transaction_uid=uid, job=job)
        if asked[sop] != cls:
            return Verdict(CLASS_INSTANCE_CONFLICT, f"instance {sop} was asked for as SOP "
                           f"class {asked[sop]}, the report names {cls}",
                           transaction_uid=uid, job=job)
    committed = [sop for _cls, sop, _r in ok]
    failed = {sop: failure_text(reason) for _cls, sop, reason in bad}
    if event_type == EVENT_SOME_FAILED and not failed:
        return Verdict(INVALID_ARGUMENT_VALUE, "event type 2 (some failed) without a Failed "
                       "SOP Sequence", transaction_uid=uid, job=job)
    try:
        _write_atomically(spool, _answer_file(spool, uid), {
            "transaction_uid": uid, "job": job, "destination": reg.get("destination"),
            "event_type": event_type, "received_at": isotime(), "committed": committed,
            "failed": failed})
    except OSError as exc:
        return Verdict(PROCESSING_FAILURE, f"the answer cannot be kept: {exc.strerror or exc}",
                       transaction_uid=uid, job=job)
    return Verdict(SUCCESS, f"{len(committed)} committed, {len(failed)} failed",
                   transaction_uid=uid, job=job, committed=committed, failed=failed)


def on_report(station: Station, event: Any, *, via: str) -> tuple[int, None]:
    """The N-EVENT-REPORT handler (pynetdicom's EVT_N_EVENT_REPORT): of the receiver
    (``via`` "receiver") and of the sender's own association. Never raises."""
    try:
        req = event.request
        info = event.event_information
        verdict = judge(station.spool, event.event_type, req.AffectedSOPInstanceUID, info)
    except Exception as exc:  # a report we cannot even look at
        log.exception("storage commitment report")
        verdict = Verdict(PROCESSING_FAILURE, f"the report cannot be read: {exc!r}")
    assoc = event.assoc
    calling = str(getattr(assoc.requestor, "ae_title", "") or "").strip()
    peer = str(getattr(assoc.requestor, "address", "") or "")
    fields: dict[str, Any] = {"transaction_uid": verdict.transaction_uid, "for_job": verdict.job,
              "calling_ae": calling, "peer": peer, "via": via,
              "dimse_status": f"0x{verdict.status:04X}"}
    if verdict.status == SUCCESS:
        station.journal.emit(Stage.RECEIVE if via == "receiver" else Stage.SEND,
                             Event.COMMIT_REPORT, Status.INFO,
                             f"storage commitment report from {calling}@{peer} for transaction "
                             f"{verdict.transaction_uid} (job {verdict.job}): {verdict.reason}",
                             best_effort=True, **fields)
    else:
        station.journal.emit(Stage.RECEIVE if via == "receiver" else Stage.SEND,
                             Event.COMMIT_REPORT_REFUSED, Status.WARNING,
                             f"refused a storage commitment report from {calling}@{peer} with "
                             f"0x{verdict.status:04X}: {verdict.reason}",
                             best_effort=True, reason=verdict.reason, **fields)
    return verdict.status, None


# -- what job.json says ----------------------------------------------------------------------

def _live(rec: CommitmentTransaction) -> bool:
    """A transaction still waiting for its answer."""
    return not rec.get("answered_at") and not rec.get("timed_out_at")


def instance_states(state: DestinationState) -> dict[str, str]:
    """Per instance, over every transaction: committed if any committed it, else what
    the latest transaction that named it says."""
    out: dict[str, str] = {}
    txns = sorted((state.get("commitment") or {}).values(), key=lambda r: str(r.get("sent_at")))
    for rec in txns:
        for sop, st in (rec.get("instances") or {}).items():
            if out.get(sop) != COMMITTED:
                out[sop] = st
    return out


def summary(state: DestinationState) -> dict[str, int]:
    """Counts of committed / pending / failed instances of one destination."""
    counts = {COMMITTED: 0, PENDING: 0, "failed": 0}
    for st in instance_states(state).values():
        kind = "failed" if st.startswith(FAILED_PREFIX) else st
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def _unrequested(state: DestinationState) -> list[str]:
    """Stored instances no live or answered transaction covers with success or wait."""
    states = instance_states(state)
    return [u for u in state.get("sent", []) if states.get(u) not in (COMMITTED, PENDING)]


def deadline(state: DestinationState, dest: Destination) -> str | None:
    """When the destination's wait ends: the next N-ACTION due (``commit_after``) or the
    earliest timeout of a live transaction."""
    times = []
    if _unrequested(state) and state.get("commit_after"):
        times.append(parse_isotime(str(state["commit_after"])))
    for rec in (state.get("commitment") or {}).values():
        if _live(rec) and rec.get("sent_at"):
            times.append(parse_isotime(str(rec["sent_at"]))
                         + timedelta(seconds=dest.commitment_timeout))
    return isotime(min(times)) if times else None


def due(state: DestinationState) -> bool:
    """Does a waiting destination need a try (an N-ACTION whose delay is over)?"""
    if not _unrequested(state):
        return False
    after = state.get("commit_after")
    return not after or parse_isotime(str(after)) <= utcnow()


def answer_arrived(spool_root: Path, data: JobRecord) -> bool:
    """Is an answer waiting in spool/commitment/ for a live transaction of the job?"""
    for state in (data.get("destinations") or {}).values():
        if state.get("status") != "waiting":
            continue
        for uid, rec in (state.get("commitment") or {}).items():
            if _live(rec) and has_answer(spool_root, uid):
                return True
    return False


def settle(station: Station, job: Job, data: JobRecord, dest: Destination,
           state: DestinationState) -> bool:
    """Merge the answers that arrived and the timeouts that passed into the state of a
    waiting destination, and set its status; True when something changed (a try ended:
    the caller decides about retries), False when it only waits on."""
    if state.get("status") != "waiting":
        return False
    spool, journal = station.spool, station.journal
    changed = False
    not_committed: dict[str, str] = {}
    for uid, rec in (state.get("commitment") or {}).items():
        if rec.get("answered_at") or not valid_uid(uid):
            continue
        answer = _read(_answer_file(spool, uid))
        insts = rec.setdefault("instances", {})
        if answer is not None:
            committed = {str(u) for u in answer.get("committed") or []}
            failed = {str(k): str(v) for k, v in (answer.get("failed") or {}).items()}
            for sop in insts:
                if sop in committed:
                    insts[sop] = COMMITTED
                elif sop in failed:
                    insts[sop] = FAILED_PREFIX + failed[sop]
                else:
                    insts[sop] = FAILED_PREFIX + "not in the peer's answer"
            rec["answered_at"] = str(answer.get("received_at") or isotime())
            lost = {s: v[len(FAILED_PREFIX):] for s, v in insts.items() if v != COMMITTED}
            # what the peer says it has not got is stored again (within the retry budget)
            state["sent"] = [u for u in state.get("sent", []) if u not in lost]
            if lost:
                not_committed.update(lost)
                journal.emit(Stage.SEND, Event.COMMIT_FAILED, Status.WARNING,
                             f"{dest.name} did not commit {len(lost)} of {len(insts)} "
                             f"instance(s) of transaction {uid}: "
                             f"{'; '.join(sorted(set(lost.values())))}; they are sent again",
                             job=job, job_data=data, destination=dest.name,
                             transaction_uid=uid, failed=lost)
            else:
                journal.emit(Stage.SEND, Event.COMMITTED, Status.OK,
                             f"{dest.name} committed all {len(insts)} instance(s) of "
                             f"transaction {uid}", job=job, job_data=data,
                             destination=dest.name, transaction_uid=uid, count=len(insts))
            changed = True
        elif _live(rec) and rec.get("sent_at") and utcnow() >= parse_isotime(
                str(rec["sent_at"])) + timedelta(seconds=dest.commitment_timeout):
            why = (f"no storage commitment answer within {dest.commitment_timeout:g}s "
                   "(commitment_timeout)")
            rec["timed_out_at"] = isotime()
            for sop, st in insts.items():
                if st == PENDING:
                    insts[sop] = FAILED_PREFIX + why
                    not_committed[sop] = why
            journal.emit(Stage.SEND, Event.COMMIT_FAILED, Status.WARNING,
                         f"{dest.name}: {why} for transaction {uid}; asked again on the next "
                         "try", job=job, job_data=data, destination=dest.name,
                         transaction_uid=uid)
            changed = True
    states = instance_states(state)
    wanted = set(state.get("sent", [])) | set(states)
    if wanted and all(states.get(u) == COMMITTED for u in wanted):
        state["status"] = "done"
        state.pop("error", None)
        state.pop("commit_after", None)
        return True
    if not_committed:
        state["status"] = "retry"
        reasons = sorted(set(not_committed.values()))
        state["error"] = (f"{len(not_committed)} instance(s) not committed by {dest.name}: "
                          f"{'; '.join(reasons)}")
        return True
    return changed


def request(station: Station, job: Job, data: JobRecord, dest: Destination, peer: Peer,
            state: DestinationState, items: Iterable[Item], net: NetSettings) -> SendStatus:
    """After every object is stored: ask ``peer`` to commit those not committed yet, and
    wait a little for the answer; the destination's new status ("waiting" while the
    answer is out)."""
    state.setdefault("commitment", {})
    by_uid = {it.sop_uid: it for it in items}
    todo = [by_uid[u] for u in _unrequested(state) if u in by_uid]
    if not todo:
        state["status"] = "waiting"
        settle(station, job, data, dest, state)
        return state["status"]
    after = state.get("commit_after")
    if after is None and dest.commitment_delay > 0:
        state["commit_after"] = isotime(utcnow() + timedelta(seconds=dest.commitment_delay))
        return "waiting"
    if after is not None and parse_isotime(str(after)) > utcnow():
        return "waiting"
    return _n_action(station, job, data, dest, peer, state, todo, net)


def _n_action(station: Station, job: Job, data: JobRecord, dest: Destination, peer: Peer,
              state: DestinationState, todo: list[Item], net: NetSettings) -> SendStatus:
    spool, journal = station.spool, station.journal
    key = f"destination.{dest.name}.commitment"
    uid = str(generate_uid())
    state["commitment"][uid] = {"sent_at": isotime(),
                                "instances": {it.sop_uid: PENDING for it in todo}}
    state.pop("commit_after", None)
    # job.json first (so forget() finds every registration), then the registration the
    # receiver checks reports against, then the request
    job.write(data)
    register(spool, uid, job.id, dest.name, {it.sop_uid: it.sop_class for it in todo})

    def drop(status: SendStatus, error: str) -> SendStatus:
        """The request did not reach the peer: no transaction."""
        del state["commitment"][uid]
        unregister(spool, uid)
        state["error"] = error
        return status

    got = threading.Event()

    def on_event(event: Any) -> tuple[int, None]:
        try:
            return on_report(station, event, via="same association")
        finally:
            got.set()

    context = build_context(SOP_CLASS)
    assoc = open_association(peer, [context], net, [(evt.EVT_N_EVENT_REPORT, on_event)])
    if not assoc.is_established:
        if assoc.is_aborted and assoc.rejected_contexts and not assoc.accepted_contexts:
            return drop("failed", f"{key}: {peer} does not accept the Storage Commitment Push "
                        f"Model SOP class ({SOP_CLASS}): the objects are stored but their "
                        "safekeeping cannot be confirmed (set commitment = false for this "
                        "destination, or enable storage commitment on the peer)")
        reason, for_good = why_not(assoc, peer)
        return drop("failed" if for_good else "retry", f"storage commitment: {reason}")
    try:
        if not assoc.accepted_contexts:
            return drop("failed", f"{key}: {peer} does not accept the Storage Commitment "
                        f"Push Model SOP class ({SOP_CLASS})")
        ds = Dataset()
        ds.TransactionUID = uid
        refs = []
        for it in todo:
            ref = Dataset()
            ref.ReferencedSOPClassUID = it.sop_class
            ref.ReferencedSOPInstanceUID = it.sop_uid
            refs.append(ref)
        ds.ReferencedSOPSequence = refs
        status, _reply = assoc.send_n_action(ds, ACTION_COMMIT, SOP_CLASS, SOP_INSTANCE)
        code = int(status.Status) if status is not None and "Status" in status else None
        if code is None:
            return drop("retry", f"storage commitment: no N-ACTION response from {peer} "
                        f"within {net.dimse_timeout:g}s")
        if code == 0x0213:  # resource limitation: for now
            return drop("retry", f"storage commitment: {peer} answered the N-ACTION with "
                        "0x0213 resource limitation")
        if code != 0x0000 and not 0xB000 <= code <= 0xBFFF:
            comment = status.get("ErrorComment")
            return drop("failed", f"{key}: {peer} refused the storage commitment request with "
                        f"status 0x{code:04X}" + (f": {comment}" if comment else ""))
        journal.emit(Stage.SEND, Event.COMMIT_REQUESTED, Status.INFO,
                     f"asked {peer} to commit {len(todo)} instance(s), transaction {uid}",
                     job=job, job_data=data, destination=dest.name, transaction_uid=uid,
                     count=len(todo))
        # the answer: on this association, or on a new one to the receiver
        wait_until = time.monotonic() + min(SAME_ASSOCIATION_WAIT, dest.commitment_timeout)
        while (time.monotonic() < wait_until and assoc.is_established
               and not _answer_file(spool, uid).exists()):
            got.wait(0.05)
    finally:
        if assoc.is_established:
            assoc.release()
    state.pop("error", None)
    state["status"] = "waiting"
    settle(station, job, data, dest, state)
    return state["status"]


__all__ = ["SOP_CLASS", "SOP_INSTANCE", "Verdict", "answer_arrived", "deadline", "due",
           "forget", "instance_states", "judge", "on_report", "register", "request", "settle",
           "summary"]
