"""Which processes carry which study in ``incoming/``: the receiver workers' shared state.

With ``[station] receive_workers`` above 1 the associations of one study may be served by
different processes, so "no open association carries it" and "quiet for stable_seconds"
cannot be answered from one process's memory. They are answered from files the kernel
keeps honest, in ``tmp/.run/carriers/`` (beside the service locks):

``<Study>.c.<pid>.<n>``
    a carrier: one per association and study, created when the association's first
    instance of the study arrives and held with an exclusive ``flock`` until the association
    closes (then removed). A process killed with kill -9 loses its locks with it, so its
    carriers stop counting at once: a study is never kept open for ever by the dead.
``<Study>.last``
    its modification time is when the last association carrying the study closed (the
    start of the quiet time another process has to see).
``<Study>.p``
    the publication lock: a process takes it exclusive (non-blocking) to publish the
    study, a process that starts carrying the study takes it shared for that moment. So a
    carrier is either created before a publisher looks (and the study waits for it) or
    after the folder was renamed away (and its instances make a new study folder, as a
    late instance always has): a study is never published while another process is
    receiving it, and exactly one process publishes it.

A lock file is only unlinked by the process holding it exclusively; a process that
waited on a lock file that was unlinked meanwhile opens it again (its inode changed).
"""

from __future__ import annotations

import fcntl
import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

@dataclass
class Carrier:
    """One association carrying one study (held until ``release``)."""

    path: str
    fd: int


class PublishLock:
    """Held while one process publishes a study (see ``StudyCarriers.try_publish``)."""

    def __init__(self, owner: "StudyCarriers", study_uid: str, fd: int) -> None:
        self.owner, self.study_uid, self.fd = owner, study_uid, fd

    def release(self, *, published: bool) -> None:
        """Let go; after a publication the study's files here go too (under the lock, so
        nobody starts carrying the old study meanwhile)."""
        try:
            if published:
                self.owner.forget(self.study_uid)
        finally:
            _close(self.fd)


class StudyCarriers:
    """The carriers of every study, in ``folder`` (one instance per process)."""

    def __init__(self, folder: Path) -> None:
        self.dir = str(folder)
        os.makedirs(self.dir, exist_ok=True)
        self._counter = itertools.count()

    def _path(self, study_uid: str, suffix: str) -> str:
        return os.path.join(self.dir, f"{study_uid}.{suffix}")

    def _locked(self, study_uid: str, mode: int) -> int | None:
        """The study's publication lock, taken in ``mode`` (None: LOCK_NB and taken)."""
        path = self._path(study_uid, "p")
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, mode)
            except BlockingIOError:
                os.close(fd)
                return None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)  # unlinked while we waited: the next one is the live one

    def carry(self, study_uid: str, prepare: Callable[[], None]) -> Carrier:
        """Start carrying ``study_uid``: ``prepare()`` (which makes sure the study's folder
        exists) runs while no process can be publishing the study."""
        fd = self._locked(study_uid, fcntl.LOCK_SH)
        assert fd is not None
        try:
            prepare()
            path = self._path(study_uid, f"c.{os.getpid()}.{next(self._counter)}")
            cfd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            fcntl.flock(cfd, fcntl.LOCK_EX)
            return Carrier(path, cfd)
        finally:
            _close(fd)

    def release(self, study_uid: str, carrier: Carrier) -> None:
        """The association closed: the quiet time starts now for every process."""
        stamp = self._path(study_uid, "last")
        try:
            with open(stamp, "ab"):
                pass
            os.utime(stamp)
        except OSError:
            pass
        try:
            os.unlink(carrier.path)
        except FileNotFoundError:
            pass
        _close(carrier.fd)

    def last_closed(self, study_uid: str) -> float | None:
        """When an association carrying the study last closed (wall clock), if ever."""
        try:
            return os.stat(self._path(study_uid, "last")).st_mtime
        except FileNotFoundError:
            return None

    def carried_elsewhere(self, study_uid: str) -> bool:
        """Some live process holds a carrier of the study (stale ones are removed)."""
        prefix = f"{study_uid}.c."
        busy = False
        for name in os.listdir(self.dir):
            if not name.startswith(prefix):
                continue
            path = os.path.join(self.dir, name)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                busy = True
                os.close(fd)
                continue
            try:  # nobody holds it: its process died (or is just removing it)
                os.unlink(path)
            except FileNotFoundError:
                pass
            _close(fd)
        return busy

    def try_publish(self, study_uid: str, stable_seconds: float) -> PublishLock | None:
        """The study's publication lock if this process may publish it now: nobody else
        is publishing it, no live process carries it, and the last association that did
        closed at least ``stable_seconds`` ago. None otherwise."""
        fd = self._locked(study_uid, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if fd is None:
            return None
        try:
            if self.carried_elsewhere(study_uid):
                _close(fd)
                return None
            last = self.last_closed(study_uid)
            if last is not None and time.time() - last < stable_seconds:
                _close(fd)
                return None
        except BaseException:
            _close(fd)
            raise
        return PublishLock(self, study_uid, fd)

    def forget(self, study_uid: str) -> None:
        """Remove a published study's stamp, stale carriers and publication lock (the
        caller holds that lock exclusively)."""
        self.carried_elsewhere(study_uid)
        for suffix in ("last", "p"):
            try:
                os.unlink(self._path(study_uid, suffix))
            except FileNotFoundError:
                pass


def _close(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError:
        pass
    os.close(fd)


class AssociationSlots:
    """``max_associations`` station-wide: one lock file per slot in ``folder``; an
    association holds one while it is open (the kernel frees it when its process dies)."""

    def __init__(self, folder: Path, count: int) -> None:
        self.dir = str(folder)
        self.count = count
        os.makedirs(self.dir, exist_ok=True)
        self._start = itertools.count(os.getpid() % max(1, count))

    def take(self) -> int | None:
        """A held slot's descriptor, or None when every slot is taken."""
        first = next(self._start) % self.count
        for i in range(self.count):
            path = os.path.join(self.dir, f"{(first + i) % self.count}.slot")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return fd
        return None

    @staticmethod
    def give_back(fd: int) -> None:
        _close(fd)
