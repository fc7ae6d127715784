"""Owns the station's index: the journal shipped into SQL, and what the page reads of it.

The spool stays the truth. The index is a copy that pages and scripts can query fast
with a year of traffic: ``dts_events`` (the journal, the same table and shipper as
``dts.journaldb``), and tables derived from it:

- ``dts_exams``: one row per study (accession, patient ID, study date, who sent it,
  instances, streams, jobs, status, turnaround), and ``dts_exam_jobs`` (job -> study);
- ``dts_daily``: per day and metric, the counts the overview and ``/metrics`` show
  (events, errors, studies and instances received, refusals, failures by stage,
  deliveries, run-time and turnaround histograms).

Where it lives: SQLite in the spool (``spool/index/dts.sqlite``) by default; the
``[journal] url`` database (PostgreSQL) when one is set. Its cursor (how far each
journal file was read) is ``spool/index/cursor.json``; deleting the index folder and
syncing again rebuilds everything from the journal files.

Derived rows are recomputed, not incremented: a sync notes the studies and days its new
lines touch and computes each of them again from its events. So a line read twice (a
crash between commit and cursor, another shipper filling ``dts_events`` first) changes
nothing, and the derivation can change between versions without a migration (delete the
index). Patient IDs are in ``dts_exams`` (as in job.json, for the search); names never.

No stage waits on the index: ``sync`` is called by the readers (``dts web``), and an
index that cannot be opened raises ``IndexUnavailable``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from . import journaldb
from .config import parse_duration
from .errors import SpoolError, TemporaryFailure, UsageError
from .journal import EventFilter
from .spool import (
    Job,
    Queue,
    Spool,
    State,
    age_seconds,
    isotime,
    parse_isotime,
    utcnow,
    valid_job_id,
)
from .station import Station
from .status import queue_counts, service_state

log = logging.getLogger(__name__)

INDEX_DIR = "index"
SQLITE_NAME = "dts.sqlite"
CURSOR_NAME = "cursor.json"
EXAMS = "dts_exams"
EXAM_JOBS = "dts_exam_jobs"
DAILY = "dts_daily"
DAYS_SHOWN = 28
SYNC_BATCH = 5000  # journal lines per transaction (a rebuild reads a year of them)
CHUNK = 500  # studies recomputed per query
FIND_ONE_BY_ONE = 50  # more touched studies than this: list the spool's folders once

STATUSES = ("receiving", "classifying", "running", "review", "sending", "done", "failed",
            "unmatched")
# An exam's status is its most urgent job's: a failure first, then work under way.
_PRECEDENCE = ("failed", "review", "receiving", "classifying", "running", "sending", "unmatched",
               "done")
# The job status an event leaves behind (events not listed leave it as it was).
_JOB_STATUS = {
    "received": "classifying", "matched": "classified", "unmatched": "unmatched",
    "own-result": "unmatched", "queued": "running", "submitted": "running",
    "started": "running",
    "finished": "sending", "send-started": "sending", "send-retry": "sending",
    "stored": "sending", "sent": "done", "failed": "failed", "send-failed": "failed",
    "commit-requested": "sending", "committed": "sending", "commit-failed": "sending",
    "verified": "sending", "verify-missing": "sending",
    # review and shadow streams, replays (dts.review, dts.replay)
    "review-waiting": "review", "approved": "sending", "rejected": "failed",
    "shadow-done": "done", "replayed": "running",
}
_REQUEUE_STATUS = {"classify": "classifying", "run": "running", "send": "sending"}
# Histogram buckets (seconds) of run durations and turnarounds (/metrics).
BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, math.inf)


class IndexUnavailable(TemporaryFailure):
    """The index database cannot be opened or queried now."""


# -- queries --------------------------------------------------------------------------

@dataclass(frozen=True)
class ExamQuery:
    """What the exam list shows: a search text (accession, Study Instance UID, patient ID
    or job id, matched exactly), filters, and a page."""

    text: str | None = None
    status: str | None = None
    stream: str | None = None
    calling_ae: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    page: int = 1
    per_page: int = 50

    MAX_PER_PAGE = 500

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> ExamQuery:
        """From request parameters (``q``, ``status``, ``stream``, ``calling_ae``,
        ``since``, ``until``: ISO-8601 or a duration such as ``2h``, ``page``,
        ``per_page``); UsageError naming the parameter for a malformed one."""
        def text(name: str, limit: int = 128) -> str | None:
            value = params.get(name)
            if value is None or value.strip() == "":
                return None
            value = value.strip()
            if len(value) > limit or any(ord(c) < 32 for c in value):
                raise UsageError(f"parameter {name!r}: not a valid value")
            return value

        def number(name: str, default: int, top: int) -> int:
            value = params.get(name)
            if value is None or value == "":
                return default
            try:
                n = int(value)
            except ValueError:
                raise UsageError(f"parameter {name!r}: not a whole number: {value!r}") from None
            if not 1 <= n <= top:
                raise UsageError(f"parameter {name!r}: must be between 1 and {top}")
            return n

        status = text("status")
        if status is not None and status not in STATUSES:
            raise UsageError(f"parameter 'status': one of {', '.join(STATUSES)}, "
                             f"not {status!r}")
        return cls(text=text("q"), status=status, stream=text("stream"),
                   calling_ae=text("calling_ae", 16), since=_time_param(params, "since"),
                   until=_time_param(params, "until"), page=number("page", 1, 1_000_000),
                   per_page=number("per_page", 50, cls.MAX_PER_PAGE))


def _time_param(params: Mapping[str, str], name: str) -> datetime | None:
    value = (params.get(name) or "").strip()
    if not value:
        return None
    try:
        return parse_isotime(value)
    except ValueError:
        pass
    try:
        return utcnow() - timedelta(seconds=parse_duration(value))
    except (ValueError, TypeError):
        raise UsageError(f"parameter {name!r}: an ISO-8601 time or a duration such as "
                         f"2h or 7d, not {value!r}") from None


@dataclass
class ExamPage:
    rows: list[dict[str, Any]]
    total: int
    page: int
    per_page: int

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "total": self.total, "page": self.page,
                "per_page": self.per_page}


# -- tables -----------------------------------------------------------------------------

def _tables(metadata: sa.MetaData) -> tuple[sa.Table, sa.Table, sa.Table]:
    tz = sa.DateTime(timezone=True)
    exams = sa.Table(
        EXAMS, metadata,
        sa.Column("study_uid", sa.String(64), primary_key=True),
        sa.Column("accession", sa.Text, index=True),
        sa.Column("patient_id", sa.Text, index=True),
        sa.Column("study_date", sa.String(8)),
        sa.Column("calling_ae", sa.String(16), index=True),
        sa.Column("called_ae", sa.String(16)),
        sa.Column("peer", sa.Text),
        sa.Column("received_at", tz, index=True),
        sa.Column("last_received_at", tz),
        sa.Column("instances", sa.Integer),
        sa.Column("series", sa.Integer),
        sa.Column("streams", sa.JSON),
        # ",a,b,": the stream filter scans this (a join through dts_exam_jobs to count
        # 50,000 exams took 0.6 s, this takes a few ms)
        sa.Column("stream_list", sa.Text),
        sa.Column("jobs", sa.JSON),
        sa.Column("status", sa.String(16), index=True),
        sa.Column("reason", sa.Text),
        sa.Column("delivered_at", tz),
        sa.Column("turnaround", sa.Float),
        sa.Column("last_event_at", tz),
        # the list filtered by status, newest first, without sorting every match
        sa.Index("ix_dts_exams_status_received", "status", "received_at"),
    )
    exam_jobs = sa.Table(
        EXAM_JOBS, metadata,
        sa.Column("job", sa.Text, primary_key=True),
        sa.Column("study_uid", sa.String(64), index=True),
        sa.Column("stream", sa.Text, index=True),
    )
    daily = sa.Table(
        DAILY, metadata,
        sa.Column("day", sa.String(10), primary_key=True),
        sa.Column("metric", sa.String(64), primary_key=True),
        sa.Column("labels", sa.String(200), primary_key=True),
        sa.Column("value", sa.Float),
    )
    return exams, exam_jobs, daily


class Index:
    """The station's index (see the module docstring); safe to share between threads."""

    def __init__(self, station: Station) -> None:
        self.station = station
        self.spool = station.spool
        self.folder = self.spool.root / INDEX_DIR
        url = station.config.journal.url
        self.embedded = not url
        try:
            self.folder.mkdir(parents=True, exist_ok=True)  # the cursor is kept here
            if self.embedded:
                db_file = self.folder / SQLITE_NAME
                if not db_file.exists():  # a new index starts reading from the beginning
                    (self.folder / CURSOR_NAME).unlink(missing_ok=True)
                url = f"sqlite:///{db_file}"
            assert url is not None
            self.shipper = journaldb.Shipper(self.spool, url, batch=SYNC_BATCH,
                                             cursor=self.folder / CURSOR_NAME)
        except OSError as exc:
            raise IndexUnavailable(f"index in {self.folder}: {exc.strerror or exc}") from None
        self.db = self.shipper.db
        if self.embedded:
            _sqlite_pragmas(self.db.engine)
        self.t_exams, self.t_jobs, self.t_daily = _tables(self.db.metadata)
        self._sync_lock = threading.Lock()
        self._folders: dict[str, Path] | None = None  # job id -> folder, during a sync
        self._lookups = 0
        self._ready = False

    def close(self) -> None:
        self.shipper.close()

    # -- keeping it up to date ----------------------------------------------------
    def _ensure(self) -> None:
        if not self._ready:
            try:
                self.db.metadata.create_all(self.db.engine, checkfirst=True)
            except sa.exc.SQLAlchemyError as exc:
                raise IndexUnavailable(f"index {journaldb.redact(self.db.url)}: "
                                       f"{journaldb._short(exc)}") from None
            self._ready = True

    def sync(self) -> int:
        """Ship the journal lines not in the index yet and recompute what they touch;
        the number of lines read. Cheap when nothing is new (a stat per journal file)."""
        self._ensure()
        with self._sync_lock:
            self._folders, self._lookups = None, 0
            self.shipper.on_rows = self._apply
            try:
                result = self.shipper.ship()
            except TemporaryFailure as exc:
                raise IndexUnavailable(str(exc)) from None
            except sa.exc.SQLAlchemyError as exc:
                raise IndexUnavailable(f"index {journaldb.redact(self.db.url)}: "
                                       f"{journaldb._short(exc)}") from None
            finally:
                self.shipper.on_rows = None
                self._folders = None
            return result.read

    def _apply(self, conn: sa.Connection, rows: list[dict[str, Any]]) -> None:
        """Recompute what a batch of journal rows touches, in the transaction that
        inserts them (before the cursor moves)."""
        touched = _Touched()
        touched.add(rows)
        studies = sorted(touched.studies)
        for i in range(0, len(studies), CHUNK):
            touched.days |= self._recompute_exams(conn, studies[i:i + CHUNK])
        for day in sorted(touched.days):
            self._recompute_day(conn, day)

    def _recompute_exams(self, conn: sa.Connection, studies: list[str]) -> set[str]:
        """The exam rows of ``studies`` from their events (and, while the index lacks
        them, their job.json); the days of their deliveries."""
        t, e, j = self.db.table, self.t_exams, self.t_jobs
        events: dict[str, list[Any]] = {}
        for row in conn.execute(sa.select(t.c.study_uid, t.c.time, t.c.job, t.c.event,
                                          t.c.stage, t.c.status, t.c.message, t.c.accession,
                                          t.c.stream, t.c.details)
                                .where(t.c.study_uid.in_(studies))
                                .order_by(t.c.time, t.c.id)).mappings():
            events.setdefault(row["study_uid"], []).append(row)
        olds = {r["study_uid"]: dict(r) for r in conn.execute(
            sa.select(e).where(e.c.study_uid.in_(studies))).mappings()}
        exams, jobs, days = [], [], set()
        for study in studies:
            exam = _derive_exam(study, events.get(study, []), olds.get(study),
                                frozenset(s.name for s in self.station.config.streams
                                          if s.shadow))
            if exam is None:
                continue
            if exam.get("patient_id") is None or exam.get("study_date") is None:
                self._identity_from_jobs(exam)
            exams.append(exam["row"] | _identity_row(exam))
            jobs += [{"job": job, "study_uid": study, "stream": stream}
                     for job, stream in exam["job_streams"].items()]
            delivered = exam["row"].get("delivered_at")
            if delivered is not None:
                days.add(delivered.astimezone(UTC).strftime("%Y-%m-%d"))
        conn.execute(sa.delete(e).where(e.c.study_uid.in_(studies)))
        conn.execute(sa.delete(j).where(j.c.study_uid.in_(studies)))
        if exams:
            conn.execute(sa.insert(e), exams)
        if jobs:
            conn.execute(sa.delete(j).where(j.c.job.in_([r["job"] for r in jobs])))
            conn.execute(sa.insert(j), jobs)
        return days

    def _job_folders(self) -> dict[str, Path]:
        """Every job folder in the spool, by job id (one listing per queue)."""
        out: dict[str, Path] = {}
        for loc in self.spool.locations():
            folder = self.spool.dir(loc.queue, loc.state)
            try:
                with os.scandir(folder) as entries:
                    for entry in entries:
                        if not entry.name.startswith("."):
                            out.setdefault(entry.name, Path(entry.path))
            except FileNotFoundError:
                continue
        return out

    def _folder_of(self, job_id: str) -> Path | None:
        """Where job ``job_id`` is; looked up one by one at first, then (a rebuild asks
        for thousands) in one listing of the spool for the rest of this sync."""
        if self._folders is None:
            self._lookups += 1
            if self._lookups <= FIND_ONE_BY_ONE:
                found = self.spool.locate(job_id) if valid_job_id(job_id) else None
                return found[1] if found else None
            self._folders = self._job_folders()
        return self._folders.get(job_id)

    def _identity_from_jobs(self, exam: dict[str, Any]) -> None:
        """Patient ID, study date and the first/last instance times from the study's
        jobs in the spool (the journal never holds patient IDs)."""
        for job_id in exam["row"]["jobs"]:
            path = self._folder_of(job_id)
            if path is None:
                continue
            job = Job(path)
            try:
                data = job.read()
            except SpoolError:  # unreadable: the row waits for the next look
                continue
            for key in ("patient_id", "received_at", "last_received_at"):
                if exam.get(key) is None and data.get(key):
                    exam[key] = data.get(key)
            if exam.get("study_date") is None:
                try:
                    doc = json.loads((job.path / "study.json").read_bytes())
                    exam["study_date"] = doc.get("StudyDate") or None
                except (OSError, ValueError, AttributeError):
                    pass
            if exam.get("patient_id") is not None and exam.get("study_date") is not None:
                break

    def _recompute_day(self, conn: sa.Connection, day: str) -> None:
        t = self.db.table
        start = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=UTC)
        end = start + timedelta(days=1)
        rows = conn.execute(sa.select(t.c.time, t.c.job, t.c.event, t.c.stage, t.c.status,
                                      t.c.details)
                            .where(t.c.time >= start, t.c.time < end)
                            .order_by(t.c.time, t.c.id)).mappings().all()
        metrics = _Metrics()
        for row in rows:
            metrics.add_event(row)
        for (turnaround,) in conn.execute(
                sa.select(self.t_exams.c.turnaround)
                .where(self.t_exams.c.delivered_at >= start, self.t_exams.c.delivered_at < end,
                       self.t_exams.c.turnaround.is_not(None))):
            metrics.observe("turnaround_seconds", "", float(turnaround))
        conn.execute(sa.delete(self.t_daily).where(self.t_daily.c.day == day))
        values = [{"day": day, "metric": m, "labels": labels, "value": v}
                  for (m, labels), v in metrics.values.items()]
        if values:
            conn.execute(sa.insert(self.t_daily), values)

    # -- reading ---------------------------------------------------------------------
    def _read(self, query: Any) -> list[dict[str, Any]]:
        self._ensure()
        try:
            with self.db.engine.connect() as conn:
                return [dict(r) for r in conn.execute(query).mappings()]
        except sa.exc.SQLAlchemyError as exc:
            raise IndexUnavailable(f"index {journaldb.redact(self.db.url)}: "
                                   f"{journaldb._short(exc)}") from None

    def exams_list(self, q: ExamQuery) -> ExamPage:
        e = self.t_exams
        where: list[Any] = []
        if q.text is not None:
            jobs = sa.select(self.t_jobs.c.study_uid).where(self.t_jobs.c.job == q.text)
            where.append(sa.or_(e.c.accession == q.text, e.c.study_uid == q.text,
                                e.c.patient_id == q.text, e.c.study_uid.in_(jobs)))
        if q.status is not None:
            where.append(e.c.status == q.status)
        if q.calling_ae is not None:
            where.append(e.c.calling_ae == q.calling_ae)
        if q.stream is not None:
            where.append(e.c.stream_list.contains(f",{q.stream},", autoescape=True))
        if q.since is not None:
            where.append(e.c.received_at >= q.since)
        if q.until is not None:
            where.append(e.c.received_at <= q.until)
        total = self._read(sa.select(sa.func.count().label("n")).select_from(e).where(*where))
        rows = self._read(sa.select(e).where(*where)
                          .order_by(e.c.received_at.desc(), e.c.study_uid)
                          .limit(q.per_page).offset((q.page - 1) * q.per_page))
        return ExamPage([_exam_out(r) for r in rows], int(total[0]["n"]), q.page, q.per_page)

    def exams(self, q: ExamQuery) -> ExamPage:
        """The exam list's page ``q`` asks for, newest first."""
        return self.exams_list(q)

    def exam(self, study_uid: str) -> dict[str, Any] | None:
        rows = self._read(sa.select(self.t_exams).where(self.t_exams.c.study_uid == study_uid))
        return _exam_out(rows[0]) if rows else None

    def events(self, flt: EventFilter, limit: int = 200, offset: int = 0) -> list[dict[str, Any]]:
        """Journal lines matching ``flt``, newest first."""
        t = self.db.table
        q = self.db.filtered(flt)
        rows = self._read(q.order_by(t.c.time.desc(), t.c.id.desc()).limit(limit).offset(offset))
        return [journaldb.row_to_event(r) for r in rows]

    def daily(self, metric: str, days: int = DAYS_SHOWN) -> dict[str, dict[str, float]]:
        """{day: {labels: value}} of one metric for the last ``days`` days."""
        first = (utcnow() - timedelta(days=days - 1)).strftime("%Y-%m-%d")
        out: dict[str, dict[str, float]] = {}
        for r in self._read(sa.select(self.t_daily).where(self.t_daily.c.metric == metric,
                                                           self.t_daily.c.day >= first)):
            out.setdefault(r["day"], {})[r["labels"]] = float(r["value"])
        return out

    def totals(self) -> dict[tuple[str, str], float]:
        """Every metric summed over all days: {(metric, labels): value}."""
        d = self.t_daily
        rows = self._read(sa.select(d.c.metric, d.c.labels, sa.func.sum(d.c.value).label("v"))
                          .group_by(d.c.metric, d.c.labels))
        return {(r["metric"], r["labels"]): float(r["v"] or 0) for r in rows}

    def overview(self) -> dict[str, Any]:
        now = utcnow()
        cfg = self.station.config.station
        days = [(now - timedelta(days=i)).strftime("%Y-%m-%d")
                for i in range(DAYS_SHOWN - 1, -1, -1)]
        events = self.daily("events")
        today = days[-1]
        received = self.daily("studies_received", 1).get(today, {})
        instances = self.daily("instances_received", 1).get(today, {})
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        turnarounds = [r["turnaround"] for r in self._read(
            sa.select(self.t_exams.c.turnaround).where(self.t_exams.c.delivered_at >= start,
                                                     self.t_exams.c.turnaround.is_not(None)))]
        try:
            free = round(self.spool.free_mb())
        except OSError:
            free = None
        return {
            "time": isotime(now),
            "services": {name: service_state(self.spool, name)
                         for name in ("receiver", "watch", "classify", "run", "send")},
            "queues": queue_counts(self.spool),
            "disk": {"free_mb": free, "min_free_mb": cfg.min_free_mb,
                     "clean_below_free_mb": cfg.clean_below_free_mb},
            "attention": self.attention(),
            "events_per_day": [{"day": d, "total": int(events.get(d, {}).get("", 0)),
                                "errors": int(events.get(d, {}).get("status=error", 0))}
                               for d in days],
            "today": {"studies": int(received.get("", 0)),
                      "instances": int(instances.get("", 0)),
                      "median_turnaround_seconds": (round(statistics.median(turnarounds), 3)
                                                    if turnarounds else None)},
        }

    def attention(self, limit: int = 200) -> list[dict[str, Any]]:
        """Jobs that need a person: failed ones, and work older than the stuck age."""
        out: list[dict[str, Any]] = []
        spool = self.spool
        for job_id in reversed(spool.list(Queue.FAILED)):
            out.append(self._attention_row(job_id, Queue.FAILED, None, "failed"))
            if len(out) >= limit:
                return out
        for state in (State.NEW, State.CUR):  # results waiting for a person's decision
            for job_id in spool.list(Queue.REVIEW, state):
                out.append(self._attention_row(job_id, Queue.REVIEW, state, "review"))
                if len(out) >= limit:
                    return out
        stuck = max(3600.0, 10 * self.station.config.station.stable_seconds)
        counts = queue_counts(spool)
        for queue in Spool.WORK:
            if queue is Queue.REVIEW:
                continue  # listed above, however long they wait
            if (counts.get(queue.value, {}).get("oldest_seconds") or 0) < stuck:
                continue
            for state in (State.NEW, State.CUR):
                for job_id in spool.list(queue, state):
                    age = age_seconds(job_id)
                    if age is not None and age >= stuck:
                        row = self._attention_row(job_id, queue, state, "stuck")
                        out.append(row)
                        if len(out) >= limit:
                            return out
        return out

    def _attention_row(self, job_id: str, queue: Queue, state: State | None,
                       kind: str) -> dict[str, Any]:
        path = spool_path(self.spool, queue, state, job_id)
        try:
            data = Job(path).read()
        except SpoolError:
            data = {}
        failure = data.get("failure") or {}
        reason = data.get("error") or (failure.get("message") if isinstance(failure, dict)
                                       else None)
        child = bool(data.get("parent"))
        targets = ["run", "send"] if child else ["classify", "run", "send"]
        review: dict[str, Any] = dict(data.get("review") or {})
        if not data.get("outputs") or data.get("shadow") or review.get("decision") == "rejected":
            targets = [t for t in targets if t != "send"]
        if kind == "review":  # decided on the exam's timeline, not requeued
            targets = []
            reason = f"waits for review since {review.get('waiting_since') or '?'}"
        return {"job": job_id, "queue": queue.value, "state": state.value if state else None,
                "kind": kind, "reason": reason, "since": data.get("failed_at")
                or data.get("updated_at"), "study_uid": data.get("study_uid"),
                "accession": data.get("accession"), "stream": _stream_name(data),
                "requeue_to": targets}

    def timeline(self, study_uid: str) -> dict[str, Any] | None:
        """Everything about one study, in order, from its job folders and its events;
        None for a study the index does not know."""
        exam = self.exam(study_uid)
        if exam is None:
            return None
        t = self.db.table
        events = [journaldb.row_to_event(r) for r in self._read(
            sa.select(t).where(t.c.study_uid == study_uid).order_by(t.c.time, t.c.id))]
        jobs: list[dict[str, Any]] = []
        for job_id in exam["jobs"]:
            try:
                loc, path = self.spool.find(job_id)
                data: dict[str, Any] = dict(Job(path).read())
            except (UsageError, SpoolError):  # cleaned away, or unreadable
                jobs.append({"id": job_id, "queue": None, "state": None, "gone": True})
                continue
            data["id"] = job_id
            data["queue"] = loc.queue.value
            data["state"] = loc.state.value if loc.state else None
            data["log_files"] = sorted(p.name for p in Job(path).logs_dir.glob("*")) \
                if Job(path).logs_dir.is_dir() else []
            jobs.append(data)
        return {"study_uid": study_uid, "accession": exam["accession"],
                "patient_id": exam["patient_id"], "status": exam["status"], "exam": exam,
                "jobs": jobs, "entries": _entries(events, jobs),
                "explanations": {j["id"]: j.get("classification") for j in jobs
                                 if j.get("classification")}}


