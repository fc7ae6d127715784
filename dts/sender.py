"""Owns delivery of results: the ``send`` stage and ``dts send --to``.

A send job's results (``output/``) go to each destination of its stream: a DICOM node
over one association that proposes exactly the presentation contexts the objects need
(each object's own transfer syntax, plus an uncompressed fallback), sending the files as
encoded on disk; or a folder, into which they are copied under a temporary name and
renamed, so that a watcher never sees half a result.

What was delivered is kept per destination and per instance in job.json
(``destinations: {name: {status, sent, failed}}``), so a retry sends only what is
missing. A temporary problem (peer down, association rejected transiently or dropped, no
answer within the DIMSE timeout) leaves the job in ``send/new/`` with ``next_attempt_at``
(exponential backoff with jitter); ``ready()`` tells the worker loop when it is due. A
refusal for good (no accepted presentation context, a failure status) fails only the
instances concerned, and the job ends in ``failed/`` naming them.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import random
import secrets
import shutil
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from . import commitment, dicomweb, verify, worker
from .config import Config, Destination, StationConfig, valid_ae_title
from .dicom import ae as dicom_ae
from .dicom.header import read_attributes
from .dicom.store import (
    Delivery,
    Item,
    NetSettings,
    OnResult,
    Peer,
    collect_files,
    read_item,
    scan,
    status_text,
    store,
)
from .errors import JobFailed, TemporaryFailure, UsageError
from .jobrecord import DestinationState, JobRecord, SendStatus
from .journal import Event, Stage, Status
from .spool import Claim, Job, Queue, fsync_dir, isotime, parse_isotime, utcnow
from .station import Station

log = logging.getLogger(__name__)

SENDER = "@sender"
CHECKPOINT_SECONDS = 2.0  # how often job.json records progress during a long send


# -- what is sent -----------------------------------------------------------------------------

def job_items(job: Job, data: JobRecord) -> list[Item]:
    """The DICOM results of a job: job.json ``outputs`` if the run stage listed them,
    else a header scan of ``output/``."""
    outputs = data.get("outputs")
    if not isinstance(outputs, list):
        return scan([job.output_dir])[0] if job.output_dir.is_dir() else []
    root = job.output_dir.resolve()
    items: list[Item] = []
    seen: set[str] = set()
    for entry in outputs:
        if not isinstance(entry, dict) or not entry.get("file") or not entry.get("sop_uid"):
            raise JobFailed(f"job.json outputs: entry without file/sop_uid: {entry!r}")
        path = (job.output_dir / str(entry["file"])).resolve()
        if not path.is_relative_to(root):
            raise JobFailed(f"job.json outputs: {entry['file']!r} is outside output/")
        if not path.is_file():
            raise JobFailed(f"job.json outputs: {entry['file']!r} is missing from output/")
        uid = str(entry["sop_uid"])
        if uid in seen:
            continue
        seen.add(uid)
        cls, ts = entry.get("sop_class"), entry.get("transfer_syntax")
        if cls and ts:
            items.append(Item(path, uid, str(cls), str(ts)))
        else:
            found = read_item(path)
            if found is None:
                raise JobFailed(f"output {entry['file']!r} is not a readable DICOM object")
            items.append(found)
    return items

def apply_filter(dest: Destination, items: list[Item]) -> tuple[list[Item], list[str]]:
    """The objects that go to ``dest`` and the SOP Instance UIDs its ``filter`` keeps out.

    An object matches a filter table when every attribute the table names is present
    and its value (text; several values joined by ``\\``) matches the glob pattern
    (``fnmatch``, case-sensitive); a missing attribute matches no pattern, not even
    ``"*"``. With several tables, one matching table is enough. No filter: everything."""
    if not dest.filter:
        return items, []
    keywords = sorted({k for table in dest.filter for k in table})
    keep: list[Item] = []
    skipped: list[str] = []
    for it in items:
        try:
            attrs = read_attributes(it.path, keywords)
        except ValueError as exc:
            raise JobFailed(f"destination {dest.name}: filter: {exc}") from None
        if any(all(k in attrs and fnmatch.fnmatchcase(attrs[k], pattern)
                   for k, pattern in table.items()) for table in dest.filter):
            keep.append(it)
        else:
            skipped.append(it.sop_uid)
    return keep, skipped


# -- folder delivery ----------------------------------------------------------------------------

def _copy_durably(src: Path, dest: Path) -> None:
    with open(src, "rb") as fin, open(dest, "xb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())
    shutil.copystat(src, dest)


def deliver_to_folder(folder: Path, name: str, files: list[tuple[Path, Path]]) -> Path:
    """Copy ``files`` ((source, relative destination) pairs) to ``folder/name/`` through a
    hidden temporary folder beside it, renamed into place when complete."""
    folder.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{secrets.token_hex(3)}"
    tmp = folder / f".{name}.partial-{tag}"
    tmp.mkdir()
    try:
        for src, rel in files:
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            _copy_durably(src, dest)
        for dirpath, _dirs, _files in os.walk(tmp):
            fsync_dir(Path(dirpath))
        final = folder / name
        old = None
        if final.exists():  # delivered before (a re-run): replace it as a whole
            old = folder / f".{name}.old-{tag}"
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _output_files(job: Job, leave_out: set[Path] | None = None) -> list[tuple[Path, Path]]:
    root = job.output_dir
    if not root.is_dir():
        return []
    return [(f, f.relative_to(root)) for f in collect_files([root])
            if not leave_out or f.resolve() not in leave_out]


# -- resolving destinations ---------------------------------------------------------------------

def peer_of(dest: Destination, station: StationConfig) -> Peer:
    assert dest.ae_title and dest.host and dest.port
    return Peer(name=dest.name, ae_title=dest.ae_title, host=dest.host, port=dest.port,
                calling_ae=dest.calling_ae or station.ae_title, tls=tls_context(dest),
                server_name=dest.tls.server_name if dest.tls else None)


def tls_context(dest: Destination) -> ssl.SSLContext | None:
    """The TLS context of a destination with ``tls`` (checked when the configuration
    loaded; a file changed since is a usage error naming it)."""
    t = dest.tls
    if t is None:
        return None
    try:
        return dicom_ae.destination_ssl_context(t.ca_certificates, t.certificate,
                                                t.private_key, t.verify_peer)
    except (ssl.SSLError, OSError) as exc:
        raise UsageError(f"destination {dest.name}: TLS files unusable: {exc}") from None


def parse_target(config: Config, target: str, ae_title: str | None = None,
                 calling_ae: str | None = None) -> Destination:
    """A destination name from dts.toml, or ``HOST:PORT`` (with ``ae_title``)."""
    dest = config.destinations.get(target)
    if dest is None:
        host, sep, port = target.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            known = ", ".join(sorted(config.destinations)) or "none configured"
            raise UsageError(f"{target!r} is neither a destination ({known}) nor HOST:PORT")
        dest = Destination(name=target, ae_title=ae_title or "ANY-SCP", host=host.strip("[]"),
                           port=int(port))
    elif ae_title and not dest.is_folder and not dest.is_web:
        dest = Destination(dest.name, ae_title, dest.host, dest.port, dest.calling_ae)
    for what, value in (("--ae-title", dest.ae_title), ("--calling-ae", calling_ae)):
        if value is not None and not valid_ae_title(value):
            raise UsageError(f"{what}: not a valid AE title: {value!r}")
    if calling_ae and not dest.is_folder and not dest.is_web:
        dest = Destination(dest.name, dest.ae_title, dest.host, dest.port, calling_ae)
    return dest


def stream_destinations(config: Config, data: JobRecord) -> list[str]:
    stream = data.get("stream")
    if isinstance(stream, dict):  # a job that carries its stream's settings itself
        names = stream.get("destinations")
        if isinstance(names, list):
            return [str(n) for n in names]
        stream = stream.get("name")
    if not stream:
        raise JobFailed("job.json names no stream, so there is nowhere to send its results")
    found = config.stream(str(stream))
    if found is None:
        raise JobFailed(f"stream {stream!r} is not in the configuration any more")
    if not found.destinations:
        raise JobFailed(f"stream {stream!r} has no destinations")
    return list(found.destinations)


def resolve(config: Config, name: str, data: JobRecord) -> Destination:
    """The configured destination ``name``; ``@sender`` is the one whose AE title is the
    study's calling AE title."""
    if name != SENDER:
        dest = config.destinations.get(name)
        if dest is None:
            raise JobFailed(f"destination {name!r} is not in the configuration any more")
        return dest
    calling = data.get("calling_ae")
    if not calling:
        raise JobFailed("@sender: job.json has no calling AE title of the study")
    dest = config.destination_for_ae(str(calling))
    if dest is None:
        raise JobFailed(f"@sender: no [[destination]] has ae_title = {calling!r} (the AE title "
                        "the study came from); add one with its host and port")
    return dest


