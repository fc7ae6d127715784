"""Owns the spool: the Maildir-style queue folders every stage hands work through.

Protocol (README "The spool", docs/architecture.md): everything is written under
``tmp/`` first and published with one ``rename()`` into ``<queue>/new/``; a worker
claims a job by taking an exclusive ``flock`` on ``<job>/.lock`` and renaming it into
``<queue>/cur/``; it keeps the lock while it works and finishes with one more rename. A
worker that dies leaves its job in ``cur/`` with the lock released by the kernel:
``recover()`` takes such locks and moves the jobs back to ``new/``. Nothing else in dts
moves or deletes job folders.

What job.json holds is ``dts.jobrecord``'s: ``Job.read()`` returns a ``JobRecord`` and
``Job.write()`` takes one (re-exported here), so every reader and writer is type-checked.
"""

from __future__ import annotations

import builtins
import errno
import fcntl
import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterator, Unpack, cast

from .errors import SpoolError, UsageError
from .jobrecord import JobRecord

LOCK_NAME = ".lock"
JOB_FILE = "job.json"
EVENTS_FILE = "events.jsonl"


class Queue(str, Enum):
    CLASSIFY = "classify"
    RUN = "run"
    REVIEW = "review"  # validated results of a review stream, waiting for a person
    SEND = "send"
    DONE = "done"
    FAILED = "failed"
    UNMATCHED = "unmatched"

    @property
    def is_work(self) -> bool:
        """Work queues have new/ and cur/; the others are final resting places."""
        return self in (Queue.CLASSIFY, Queue.RUN, Queue.REVIEW, Queue.SEND)

    def __str__(self) -> str:
        return self.value


class State(str, Enum):
    NEW = "new"
    CUR = "cur"
    # run/slurm/: handed to the Slurm cluster (or about to be) and followed there by
    # whichever dts run holds no lock on it; job.json ``slurm`` says which cluster job
    # (dts.slurm). Only the run queue has it.
    SLURM = "slurm"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Location:
    """Where a job is: a queue and, for work queues, new or cur."""

    queue: Queue
    state: State | None = None

    def __str__(self) -> str:
        return f"{self.queue}/{self.state}" if self.state else str(self.queue)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def isotime(t: datetime | None = None) -> str:
    """ISO-8601 UTC with microseconds and a ``Z``: sorts as text, parses with fromisoformat."""
    return (t or utcnow()).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_isotime(text: str) -> datetime:
    t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def new_job_id(now: datetime | None = None) -> str:
    """``20261126T105700.123456Z-3f9a1c2e``: sorts by arrival, unique across hosts."""
    return f"{(now or utcnow()).strftime('%Y%m%dT%H%M%S.%fZ')}-{secrets.token_hex(4)}"


def valid_job_id(text: str) -> bool:
    return bool(text) and "/" not in text and "\0" not in text and text not in (".", "..") \
        and not text.startswith(".")


def fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_durably(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` through a temporary name beside it, fsync, rename;
    the file has ``mode`` from its first byte on (0600 for a secret)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(3)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask took away
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.rename(tmp, path)


def dump_json(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=False, default=str) + "\n").encode()


class Job:
    """A job folder: job.json, events.jsonl, input/, output/, logs/.

    Reading is always allowed; writing only by whoever holds the job's claim (or
    while the job is still under tmp/ and so unpublished).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def job_file(self) -> Path:
        return self.path / JOB_FILE

    @property
    def events_file(self) -> Path:
        return self.path / EVENTS_FILE

    @property
    def input_dir(self) -> Path:
        return self.path / "input"

    @property
    def output_dir(self) -> Path:
        return self.path / "output"

    @property
    def logs_dir(self) -> Path:
        return self.path / "logs"

    def read(self) -> JobRecord:
        """job.json as it is on disk, unknown keys included (they go back out on write)."""
        try:
            with open(self.job_file, "rb") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            return {"id": self.id}
        except (ValueError, OSError) as exc:
            raise SpoolError(f"{self.job_file}: unreadable job.json: {exc}") from None
        if not isinstance(data, dict):
            raise SpoolError(f"{self.job_file}: job.json is not a JSON object")
        # Not checked key by key: a key of a newer dts must survive, not fail the job.
        return cast(JobRecord, data)

    def write(self, data: JobRecord) -> None:
        data = data.copy()
        data["id"] = self.id
        data["updated_at"] = isotime()
        write_file_durably(self.job_file, dump_json(data))

    def update(self, **changes: Unpack[JobRecord]) -> JobRecord:
        data = self.read()
        data.update(changes)
        self.write(data)
        return data

    def events(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        try:
            with open(self.events_file, encoding="utf-8") as fh:
                for line in fh:
                    line = line.strip()
                    if line:
                        try:
                            out.append(json.loads(line))
                        except ValueError:
                            continue  # a line cut by a crash mid-write; the rest still counts
        except FileNotFoundError:
            pass
        return out


class Claim:
    """An exclusive hold on a job folder (flock on ``<job>/.lock``) while it is worked on.

    Use as a context manager. Finish with ``move(...)``; leaving the block without
    a decision puts the job back where a new worker will find it (``new/``).
    """

    def __init__(self, spool: "Spool", path: Path, fd: int, home: Location) -> None:
        self.spool = spool
        self.job = Job(path)
        self._fd: int | None = fd
        self.home = home  # where the job goes back to when released without a decision

    @property
    def id(self) -> str:
        return self.job.id

    @property
    def path(self) -> Path:
        return self.job.path

    @property
    def held(self) -> bool:
        return self._fd is not None

    def move(self, queue: Queue, state: State | None = None, *, new_id: str | None = None) -> Path:
        """Rename the job into ``queue`` (``new/`` for work queues) and release the claim."""
        if self._fd is None:
            raise RuntimeError(f"claim on {self.id} is no longer held")
        if queue.is_work and state is None:
            state = State.NEW
        dest_dir = self.spool.dir(queue, state)
        dest = dest_dir / (new_id or self.id)
        self.spool._rename_job(self.path, dest)
        self.job = Job(dest)
        self.release()
        return dest

    def move_keep(self, queue: Queue, state: State | None = None) -> Path:
        """Rename the job but keep holding the claim (e.g. from unmatched/ into classify/cur/)."""
        if self._fd is None:
            raise RuntimeError(f"claim on {self.id} is no longer held")
        dest = self.spool.dir(queue, state) / self.id
        self.spool._rename_job(self.path, dest)
        self.job = Job(dest)
        return dest

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is None:
            return
        # Undecided: hand the job back so that it is neither lost nor stuck in cur/.
        if self.path.parent != self.spool.dir(self.home.queue, self.home.state):
            try:
                self.move(self.home.queue, self.home.state)
                return
            except OSError:
                pass
        self.release()


def _lock(path: Path) -> int | None:
    """Open and flock ``<job>/.lock`` without blocking; None if someone else holds it."""
    try:
        fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except FileNotFoundError:
        return None  # the job folder moved away under us
    except NotADirectoryError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    # The folder may have been moved on by its previous holder between our open() and
    # flock(): the lock is only ours if the file is still where we looked for it.
    try:
        same = os.stat(path / LOCK_NAME).st_ino == os.fstat(fd).st_ino
    except OSError:
        same = False
    if not same:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        return None
    return fd


class Spool:
    """The spool folder of one station."""

    WORK = (Queue.CLASSIFY, Queue.RUN, Queue.REVIEW, Queue.SEND)
    FINAL = (Queue.DONE, Queue.FAILED, Queue.UNMATCHED)

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()

    # -- layout ------------------------------------------------------------
    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def incoming(self) -> Path:
        return self.root / "incoming"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def produced(self) -> Path:
        """Registry of SOP Instance UIDs this station produced (``dts.provenance``)."""
        return self.root / "produced"

    @property
    def commitment(self) -> Path:
        """Storage commitment transactions and their answers (``dts.commitment``)."""
        return self.root / "commitment"

    @property
    def priors(self) -> Path:
        """Prior studies retrieved for run jobs by C-MOVE, and what is expected
        (``dts.priors``): ``priors/expect/<StudyInstanceUID>/<job>.json``,
        ``priors/<job>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``."""
        return self.root / "priors"

    @property
    def run_dir(self) -> Path:
        """Process state (pid files of running services)."""
        return self.root / "tmp" / ".run"

    def dir(self, queue: Queue, state: State | None = None) -> Path:
        if queue.is_work:
            return self.root / queue.value / (state or State.NEW).value
        return self.root / queue.value

    def all_dirs(self) -> list[Path]:
        dirs = [self.tmp, self.incoming, self.log_dir, self.produced, self.commitment,
                self.priors]
        for q in self.WORK:
            dirs += [self.dir(q, State.NEW), self.dir(q, State.CUR)]
        dirs.append(self.dir(Queue.RUN, State.SLURM))
        dirs += [self.dir(q) for q in self.FINAL]
        return dirs

    def ensure(self) -> "Spool":
        """Create the layout if missing and check that it is usable (one filesystem)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for d in self.all_dirs():
                d.mkdir(parents=True, exist_ok=True)
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"cannot create spool folders under {self.root}: "
                             f"{exc.strerror or exc}") from None
        dev = self.root.stat().st_dev
        for d in self.all_dirs():
            if d.stat().st_dev != dev:
                raise SpoolError(
                    f"{d} is on another filesystem than {self.root}: every spool folder must "
                    "be on one filesystem, because jobs move between them by rename()")
        if not os.access(self.root, os.W_OK):
            raise SpoolError(f"spool {self.root} is not writable")
        return self

    # -- creating and publishing --------------------------------------------
    def create_tmp_job(self, job_id: str | None = None) -> Job:
        """An exclusive new job folder under tmp/ (mkdir is atomic), with its lock file."""
        for _ in range(100):
            jid = job_id or new_job_id()
            path = self.tmp / jid
            try:
                path.mkdir()
            except FileExistsError:
                if job_id:
                    raise
                continue
            (path / LOCK_NAME).touch()
            return Job(path)
        raise SpoolError("could not create a unique job id")  # pragma: no cover

    def publish(self, job: Job, queue: Queue) -> Path:
        """Make a finished tmp/ job visible: fsync it, rename into ``queue``'s new/."""
        _fsync_tree(job.path)
        dest = self.dir(queue, State.NEW if queue.is_work else None) / job.id
        self._rename_job(job.path, dest)
        job.path = dest
        return dest

    def _rename_job(self, src: Path, dest: Path) -> None:
        if dest.exists():
            raise SpoolError(f"cannot move {src.name} to {dest.parent}: a job of that id is "
                             "already there")
        os.rename(src, dest)
        fsync_dir(dest.parent)
        if src.parent != dest.parent:
            fsync_dir(src.parent)

    # -- listing and finding ---------------------------------------------------
    def list(self, queue: Queue, state: State | None = None) -> "builtins.list[str]":
        """Job ids in a queue folder, oldest first (ids sort by arrival time)."""
        try:
            names = os.listdir(self.dir(queue, state))
        except FileNotFoundError:
            return []
        return sorted(n for n in names if valid_job_id(n))

    def locations(self) -> Iterator[Location]:
        for q in self.WORK:
            yield Location(q, State.NEW)
            yield Location(q, State.CUR)
            if q is Queue.RUN:
                yield Location(q, State.SLURM)
        for q in self.FINAL:
            yield Location(q)

    def find(self, job_id: str) -> tuple[Location, Path]:
        """Where job ``job_id`` is now; UsageError if nowhere."""
        if not valid_job_id(job_id):
            raise UsageError(f"not a job id: {job_id!r}")
        for loc in self.locations():
            p = self.dir(loc.queue, loc.state) / job_id
            if p.is_dir():
                return loc, p
        raise UsageError(f"no job {job_id} in spool {self.root}")

    def locate(self, job_id: str) -> tuple[Location, Path] | None:
        try:
            return self.find(job_id)
        except UsageError:
            return None

    # -- claiming ---------------------------------------------------------------
    def claim(self, job_id: str, queue: Queue) -> Claim | None:
        """Claim one job from ``queue/new``; None if it is gone or someone else has it."""
        src = self.dir(queue, State.NEW) / job_id
        fd = _lock(src)
        if fd is None:
            return None
        try:
            if not src.is_dir():
                raise FileNotFoundError
            dest = self.dir(queue, State.CUR) / job_id
            os.rename(src, dest)
        except OSError as exc:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            if isinstance(exc, FileNotFoundError) or exc.errno in (errno.ENOENT, errno.ENOTEMPTY,
                                                                   errno.EEXIST):
                return None
            raise
        return Claim(self, dest, fd, Location(queue, State.NEW))

    def claim_at(self, job_id: str) -> Claim | None:
        """Claim a job wherever it rests (new/ of a work queue, run/slurm/ or a final
        queue) without moving it; for manual commands (requeue, re-classify) and the Slurm
        follower. None if busy in cur/ (or locked in run/slurm/ by a follower)."""
        loc, path = self.find(job_id)
        if loc.state is State.CUR:
            fd = _lock(path)
            if fd is None:
                return None
            return Claim(self, path, fd, Location(loc.queue, State.NEW))
        fd = _lock(path)
        if fd is None:
            return None
        if not path.is_dir():  # moved between find() and the lock
            os.close(fd)
            return None
        return Claim(self, path, fd, loc)

    def hold(self, job_id: str, queue: Queue, state: State) -> Claim | None:
        """Lock a job where it is (``queue/state``) without moving it; None if it is not
        there (any more) or someone else holds it. Releasing it leaves it there."""
        path = self.dir(queue, state) / job_id
        fd = _lock(path)
        if fd is None:
            return None
        if not path.is_dir():
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            return None
        return Claim(self, path, fd, Location(queue, state))

    def claim_next(self, queue: Queue,
                   ready: Callable[[Job], bool] | None = None) -> Claim | None:
        """The oldest claimable job of ``queue`` that ``ready`` accepts, claimed; or None."""
        for job_id in self.list(queue, State.NEW):
            if ready is not None and not ready(Job(self.dir(queue, State.NEW) / job_id)):
                continue
            claim = self.claim(job_id, queue)
            if claim is not None:
                return claim
        return None

    def recover(self, queue: Queue,
                on_recovered: Callable[[Job], None] | None = None) -> "builtins.list[str]":
        """Move back to new/ every cur/ job whose worker is gone (its lock is free).

        The attempt is counted in job.json; ``on_recovered`` runs under the lock
        before the job is released (e.g. to stop an orphaned container).
        """
        recovered: list[str] = []
        for job_id in self.list(queue, State.CUR):
            path = self.dir(queue, State.CUR) / job_id
            fd = _lock(path)
            if fd is None:
                continue
            claim = Claim(self, path, fd, Location(queue, State.NEW))
            try:
                data = claim.job.read()
                data["attempts"] = int(data.get("attempts") or 0) + 1
                data["recovered_at"] = isotime()
                claim.job.write(data)
                if on_recovered is not None:
                    on_recovered(claim.job)
                claim.move(queue, State.NEW)
                recovered.append(job_id)
            finally:
                claim.release()
        return recovered

    # -- space ---------------------------------------------------------------
    def free_mb(self) -> float:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize / (1024 * 1024)

    def remove_job(self, claim: Claim) -> None:
        """Delete a claimed job folder for good (retention); renamed away first so that a
        crash halfway never leaves a half-deleted job in a queue."""
        trash = self.tmp / f".trash-{claim.id}-{secrets.token_hex(3)}"
        os.rename(claim.path, trash)
        claim.release()
        shutil.rmtree(trash, ignore_errors=True)


def _fsync_tree(path: Path) -> None:
    """fsync every directory of a job tree (files are fsynced by their writers)."""
    for dirpath, _dirnames, _files in os.walk(path):
        fsync_dir(Path(dirpath))


def age_seconds(job_id: str, now: float | None = None) -> float | None:
    """Age of a job from the time in its id (None for ids that carry no time)."""
    try:
        t = datetime.strptime(job_id[:23], "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=timezone.utc)
    except ValueError:
        return None
    return max(0.0, (now if now is not None else time.time()) - t.timestamp())