def spool_path(spool: Spool, queue: Queue, state: State | None, job_id: str) -> Path:
    return (spool.dir(queue, state) if state is not None else spool.dir(queue)) / job_id


def _stream_name(data: Mapping[str, Any]) -> str | None:
    stream = data.get("stream")
    if isinstance(stream, dict):
        return str(stream.get("name")) if stream.get("name") else None
    return stream if isinstance(stream, str) else None


def _sqlite_pragmas(engine: sa.Engine) -> None:
    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")  # readers never wait for the shipper
        cur.execute("PRAGMA synchronous=NORMAL")  # the journal files are the durable copy
        cur.execute("PRAGMA busy_timeout=5000")
        cur.close()


# -- deriving ------------------------------------------------------------------------

@dataclass
class _Touched:
    studies: set[str] = field(default_factory=set)
    days: set[str] = field(default_factory=set)

    def add(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            if row.get("study_uid"):
                self.studies.add(str(row["study_uid"]))
            time = row.get("time")
            if isinstance(time, datetime):
                self.days.add(time.astimezone(UTC).strftime("%Y-%m-%d"))


def _details(row: Mapping[str, Any]) -> dict[str, Any]:
    details = row.get("details")
    if isinstance(details, str):
        try:
            details = json.loads(details)
        except ValueError:
            return {}
    return details if isinstance(details, dict) else {}


def _as_time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str) and value:
        try:
            return parse_isotime(value)
        except ValueError:
            return None
    return None