# -- the send stage ---------------------------------------------------------------------------

def backoff(station: StationConfig, attempts: int) -> float:
    """Seconds until the next try after ``attempts`` tries: doubling, capped, jittered."""
    base = station.send_backoff * (2 ** max(0, attempts - 1))
    delay = min(station.send_backoff_max, base)
    return delay * random.uniform(0.5, 1.0)


def ready(job: Job) -> bool:
    """Is the job due (no ``next_attempt_at`` in the future, or a storage commitment
    answer it waits for has arrived)?"""
    try:
        data = job.read()
        due = data.get("next_attempt_at")
        if not due or parse_isotime(str(due)) <= utcnow():
            return True
        # send/new/<job>: the spool is three levels up
        return commitment.answer_arrived(job.path.parents[2], data)
    except Exception:  # an unreadable job is processed, and failed there with the reason
        return True


def _settle(station: Station, job: Job, data: JobRecord, names: list[str],
            now: bool = False) -> tuple[bool, bool, set[str]]:
    """Merge what arrived for destinations waiting on storage commitment: (whether a
    try ended with it, whether any destination needs a new try, the state keys of the
    stream's destinations). ``now``: an N-ACTION waiting for its commitment_delay is
    due at once (``dts send JOB``)."""
    states = data.setdefault("destinations", {})
    changed, work = False, False
    current: set[str] = set()
    for name in names:
        try:
            dest = resolve(station.config, name, data)
        except JobFailed:
            work = True  # the try says so
            continue
        current.add(dest.name)
        state = states.get(dest.name)
        status = state.get("status") if state else None
        if state is None or status not in ("done", "failed", "waiting"):
            work = True
            continue
        if status != "waiting":
            continue
        if not dest.commitment:  # switched off since: the store is what counts
            state["status"] = "failed" if state.get("failed") else "done"
            changed = True
            continue
        changed |= commitment.settle(station, job, data, dest, state)
        if now and state.get("status") == "waiting" and state.get("commit_after"):
            state["commit_after"] = min(str(state["commit_after"]), isotime())
        if state.get("status") == "waiting" and commitment.due(state):
            work = True
    return changed, work, current


