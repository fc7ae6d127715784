"""Owns who carries a study in ``incoming/`` across processes: the study's gate.

Two processes write into ``incoming/<Study>/``: the receiver (C-STORE) and ``dts web``
(STOW-RS). Either may publish a study, so each must know whether the other still
carries it. The gate is one file per study, ``tmp/.run/carry/<StudyInstanceUID>``:

- a **carrier** (an association that carries the study, a STOW-RS request moving parts
  into it) holds a shared ``flock`` on it for as long as it writes, and touches the
  file's modification time when it starts and when it ends: that time is the study's
  last activity, whoever wrote;
- a **publisher** takes an exclusive ``flock`` without waiting: when it cannot, someone
  carries the study and it is not published now; when it can, nobody can start carrying
  it until the publisher lets go, so the check and the rename of ``incoming/<Study>``
  are one step. After publishing it removes the gate while still holding it.

The kernel drops a killed process's locks, so a carrier killed with ``kill -9`` never
holds a study back. A lock taken on a gate that a publisher removed meanwhile is
noticed (the path names another inode, or none) and taken again on the new file.
``lslocks`` (or ``fuser tmp/.run/carry/*``) shows who carries what.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from .spool import Spool

CARRY_DIR = "carry"  # in tmp/.run/, with the services' locks


def gate_path(spool: Spool, study_uid: str) -> Path:
    return spool.run_dir / CARRY_DIR / study_uid


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


def _current(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


class Carrier:
    """A shared hold on a study's gate (see the module)."""

    def __init__(self, fd: int, study_uid: str) -> None:
        self.fd, self.study_uid = fd, study_uid

    def release(self) -> None:
        if self.fd < 0:
            return
        fd, self.fd = self.fd, -1
        try:
            os.utime(fd)  # the study's last activity
        except OSError:
            pass
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def carry(spool: Spool, study_uid: str) -> Carrier:
    """Start carrying ``study_uid`` (waits while a publisher holds it: a rename)."""
    path = gate_path(spool, study_uid)
    while True:
        fd = _open(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            if _current(fd, path):
                os.utime(fd)
                return Carrier(fd, study_uid)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


class Gate:
    """An exclusive hold on a study's gate: nobody carries it while this is held."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd, self.path = fd, path

    def quiet_seconds(self) -> float:
        """Seconds since a carrier last started or ended."""
        return time.time() - os.fstat(self.fd).st_mtime

    def release(self, *, remove: bool = False) -> None:
        if self.fd < 0:
            return
        fd, self.fd = self.fd, -1
        try:
            if remove:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def try_exclusive(spool: Spool, study_uid: str) -> Gate | None:
    """Hold ``study_uid``'s gate alone, or None when someone carries it."""
    path = gate_path(spool, study_uid)
    while True:
        try:  # a gate made by a publisher says nothing about activity: mtime 0
            fd, made = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                               0o644), True
        except FileExistsError:
            fd, made = _open(path), False
        except FileNotFoundError:
            fd, made = _open(path), True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        if _current(fd, path):
            if made:
                os.utime(fd, (0, 0))
            return Gate(fd, path)
        os.close(fd)


class AssociationSlots:
    """``max_associations`` station-wide, for the receiver's worker processes
    (``dts.receivepool``): one lock file per slot in ``folder``; an association holds one
    while it is open, and the kernel frees it when its process dies."""

    def __init__(self, folder: Path, count: int) -> None:
        self.dir = folder
        self.count = count
        folder.mkdir(parents=True, exist_ok=True)
        self._next = os.getpid() % max(1, count)

    def take(self) -> int | None:
        """A held slot's descriptor, or None when every slot is taken."""
        first, self._next = self._next, (self._next + 1) % self.count
        for i in range(self.count):
            fd = _open(self.dir / f"{(first + i) % self.count}.slot")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return fd
        return None

    @staticmethod
    def give_back(fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
