"""Owns the event journal: one JSON line per state change.

Every event is appended to the job's ``events.jsonl`` (when there is a job) and
to the station-wide ``spool/log/YYYY-MM-DD.jsonl``. Lines are written with one
``write()`` on an ``O_APPEND`` descriptor, so concurrent stages never interleave
inside a line. Reading and filtering (``dts log``) lives here too; mirroring into
a SQL database is ``dts.journaldb``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

from .spool import Job, JobRecord, Spool, isotime, parse_isotime, utcnow


class Stage(str, Enum):
    RECEIVE = "receive"
    CLASSIFY = "classify"
    RUN = "run"
    REVIEW = "review"  # a person approving or rejecting results (dts review, the page)
    SEND = "send"
    REQUEUE = "requeue"
    CLEAN = "clean"
    WATCH = "watch"
    WEB = "web"
    NOTIFY = "notify"  # webhooks (dts.notify)


class Status(str, Enum):
    OK = "ok"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class Event(StrEnum):
    """The ``event`` of a journal line: what happened. The value is what is written (and
    what ``dts log`` and the ``dts_events`` table filter on); a new kind of event is a new
    member here, never a free string."""

    # receive (dts receive, dts import)
    RECEIVER_STARTED = "receiver-started"        # the C-STORE service listens
    RECEIVER_STOPPED = "receiver-stopped"        # it stopped (open associations finished)
    RECEIVE_WORKER_EXITED = "receive-worker-exited"  # a receiver worker process died; restarted
    ASSOCIATION_REFUSED = "association-refused"  # allow-lists, or max_associations open
    CONNECTIONS_CLOSED = "connections-closed"    # not associated, over the pending budget
    INSTANCE_REFUSED = "instance-refused"        # an instance answered with a failure status
    PUBLISH_FAILED = "publish-failed"            # a complete study could not move to classify/
    RECEIVED = "received"                        # a study was published to classify/new
    STOW_STORED = "stow-stored"                  # a STOW-RS request's parts (dts web) were kept
    STOW_REFUSED = "stow-refused"                # a STOW-RS request refused (401/413/415/400)
    # classify
    RULES_ERROR = "rules-error"                  # the rule file is unusable; jobs wait
    OWN_RESULT = "own-result"                    # the study holds this station's own results
    UNMATCHED = "unmatched"                      # no stream matched: job to unmatched/
    QUEUED = "queued"                            # a fan-out run job was made (on the child)
    MATCHED = "matched"                          # a stream matched (on the parent, per stream)
    # run
    SUBMITTED = "submitted"                      # handed to Slurm (sbatch), or found there again
    STARTED = "started"                          # the container or command was started (Slurm:
                                                 # the cluster job runs, with its node)
    SLURM_UNREACHABLE = "slurm-unreachable"      # slurmctld does not answer the follower
    INTERRUPTED = "interrupted"                  # stopped by a shutdown; job put back
    RETRY = "retry"                              # engine unreachable; job put back
    FINISHED = "finished"                        # valid output: job to send/ (review/, done/)
    RESULT = "result"                            # one value the model reported (dts_results)
    ORPHAN_STOPPED = "orphan-stopped"            # what a dead dts run left running was stopped
    SHADOW_DONE = "shadow-done"                  # a shadow job finished: kept in done/, nothing sent
    REPLAYED = "replayed"                        # dts replay made a run job from a finished one
    # review (a review stream's results wait in review/ for a person)
    REVIEW_WAITING = "review-waiting"            # valid results published to review/new
    APPROVED = "approved"                        # a person approved them: job to send/new
    REJECTED = "rejected"                        # a person rejected them: job to failed/
    PRIORS_FETCHED = "priors-fetched"            # prior studies retrieved into the job (or none)
    PRIORS_MISSING = "priors-missing"            # required priors not found, or refused
    # send
    SEND_STARTED = "send-started"                # a try to deliver a job began
    STORED = "stored"                            # objects reached one destination
    STORE_WARNING = "store-warning"              # the peer stored an object with a warning
    STORE_FAILED = "store-failed"                # the peer refused an object
    FILTERED = "filtered"                        # a destination's filter kept objects out
    DESTINATION_FAILED = "destination-failed"    # a destination cannot be resolved
    SEND_RETRY = "send-retry"                    # some destination waits: next try later
    SENT = "sent"                                # every destination has everything: done/
    SEND_FAILED = "send-failed"                  # delivery gave up: failed/
    # send: proof of delivery (dts.commitment, dts.verify)
    COMMIT_REQUESTED = "commit-requested"        # N-ACTION: storage commitment asked for
    COMMITTED = "committed"                      # the peer committed every instance asked
    COMMIT_FAILED = "commit-failed"              # some not committed (or no answer in time)
    VERIFIED = "verified"                        # a C-FIND found every instance stored
    VERIFY_MISSING = "verify-missing"            # a C-FIND did not find some: sent again
    # receive: storage commitment answers on a new association (dts.commitment)
    COMMIT_REPORT = "commit-report"              # an N-EVENT-REPORT kept for its job
    COMMIT_REPORT_REFUSED = "commit-report-refused"  # one refused: unknown transaction etc.
    # any work queue (classify, run, send)
    RECOVERED = "recovered"                      # a dead worker's job moved back to new/
    FAILED = "failed"                            # the job went to failed/ (classify, run, worker)
    INTERNAL_ERROR = "internal-error"            # an unexpected error; job put back
    # requeue
    REQUEUED = "requeued"                        # dts requeue moved the job
    # clean
    REMOVED = "removed"                          # a finished job was deleted
    CLEANED = "cleaned"                          # summary of one dts clean
    DISK_LOW = "disk-low"                        # below min_free_mb: oldest finished removed
    # watch
    WATCH_STARTED = "watch-started"              # dts watch started
    WATCH_STOPPED = "watch-stopped"              # dts watch stopped (work parked)
    JOURNAL_DB_UNUSABLE = "journal-db-unusable"  # [journal] url cannot be used at all
    JOURNAL_DB_DOWN = "journal-db-down"          # the journal database became unreachable
    JOURNAL_DB_UP = "journal-db-up"              # it is reachable again
    WEB_EXITED = "web-exited"                    # the page's process (dts web) died; restarted
    # web (dts web: the page's audit trail; user and remote address, never patient names)
    WEB_STARTED = "web-started"                  # dts web listens
    WEB_STOPPED = "web-stopped"                  # it stopped
    LOGIN = "login"                              # a user logged in
    LOGIN_FAILED = "login-failed"                # a wrong name or password (or throttled)
    LOGOUT = "logout"                            # a user logged out
    TIMELINE_VIEWED = "timeline-viewed"          # who opened which study's timeline
    REQUEUE = "requeue"                          # a requeue asked for on the page (then requeued)
    ECHO = "echo"                                # a C-ECHO of a destination from the page
    RULE_TEST = "rule-test"                      # the rule tester ran (a job or uploaded files)
    USER_CHANGED = "user-changed"                # dts web user add/passwd/remove
    # notify (webhooks, dts.notify; never themselves the subject of a webhook)
    NOTIFY_FAILED = "notify-failed"              # a delivery failed for now; retried later
    NOTIFY_GAVE_UP = "notify-gave-up"            # a delivery refused for good (4xx) or too old
    NOTIFY_DELIVERED = "notify-delivered"        # a delivery that had failed got through
    # any stage
    JOURNAL_LOST = "journal-lost"                # lines that could not be written (disk full)


# Keys every event has (the journal database has one column for each; the rest of an
# event goes into its ``details``).
EVENT_KEYS = ("time", "job", "stage", "event", "status", "message", "study_uid", "accession",
              "stream")
# job.json keys copied into each event of that job, so that a filter on one line works.
_FROM_JOB: tuple[Literal["study_uid", "accession", "stream"], ...] = (
    "study_uid", "accession", "stream")
_HOST = socket.gethostname()
LOGGER = logging.getLogger(__name__)


def _append_line(path: Path, line: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(line)
        while view:  # a short write (the disk filled up) ends in an OSError, not silently
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


@dataclass
class _Lost:
    """Journal lines a ``best_effort`` emit could not write, until they are reported."""

    count: int
    stage: str
    first: str
    last: str
    reason: str
    events: dict[str, int]


class Journal:
    """Writes events of one station.

    A line that must not hold up what it records (the receiver refuses an instance because
    the disk is full: the refusal must go out even though its line cannot be written) is
    emitted with ``best_effort=True``: when it cannot be written it is counted, said once on
    stderr, and the count is written as one ``journal-lost`` event before the next line that
    can be written (or at ``report_lost()``, which the receiver calls as it polls). The
    count lives in this process only: a process that dies before the disk has room again
    leaves only its stderr line."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._lost_lock = threading.Lock()
        self._lost: _Lost | None = None

    def emit(self, stage: Stage | str, event: Event, status: Status | str = Status.INFO,
             message: str = "", *, job: Job | None = None,
             job_data: JobRecord | None = None, best_effort: bool = False,
             **fields: Any) -> dict[str, Any]:
        """Record one event and return it. ``job_data`` saves re-reading job.json.
        ValueError for an event that is not an ``Event`` (nor the value of one). OSError
        when the line cannot be written, unless ``best_effort``: then it is counted for a
        later ``journal-lost`` event (see the class)."""
        record = self._record(stage, event, status, message, job, job_data, fields)
        if self._lost is not None and event != Event.JOURNAL_LOST:
            self.report_lost()
        try:
            # A line after lost ones starts on a line of its own: one of them may have
            # been cut short by the full disk.
            self._write(record, job, lead=b"\n" if event == Event.JOURNAL_LOST else b"")
        except OSError as exc:
            if not best_effort:
                raise
            self._count_lost(record, exc)
        return record

    def report_lost(self) -> bool:
        """Write the ``journal-lost`` event of the lines counted so far, if any and if it can
        be written now; True when nothing remains unreported."""
        with self._lost_lock:
            lost = self._lost
            if lost is None:
                return True
            try:
                self.emit(lost.stage, Event.JOURNAL_LOST, Status.ERROR,
                          f"{lost.count} journal line(s) could not be written between "
                          f"{lost.first} and {lost.last}: {lost.reason}",
                          lost=lost.count, first_lost=lost.first, last_lost=lost.last,
                          reason=lost.reason, lost_events=dict(lost.events))
            except OSError:
                return False
            self._lost = None
        LOGGER.warning("the journal can be written again; %d line(s) were lost (reported as "
                       "a journal-lost event)", lost.count)
        return True

    def lost(self) -> int:
        """How many lines wait to be reported as lost."""
        lost = self._lost
        return lost.count if lost is not None else 0

    def _count_lost(self, record: dict[str, Any], exc: OSError) -> None:
        reason = exc.strerror or str(exc)
        with self._lost_lock:
            lost = self._lost
            if lost is None:
                self._lost = lost = _Lost(0, record["stage"], record["time"], record["time"],
                                          reason, {})
                LOGGER.error("the journal cannot be written (%s); lines are counted and "
                             "reported as a journal-lost event once it can", reason)
            lost.count += 1
            lost.last = record["time"]
            lost.events[record["event"]] = lost.events.get(record["event"], 0) + 1

    def _record(self, stage: Stage | str, event: Event, status: Status | str, message: str,
                job: Job | None, job_data: JobRecord | None,
                fields: dict[str, Any]) -> dict[str, Any]:
        record: dict[str, Any] = {
            "time": isotime(),
            "job": job.id if job is not None else fields.pop("job", None),
            "stage": Stage(stage).value,
            "event": Event(event).value,
            "status": Status(status).value,
            "message": message,
        }
        if job is not None and job_data is None:
            try:
                job_data = job.read()
            except Exception:  # an unreadable job.json must not stop the event
                job_data = {}
        for key in _FROM_JOB:
            value = fields.pop(key, None)
            if value is None and job_data:
                value = job_data.get(key)
            record[key] = value
        record["host"] = _HOST
        record["pid"] = os.getpid()
        record.update({k: v for k, v in fields.items() if v is not None})
        return record

    def _write(self, record: dict[str, Any], job: Job | None, lead: bytes = b"") -> None:
        line = lead + (json.dumps(record, default=str, separators=(",", ":")) + "\n").encode()
        if job is not None:
            try:
                _append_line(job.events_file, line)
            except FileNotFoundError:
                pass  # job moved on meanwhile; the station log still has it
        self.spool.log_dir.mkdir(parents=True, exist_ok=True)
        _append_line(self.log_file(record["time"]), line)

    def log_file(self, time_text: str) -> Path:
        return self.spool.log_dir / f"{time_text[:10]}.jsonl"