class _Progress:
    """Records per-instance results into job.json state, checkpointed now and then."""

    def __init__(self, job: Job, data: JobRecord, state: DestinationState) -> None:
        self.job, self.data, self.state = job, data, state
        self.sent: set[str] = set(state["sent"])
        self.last = time.monotonic()

    def __call__(self, item: Item, outcome: str, code: int | None) -> None:
        if outcome in ("sent", "warning") and item.sop_uid not in self.sent:
            self.sent.add(item.sop_uid)
            self.state["sent"].append(item.sop_uid)
        if time.monotonic() - self.last > CHECKPOINT_SECONDS:
            self.job.write(self.data)
            self.last = time.monotonic()


def _send_dicom(station: Station, job: Job, data: JobRecord, dest: Destination,
                state: DestinationState, items: list[Item]) -> SendStatus:
    """One try to a DICOM destination; returns the destination's new status."""
    done = set(state["sent"]) | set(state["failed"])
    todo = [it for it in items if it.sop_uid not in done]
    peer = peer_of(dest, station.config.station)
    if not todo:
        if state["failed"]:
            return "failed"
        return _after_store(station, job, data, dest, state, items, peer)
    t0 = time.monotonic()
    result = store(peer, todo, NetSettings.of(station.config.station),
                   _Progress(job, data, state))
    seconds = time.monotonic() - t0
    journal = station.journal
    for uid, code in result.warnings.items():
        journal.emit(Stage.SEND, Event.STORE_WARNING, Status.WARNING,
                     f"{peer} stored {uid} with warning status {status_text(code)}",
                     job=job, job_data=data, destination=dest.name, sop_uid=uid,
                     dimse_status=status_text(code))
    for uid, status in result.failed.items():
        state["failed"][uid] = status
        journal.emit(Stage.SEND, Event.STORE_FAILED, Status.ERROR, result.reasons.get(uid, status),
                     job=job, job_data=data, destination=dest.name, sop_uid=uid,
                     dimse_status=status)
    if result.sent:
        journal.emit(Stage.SEND, Event.STORED, Status.INFO,
                     f"{len(result.sent)} of {len(todo)} objects stored to {peer} in "
                     f"{seconds:.1f}s", job=job, job_data=data, destination=dest.name,
                     count=len(result.sent))
    if result.refused:
        state["error"] = result.refused
        return "failed"
    if result.temporary:
        state["error"] = result.temporary
        return "retry"
    state.pop("error", None)
    if state["failed"]:
        return "failed"
    return _after_store(station, job, data, dest, state, items, peer)


