"""Owns retention: removing finished jobs and stale scratch so the disk never fills.

A job's age counts from its *last activity*: the newest modification time of its
``job.json``, ``events.jsonl`` and folder (every stage writes one of these when it
moves the job on, and so does ``dts requeue``). A study that arrived last month but
was reprocessed yesterday is one day old. Jobs are removed only under a claim
(``Spool.claim_at``), so nothing a worker holds is ever touched; removal renames
the folder into ``tmp/`` first (``Spool.remove_job``), so a crash never leaves half
a job in a queue.

``tmp/`` entries (instances and jobs being written, trash of an interrupted clean)
older than ``TMP_AGE`` are removed too, unless their lock is held; the service
state folder ``tmp/.run`` and a study the receiver was publishing when it stopped
(``.receiving`` marker: acknowledged data it finishes at its next start) are never
touched.

``produced/`` entries (the feedback-loop guard, one small file per result sent) go
once their job is no longer in the spool and they are older than both the job age
asked for and ``PRODUCED_AGE`` (30 days): a result forwarded back to the station
within a month is still recognised as its own, and the registry does not grow forever.

Below the free-disk watermark (``[station] clean_below_free_mb``) the oldest
finished jobs of ``done/`` and ``unmatched/`` go first, whatever their age, until
the disk is above it again; ``failed/`` is left for a person to look at. Both say
what they did in the journal (stage ``clean``).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .expectations import sweep
from .journal import Event, Stage, Status
from .spool import EVENTS_FILE, JOB_FILE, LOCK_NAME, Job, Queue, Spool, State
from .station import Station

DEFAULT_QUEUES = (Queue.DONE, Queue.UNMATCHED)
TMP_AGE = 86400.0
PRODUCED_AGE = 30 * 86400.0
_KEEP_IN_TMP = (".run",)
RECEIVING_MARKER = ".receiving"  # dts.receiver.MARKER (not imported: pynetdicom is heavy)


@dataclass
class Removed:
    job: str
    queue: str
    age_seconds: float
    bytes: int

    def as_dict(self) -> dict[str, Any]:
        return {"job": self.job, "queue": self.queue, "age_seconds": round(self.age_seconds),
                "bytes": self.bytes}


@dataclass
class CleanReport:
    dry_run: bool = False
    removed: list[Removed] = field(default_factory=list)
    tmp_removed: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)  # old enough, but claimed by a worker
    produced_removed: list[str] = field(default_factory=list)  # SOP Instance UIDs
    priors_removed: list[str] = field(default_factory=list)  # under priors/ (dts.priors)
    free_mb_before: float | None = None
    free_mb_after: float | None = None

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.removed)

    def as_dict(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "removed": [r.as_dict() for r in self.removed],
                "tmp_removed": self.tmp_removed, "busy": self.busy, "bytes": self.bytes,
                "produced_removed": len(self.produced_removed),
                "priors_removed": self.priors_removed,
                "free_mb_before": _round(self.free_mb_before),
                "free_mb_after": _round(self.free_mb_after)}


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


def last_activity(path: Path) -> float:
    """The newest mtime of the job folder, its job.json and its events.jsonl."""
    newest = 0.0
    for p in (path, path / JOB_FILE, path / EVENTS_FILE):
        try:
            newest = max(newest, p.stat().st_mtime)
        except OSError:
            continue
    return newest


def tree_bytes(path: Path) -> int:
    """Bytes a job holds (hard links counted once per job: an upper bound is enough)."""
    total = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            if key not in seen:
                seen.add(key)
                total += st.st_blocks * 512
    return total


def finished_jobs(spool: Spool, queues: Iterable[Queue],
                  now: float | None = None) -> list[tuple[float, Queue, str]]:
    """``(age, queue, job)`` of every job in ``queues``, oldest first."""
    now = time.time() if now is None else now
    out = []
    for q in queues:
        for job_id in spool.list(q):
            out.append((max(0.0, now - last_activity(spool.dir(q) / job_id)), q, job_id))
    out.sort(key=lambda t: (-t[0], t[2]))
    return out


def _remove(station: Station, queue: Queue, job_id: str, age: float, dry_run: bool,
            report: CleanReport, reason: str) -> bool:
    spool = station.spool
    path = spool.dir(queue) / job_id
    try:
        claim = spool.claim_at(job_id)
    except Exception:  # gone meanwhile (another clean, a requeue)
        return False
    if claim is None:
        report.busy.append(job_id)
        return False
    try:
        if claim.path != path:  # requeued into another queue meanwhile: not ours to judge
            return False
        data = Job(path).read()
        size = tree_bytes(path)
        if not dry_run:
            spool.remove_job(claim)
            station.journal.emit(
                Stage.CLEAN, Event.REMOVED, Status.INFO,
                f"removed {job_id} from {queue}/ ({reason}, last activity "
                f"{age / 86400:.1f} days ago, {size / 1e6:.1f} MB)",
                job=Job(path), job_data=data,  # the folder is gone: station log only
                queue=queue.value, bytes=size)
        report.removed.append(Removed(job_id, queue.value, age, size))
        return True
    finally:
        claim.release()


def clean(station: Station, older_than: float, *, queues: Iterable[Queue] = DEFAULT_QUEUES,
          dry_run: bool = False, tmp_age: float = TMP_AGE,
          now: float | None = None) -> CleanReport:
    """``dts clean --older-than``: remove finished jobs older than ``older_than`` seconds
    from ``queues``, and stale ``tmp/`` entries."""
    now = time.time() if now is None else now
    report = CleanReport(dry_run=dry_run)
    for age, q, job_id in finished_jobs(station.spool, queues, now):
        if age >= older_than:
            _remove(station, q, job_id, age, dry_run, report, f"older than {older_than:.0f}s")
    report.tmp_removed = clean_tmp(station.spool, tmp_age, dry_run=dry_run, now=now)
    report.produced_removed = clean_produced(station.spool, max(older_than, PRODUCED_AGE),
                                             dry_run=dry_run, now=now)
    # stale expectations, and priors retrieved for a run that died before it took them
    report.priors_removed = sweep(station.spool, dry_run=dry_run,
                                  active=set(station.spool.list(Queue.RUN, State.CUR)))
    if report.removed and not dry_run:
        station.journal.emit(Stage.CLEAN, Event.CLEANED, Status.INFO,
                             f"removed {len(report.removed)} finished job(s), "
                             f"{report.bytes / 1e6:.1f} MB", removed=len(report.removed),
                             bytes=report.bytes)
    return report


def clean_tmp(spool: Spool, max_age: float, *, dry_run: bool = False,
              now: float | None = None) -> list[str]:
    """Remove ``tmp/`` entries untouched for ``max_age`` seconds whose lock is free."""
    now = time.time() if now is None else now
    removed = []
    try:
        names = sorted(os.listdir(spool.tmp))
    except FileNotFoundError:
        return []
    for name in names:
        if name in _KEEP_IN_TMP:
            continue
        path = spool.tmp / name
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue
        newest = st.st_mtime
        if path.is_dir() and not path.is_symlink():
            newest = max(newest, last_activity(path))
        if now - newest < max_age:
            continue
        if not _unlocked(path):
            continue
        if (path / RECEIVING_MARKER).exists():
            continue  # acknowledged instances mid-publication: the receiver finishes it
        removed.append(name)
        if dry_run:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed


def clean_produced(spool: Spool, max_age: float, *, dry_run: bool = False,
                   now: float | None = None) -> list[str]:
    """Remove ``produced/`` entries older than ``max_age`` seconds whose job is gone."""
    now = time.time() if now is None else now
    try:
        entries = list(os.scandir(spool.produced))
    except FileNotFoundError:
        return []
    jobs: set[str] = set()
    for loc in spool.locations():
        jobs.update(spool.list(loc.queue, loc.state))
    removed = []
    for entry in sorted(entries, key=lambda e: e.name):
        try:
            if not entry.is_file(follow_symlinks=False) or \
                    now - entry.stat(follow_symlinks=False).st_mtime < max_age:
                continue
            with open(entry.path, "rb") as fh:
                job_id = fh.read(256).decode("ascii", "replace").strip()
        except OSError:
            continue
        if job_id in jobs:
            continue
        removed.append(entry.name)
        if not dry_run:
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass
    return removed


def _unlocked(path: Path) -> bool:
    """True if nobody holds the flock of this tmp/ entry (a job's .lock or the file)."""
    target = path / LOCK_NAME if path.is_dir() else path
    try:
        fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def ensure_free_disk(station: Station, min_free_mb: float, *,
                     free_mb: Callable[[], float] | None = None,
                     dry_run: bool = False) -> CleanReport:
    """Below ``min_free_mb`` free: remove the oldest finished jobs of done/ and unmatched/
    until above it again (``free_mb`` measures; the spool's filesystem by default)."""
    measure = free_mb or station.spool.free_mb
    report = CleanReport(dry_run=dry_run)
    report.free_mb_before = report.free_mb_after = measure()
    if min_free_mb <= 0 or report.free_mb_before >= min_free_mb:
        return report
    for age, q, job_id in finished_jobs(station.spool, DEFAULT_QUEUES):
        if report.free_mb_after >= min_free_mb:
            break
        _remove(station, q, job_id, age, dry_run, report,
                f"free disk below {min_free_mb:.0f} MB")
        report.free_mb_after = measure()
    enough = report.free_mb_after >= min_free_mb
    if not dry_run:
        station.journal.emit(
            Stage.CLEAN, Event.DISK_LOW, Status.WARNING if enough else Status.ERROR,
            f"free disk {report.free_mb_before:.0f} MB was below {min_free_mb:.0f} MB: removed "
            f"the {len(report.removed)} oldest finished job(s) ({report.bytes / 1e6:.1f} MB); "
            f"now {report.free_mb_after:.0f} MB free"
            + ("" if enough else "; still below: failed/ and the queues are left for a person"),
            removed=len(report.removed), bytes=report.bytes,
            free_mb_before=round(report.free_mb_before), free_mb_after=round(report.free_mb_after))
    return report