def _derive_exam(study: str, rows: Sequence[Any], old: dict[str, Any] | None,
                 shadow_streams: frozenset[str] = frozenset()) -> dict[str, Any] | None:
    if not rows:
        return None
    # shadow jobs (a shadow stream's, a shadow replay's) send nothing: the exam's status and
    # reason are its live jobs', unless it has only shadow jobs
    shadow: set[str] = set()
    reasons: dict[str, str] = {}
    jobs: dict[str, str] = {}           # job -> status, in order of appearance
    job_streams: dict[str, str | None] = {}
    parents: set[str] = set()
    streams: list[str] = []
    accession = calling = called = peer = None
    instances = series = 0
    received_at = delivered_at = None
    reason = None
    for row in rows:
        event, job, d = row["event"], row["job"], _details(row)
        if row["stage"] in ("web", "notify"):
            # what the page did (a timeline viewed, a rule test of a job), or a webhook
            # about it, is no work on the exam: it must not add a job nor change its status
            continue
        accession = row["accession"] or accession
        if job:
            jobs.setdefault(job, "classifying")
            job_streams.setdefault(job, row["stream"])
            if row["stream"]:
                job_streams[job] = row["stream"]
            if row["stream"] in shadow_streams or d.get("shadow") is True \
                    or event == "shadow-done":
                shadow.add(job)
        if event == "received":
            calling = d.get("calling_ae") or calling
            called = d.get("called_ae") or called
            peer = d.get("peer") or peer
            instances = int(d.get("instances") or instances or 0)
            if received_at is None:
                received_at = row["time"]
        if event == "matched" and row["stream"] and row["stream"] not in streams:
            streams.append(row["stream"])
        if event == "queued" and d.get("parent"):
            parents.add(str(d["parent"]))
        if event == "sent":
            delivered_at = row["time"]
        if job and event in _JOB_STATUS:
            jobs[job] = _JOB_STATUS[event]
        if job and event == "requeued":
            target = str(d.get("target") or "").split("/")[0]  # e.g. "run/new"
            jobs[job] = _REQUEUE_STATUS.get(target, jobs[job])
        if (row["status"] == "error" and event in ("failed", "send-failed")) \
                or event == "rejected":
            reason = row["message"]
            if job:
                reasons.pop(job, None)
                reasons[job] = row["message"]  # the last one of each job, in order
    for job, status in jobs.items():
        if status == "classified":
            parents.add(job)
    if not jobs:
        # only events without a job: every instance refused, or only page views; no
        # exam of this station (its refusals still show in the journal and on /log)
        return None
    leaves = {j: s for j, s in jobs.items() if j not in parents} or jobs
    live = {j: s for j, s in leaves.items() if j not in shadow}
    if live and live != leaves:
        leaves = live
        reason = next(reversed([r for j, r in reasons.items() if j in live]), None)
    status = min(leaves.values(), key=lambda s: _PRECEDENCE.index(s)
                 if s in _PRECEDENCE else len(_PRECEDENCE))
    if status not in STATUSES:
        status = "classifying"
    if status != "failed":
        reason = None
    old = old or {}
    identity = {k: old.get(k) for k in ("patient_id", "study_date", "received_at",
                                         "last_received_at")}
    row_out = {
        "study_uid": study, "accession": accession, "calling_ae": calling,
        "called_ae": called, "peer": peer, "received_at": _as_time(old.get("received_at"))
        or _as_time(received_at), "instances": instances, "series": series,
        "streams": streams, "stream_list": "," + ",".join(streams) + ",",
        "jobs": list(jobs), "status": status, "reason": reason,
        "delivered_at": _as_time(delivered_at) if status == "done" else None,
        "turnaround": None, "last_event_at": _as_time(rows[-1]["time"]),
    }
    return {"row": row_out, "job_streams": job_streams, **identity,
            "_received_event": _as_time(received_at)}