def _after_store(station: Station, job: Job, data: JobRecord, dest: Destination,
                 state: DestinationState, items: list[Item], peer: Peer) -> SendStatus:
    """Everything is stored: the proof of delivery the destination asks for, if any
    (``verify = "find"``, then ``commitment = true``; docs/delivery.md)."""
    net = NetSettings.of(station.config.station)
    sent = set(state["sent"])
    stored = [it for it in items if it.sop_uid in sent]
    journal = station.journal
    if dest.verify == "find" and not state.get("verified_at"):
        try:
            found = verify.check(dest, peer, stored, net)
        except verify.QueryRefused as exc:
            state["error"] = str(exc)
            return "failed"
        except verify.QueryUnavailable as exc:
            state["error"] = str(exc)
            return "retry"
        how = (f" ({len(found.series_level)} series by instance count)"
               if found.series_level else "")
        if found.missing:
            missing = set(found.missing)
            state["sent"] = [u for u in state["sent"] if u not in missing]
            state["error"] = (f"{len(missing)} of {len(stored)} instance(s) not found on "
                              f"{dest.name} by C-FIND after storing{how}; they are sent again")
            journal.emit(Stage.SEND, Event.VERIFY_MISSING, Status.WARNING, state["error"],
                         job=job, job_data=data, destination=dest.name,
                         missing=sorted(missing))
            return "retry"
        state["verified_at"] = isotime()
        journal.emit(Stage.SEND, Event.VERIFIED, Status.OK,
                     f"C-FIND found all {len(stored)} instance(s) on {peer}{how}", job=job,
                     job_data=data, destination=dest.name, count=len(stored))
    if dest.commitment:
        return commitment.request(station, job, data, dest, peer, state, stored, net)
    return "done"


def _send_folder(station: Station, job: Job, data: JobRecord, dest: Destination,
                 state: DestinationState, items: list[Item]) -> SendStatus:
    assert dest.folder is not None
    skipped = set(state.get("skipped", []))
    leave_out = {it.path.resolve() for it in job_items(job, data) if it.sop_uid in skipped}
    try:
        final = deliver_to_folder(dest.folder, job.id, _output_files(job, leave_out))
    except OSError as exc:
        state["error"] = f"cannot write to {dest.folder}: {exc.strerror or exc}"
        return "retry"
    state["sent"] = [it.sop_uid for it in items]
    state["path"] = str(final)
    state.pop("error", None)
    station.journal.emit(Stage.SEND, Event.STORED, Status.INFO,
                         f"results copied to {final}", job=job, job_data=data,
                         destination=dest.name, count=len(items))
    return "done"


def _send_web(station: Station, job: Job, data: JobRecord, dest: Destination,
              state: DestinationState, items: list[Item]) -> SendStatus:
    """One try to a STOW-RS destination (``dts.dicomweb``)."""
    return dicomweb.send(station, job, data, dest, state, items, _Progress(job, data, state))