# -- reading ------------------------------------------------------------------

@dataclass
class EventFilter:
    job: str | None = None
    study: str | None = None
    accession: str | None = None
    stream: str | None = None
    stage: str | None = None
    status: tuple[str, ...] = ()
    since: datetime | None = None
    until: datetime | None = None
    event: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def matches(self, rec: dict[str, Any]) -> bool:
        if self.job is not None:
            j = rec.get("job") or ""
            # a parent's filter also shows its fan-out children (J.<stream>)
            if j != self.job and not j.startswith(self.job + ".") and \
                    rec.get("parent") != self.job:
                return False
        if self.study is not None and rec.get("study_uid") != self.study:
            return False
        if self.accession is not None and rec.get("accession") != self.accession:
            return False
        if self.stream is not None and rec.get("stream") != self.stream:
            return False
        if self.stage is not None and rec.get("stage") != self.stage:
            return False
        if self.event is not None and rec.get("event") != self.event:
            return False
        if self.status and rec.get("status") not in self.status:
            return False
        if self.since is not None or self.until is not None:
            try:
                t = parse_isotime(str(rec.get("time")))
            except ValueError:
                return False
            if self.since is not None and t < self.since:
                return False
            if self.until is not None and t > self.until:
                return False
        return True

    def needles(self) -> list[tuple[str, ...]]:
        """Text a line must hold (one of each group) to possibly match: the filter's
        values as the journal writes them (JSON strings). Lines without them are skipped
        unparsed, which makes a filtered scan of a large journal several times faster."""
        groups: list[tuple[str, ...]] = []
        for value in (self.study, self.accession, self.stream, self.stage, self.event):
            if value is not None:
                groups.append((json.dumps(value),))
        if self.status:
            groups.append(tuple(json.dumps(v) for v in self.status))
        if self.job is not None:  # the job, its children (J.<stream>), or as parent
            groups.append((json.dumps(self.job)[:-1],))
        return groups