def _identity_row(exam: dict[str, Any]) -> dict[str, Any]:
    row = exam["row"]
    received = _as_time(exam.get("received_at")) or row["received_at"] \
        or exam.get("_received_event")
    last = _as_time(exam.get("last_received_at")) or exam.get("_received_event")
    delivered = row.get("delivered_at")
    turnaround = None
    if delivered is not None and last is not None:
        turnaround = max(0.0, (delivered - last).total_seconds())
    return {"patient_id": exam.get("patient_id"), "study_date": exam.get("study_date"),
            "received_at": received, "last_received_at": last, "turnaround": turnaround}


def _exam_out(row: Mapping[str, Any]) -> dict[str, Any]:
    def iso(value: Any) -> str | None:
        t = _as_time(value)
        return isotime(t.astimezone(UTC)) if t else None

    return {"study_uid": row["study_uid"], "accession": row["accession"],
            "patient_id": row["patient_id"], "study_date": row["study_date"],
            "received_at": iso(row["received_at"]), "calling_ae": row["calling_ae"],
            "called_ae": row["called_ae"], "peer": row["peer"],
            "instances": row["instances"], "streams": list(row["streams"] or []),
            "jobs": list(row["jobs"] or []), "status": row["status"],
            "reason": row["reason"], "delivered_at": iso(row["delivered_at"]),
            "turnaround_seconds": (round(float(row["turnaround"]), 3)
                                   if row["turnaround"] is not None else None)}