def process(station: Station, claim: Claim, *, now: bool = False) -> worker.Outcome:
    """One try to deliver a claimed send job to every destination still missing.
    ``now``: the job was named (``dts send JOB``): a commitment_delay ends at once."""
    job = claim.job
    journal = station.journal
    data = job.read()
    if data.get("shadow"):  # however it got here, a shadow job's results never leave
        return _fail(station, claim, data, "a shadow job is never sent (its stream has "
                     "shadow = true, or it was replayed without --live)")
    try:
        names = stream_destinations(station.config, data)
        items = job_items(job, data)
    except JobFailed as exc:
        return _fail(station, claim, data, str(exc))
    states = data.setdefault("destinations", {})
    changed, work, current = _settle(station, job, data, names, now)
    if changed or not work:  # an answer ended a try, or only answers are awaited
        job.write(data)
        return _decide(station, claim, data, current)
    data["attempts"] = attempts = int(data.get("attempts") or 0) + 1
    data.pop("next_attempt_at", None)
    job.write(data)
    journal.emit(Stage.SEND, Event.SEND_STARTED, Status.INFO,
                 f"try {attempts}: {len(items)} objects to {', '.join(names)}",
                 job=job, job_data=data)
    handled: set[str] = set()  # state keys of the stream's destinations as they are now
    for name in names:
        try:
            dest = resolve(station.config, name, data)
        except JobFailed as exc:
            states[name] = {"status": "failed", "sent": [], "failed": {}, "error": str(exc)}
            handled.add(name)
            journal.emit(Stage.SEND, Event.DESTINATION_FAILED, Status.ERROR, str(exc), job=job,
                         job_data=data, destination=name)
            continue
        if dest.name in handled:
            continue  # "@sender" and the same destination by name: deliver once
        handled.add(dest.name)
        state = states.setdefault(dest.name, {})
        state.setdefault("sent", [])
        state.setdefault("failed", {})
        if name == SENDER:
            state["via"] = SENDER
        if state.get("status") in ("done", "failed"):
            continue
        if state.get("status") == "waiting" and not commitment.due(state):
            continue  # the peer's storage commitment answer is out
        try:
            wanted, skipped = apply_filter(dest, items)
        except JobFailed as exc:
            return _fail(station, claim, data, str(exc))
        if dest.filter:
            state["skipped"] = skipped
        if skipped:
            journal.emit(Stage.SEND, Event.FILTERED, Status.INFO,
                         f"{len(skipped)} of {len(items)} object(s) kept from {dest.name} by "
                         "its filter", job=job, job_data=data, destination=dest.name,
                         count=len(skipped))
        send = _send_folder if dest.is_folder else _send_web if dest.is_web else _send_dicom
        state["status"] = send(station, job, data, dest, state, wanted)
        job.write(data)
    return _decide(station, claim, data, handled)


def _decide(station: Station, claim: Claim, data: JobRecord,
            current: set[str]) -> worker.Outcome:
    job, journal, cfg = claim.job, station.journal, station.config.station
    # a destination no longer in the stream keeps its record but decides nothing
    states = {n: s for n, s in data["destinations"].items() if n in current}
    waiting = {n: s for n, s in states.items() if s.get("status") == "retry"}
    answers = {n: s for n, s in states.items() if s.get("status") == "waiting"}
    until = _commitment_wait(station, answers)
    attempts = int(data.get("attempts") or 0)
    if waiting and attempts <= cfg.send_retries:
        delay = backoff(cfg, attempts)
        data["next_attempt_at"] = isotime(utcnow() + timedelta(seconds=delay))
        if until is not None and until < data["next_attempt_at"]:
            data["next_attempt_at"] = until
        job.write(data)
        why = "; ".join(f"{n}: {s.get('error')}" for n, s in waiting.items())
        journal.emit(Stage.SEND, Event.SEND_RETRY, Status.WARNING,
                     f"try {attempts} of {cfg.send_retries + 1} incomplete ({why}); next try "
                     f"in {delay:.0f}s at {data['next_attempt_at']}", job=job, job_data=data,
                     next_attempt_at=data["next_attempt_at"])
        claim.move(Queue.SEND)
        return worker.Outcome.RETRY
    for s in waiting.values():
        s["status"] = "failed"
        s["error"] = f"gave up after {attempts} tries: {s.get('error')}"
    if answers:  # stored; the storage commitment answer is out (dts.commitment)
        data["next_attempt_at"] = until or isotime(utcnow() + timedelta(seconds=60))
        job.write(data)
        claim.move(Queue.SEND)
        return worker.Outcome.SKIPPED
    failed = {n: s for n, s in states.items() if s.get("status") == "failed"}
    if failed:
        return _fail(station, claim, data, "; ".join(_failure_summary(n, s)
                                                     for n, s in failed.items()))
    data.pop("error", None)
    data.pop("next_attempt_at", None)
    data["sent_at"] = isotime()
    job.write(data)
    total = sum(len(s.get("sent", [])) for s in states.values())
    committed = [n for n, s in states.items() if s.get("commitment")]
    journal.emit(Stage.SEND, Event.SENT, Status.OK,
                 f"delivered to {', '.join(states)} ({total} objects in all"
                 + (f"; committed by {', '.join(committed)}" if committed else "") + ")",
                 job=job, job_data=data)
    claim.move(Queue.DONE)
    commitment.forget(station.spool, data)
    return worker.Outcome.DONE