def _prefiltered(lines: Iterable[str], needles: list[tuple[str, ...]]) -> Iterator[str]:
    for line in lines:
        if all(any(n in line for n in group) for group in needles):
            yield line


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``--since``: an ISO-8601 time, or a duration back from now (``2h``, ``7d``)."""
    from .config import parse_duration

    try:
        return (now or utcnow()) - timedelta(seconds=parse_duration(text))
    except ValueError:
        pass
    try:
        return parse_isotime(text)
    except ValueError:
        raise ValueError(f"not an ISO-8601 time or a duration like 2h or 7d: {text!r}") from None


def log_files(spool: Spool, since: datetime | None = None) -> list[Path]:
    files = sorted(spool.log_dir.glob("*.jsonl"))
    if since is not None:
        day = since.astimezone(timezone.utc).strftime("%Y-%m-%d")
        files = [f for f in files if f.name[:10] >= day]
    return files


def _parse_lines(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash: skipped, never fatal
        if isinstance(rec, dict):
            yield rec


def read_events(spool: Spool, flt: EventFilter | None = None) -> Iterator[dict[str, Any]]:
    """Events of the station journal in time order, filtered."""
    flt = flt or EventFilter()
    needles = flt.needles()
    for path in log_files(spool, flt.since):
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines: Iterable[str] = _prefiltered(fh, needles) if needles else fh
            for rec in _parse_lines(lines):
                if flt.matches(rec):
                    yield rec


def follow_events(spool: Spool, flt: EventFilter | None = None, poll: float = 0.25,
                  stop: Any = None) -> Iterator[dict[str, Any]]:
    """The matching history, then (like ``tail -f`` over the daily files) new events as
    they are written; history and following share one read position, so no event
    written in between is missed or printed twice."""
    flt = flt or EventFilter()
    files = log_files(spool, flt.since)
    current = files[0] if files else spool.log_dir / f"{isotime()[:10]}.jsonl"
    pos = 0
    buf = ""
    while stop is None or not stop():
        try:
            with open(current, encoding="utf-8", errors="replace") as fh:
                fh.seek(pos)
                chunk = fh.read()
                pos = fh.tell()
        except FileNotFoundError:
            chunk = ""
        if chunk:
            buf += chunk
            lines = buf.split("\n")
            buf = lines.pop()
            for rec in _parse_lines(lines):
                if flt.matches(rec):
                    yield rec
            continue
        newer = [f for f in log_files(spool) if f.name > current.name]
        if newer:
            current, pos, buf = newer[0], 0, ""
            continue
        time.sleep(poll)