class _Metrics:
    """One day's metrics from its events: {(metric, labels): value}."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, str], float] = {}
        self._sending: dict[str, datetime] = {}  # job -> its send try's start

    def inc(self, metric: str, labels: str = "", by: float = 1.0) -> None:
        key = (metric, labels)
        self.values[key] = self.values.get(key, 0.0) + by

    def observe(self, metric: str, labels: str, value: float) -> None:
        for le in BUCKETS:
            if value <= le:
                self.inc(f"{metric}_bucket", _join(labels, f"le={_le(le)}"))
        self.inc(f"{metric}_count", labels)
        self.inc(f"{metric}_sum", labels, value)

    def add_event(self, row: Any) -> None:
        event, stage, status = row["event"], row["stage"], row["status"]
        d = _details(row)
        self.inc("events")
        if status == "error":
            self.inc("events", "status=error")
        self.inc("events_by", f"stage={stage},status={status}")
        if event == "received":
            self.inc("studies_received")
            self.inc("instances_received", by=float(d.get("instances") or 0))
        elif event == "instance-refused":
            self.inc("instances_refused", f"status={d.get('dimse_status') or '?'}")
        elif event == "association-refused":
            self.inc("associations_refused")
        elif event == "finished" and isinstance(d.get("duration"), (int, float)):
            self.observe("stage_duration_seconds", "stage=run", float(d["duration"]))
        elif event == "send-started" and row.get("job"):
            started = _as_time(row.get("time"))
            if started is not None:
                self._sending[row["job"]] = started
        elif event == "sent":
            self.inc("deliveries", "status=ok")
            started, sent = self._sending.pop(row.get("job") or "", None), \
                _as_time(row.get("time"))
            # the try that delivered (one that spans midnight is not counted)
            if started is not None and sent is not None:
                self.observe("stage_duration_seconds", "stage=send",
                             max(0.0, (sent - started).total_seconds()))
        elif event == "send-failed":
            self.inc("deliveries", "status=failed")
        if event in ("failed", "send-failed", "internal-error", "publish-failed"):
            self.inc("failures", f"stage={stage},event={event}")


def _le(value: float) -> str:
    return "+Inf" if math.isinf(value) else f"{value:g}"


def _join(a: str, b: str) -> str:
    return f"{a},{b}" if a else b


def _entries(events: list[dict[str, Any]], jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The timeline's entries in time order: one per association, classification, run,
    delivery and requeue (from job.json), and every other event."""
    out: list[dict[str, Any]] = []
    by_id = {j["id"]: j for j in jobs}
    # proof of delivery (docs/delivery.md): delivery entries as well
    proof = ("commit-requested", "committed", "commit-failed", "verified", "verify-missing")
    shown = {"received", "matched", "unmatched", "started", "finished", "sent", "stored",
             "send-failed", "requeued", "queued", *proof}
    for ev in events:
        kind = {"received": "association", "matched": "classification",
                "unmatched": "classification", "queued": "classification",
                "started": "run", "finished": "run", "sent": "delivery", "stored": "delivery",
                "send-failed": "delivery", "requeued": "requeue",
                **dict.fromkeys(proof, "delivery")}.get(str(ev.get("event")), "event")
        job = by_id.get(str(ev.get("job")), {})
        details: dict[str, Any] = {k: v for k, v in ev.items()
                                   if k not in ("time", "job", "stage", "event", "status",
                                                "message", "host", "pid")}
        if ev.get("event") == "received":
            details["sources"] = job.get("sources") or [
                {k: job.get(k) for k in ("calling_ae", "called_ae", "peer", "peer_port")}]
            details["series"] = len(job.get("series") or {})
        elif ev.get("event") in ("matched", "unmatched") and job.get("classification"):
            details["classification"] = job.get("classification")
        elif ev.get("event") == "finished" and job.get("run"):
            details["run"] = job.get("run")
        elif ev.get("event") in ("sent", "send-failed", *proof) and job.get("destinations"):
            details["destinations"] = job.get("destinations")
        out.append({"time": ev.get("time"), "stage": ev.get("stage"), "kind": kind
                    if ev.get("event") in shown else "event", "event": ev.get("event"),
                    "status": ev.get("status"), "job": ev.get("job"),
                    "title": ev.get("message"), "details": details})
    return out


def index_path(station: Station) -> Path:
    """Where the embedded index is kept."""
    return station.spool.root / INDEX_DIR / SQLITE_NAME


__all__ = ["BUCKETS", "ExamPage", "ExamQuery", "Index", "IndexUnavailable", "index_path"]