def _commitment_wait(station: Station, answers: dict[str, DestinationState]) -> str | None:
    """When the first destination waiting on storage commitment needs a look again."""
    times = []
    for name, state in answers.items():
        dest = station.config.destinations.get(name)
        if dest is not None:
            t = commitment.deadline(state, dest)
            if t is not None:
                times.append(t)
    return min(times) if times else None


def _failure_summary(name: str, state: DestinationState) -> str:
    failed = state.get("failed", {})
    parts = []
    if failed:
        parts.append(f"{len(failed)} object(s) not delivered "
                     f"({', '.join(sorted(set(failed.values())))})")
    if state.get("error"):
        parts.append(str(state["error"]))
    return f"{name}: " + "; ".join(parts)


def _fail(station: Station, claim: Claim, data: JobRecord, reason: str) -> worker.Outcome:
    data["error"] = reason
    data["failed_at"] = isotime()
    data.pop("next_attempt_at", None)
    claim.job.write(data)
    station.journal.emit(Stage.SEND, Event.SEND_FAILED, Status.ERROR, reason, job=claim.job,
                         job_data=data)
    claim.move(Queue.FAILED)
    commitment.forget(station.spool, data)
    return worker.Outcome.FAILED


def serve(station: Station, *, once: bool, job_ids: list[str] | None = None,
          stop: threading.Event | None = None) -> worker.Tally:
    """``dts send``: job ids now (regardless of backoff), the due jobs once, or forever."""
    return worker.serve(station, Queue.SEND, _process_now if job_ids else process,
                        once=once, job_ids=job_ids, ready=ready, stop=stop)


def _process_now(station: Station, claim: Claim) -> worker.Outcome:
    return process(station, claim, now=True)


# -- dts send --to ------------------------------------------------------------------------------

@dataclass
class AdHocResult:
    delivery: Delivery
    total: int
    skipped: list[Path]
    seconds: float
    folder: Path | None = None


def send_paths(station: Station, target: str, paths: list[Path], *,
               ae_title: str | None = None, calling_ae: str | None = None,
               on_start: Callable[[int], None] | None = None,
               on_result: OnResult | None = None) -> AdHocResult:
    """Send arbitrary DICOM files and folders to a destination or ``HOST:PORT``."""
    dest = parse_target(station.config, target, ae_title, calling_ae)
    items, skipped = scan(paths)
    if not items:
        raise UsageError(f"no DICOM files in {', '.join(map(str, paths))}")
    if on_start:
        on_start(len(items))
    t0 = time.monotonic()
    if dest.is_folder:
        assert dest.folder is not None
        from .spool import new_job_id

        files = [(it.path, Path(it.path.name)) for it in items]
        try:
            final = deliver_to_folder(dest.folder, new_job_id(), files)
        except OSError as exc:
            raise TemporaryFailure(f"cannot write to {dest.folder}: {exc.strerror or exc}") \
                from None
        delivery = Delivery(sent=[it.sop_uid for it in items])
        return AdHocResult(delivery, len(items), skipped, time.monotonic() - t0, final)
    if dest.is_web:
        delivery = dicomweb.store(dest, items, on_result)
        return AdHocResult(delivery, len(items), skipped, time.monotonic() - t0)
    delivery = store(peer_of(dest, station.config.station), items,
                     NetSettings.of(station.config.station), on_result)
    return AdHocResult(delivery, len(items), skipped, time.monotonic() - t0)
