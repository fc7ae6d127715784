"""Owns "what is the station doing": queue counts and ages, live services.

A long-running service (the receiver, ``dts watch``) holds an exclusive flock on
``spool/tmp/.run/<name>.pid`` for as long as it lives; the file holds its pid and
details as JSON. A lock that can be taken means the service is not running,
whatever the file says: a killed process cannot leave a stale "running".
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from .journal import EventFilter, read_events
from .slurm import cluster_jobs
from .spool import Queue, Spool, State, age_seconds, utcnow


@dataclass
class ServiceLock:
    """Held by a running service; released by the kernel when it dies."""

    fd: int
    path: str

    def release(self) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
        except OSError:
            pass


def hold_service(spool: Spool, name: str, **details: Any) -> ServiceLock | None:
    """Take the service lock ``name``; None when another live process holds it."""
    spool.run_dir.mkdir(parents=True, exist_ok=True)
    path = spool.run_dir / f"{name}.pid"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    info = {"pid": os.getpid(), "started_at": utcnow().isoformat(), **details}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    return ServiceLock(fd, str(path))


def update_service(lock: ServiceLock, details: dict[str, Any]) -> None:
    """Add ``details`` to a held service lock's JSON (a port known only after binding)."""
    try:
        raw = os.pread(lock.fd, 65536, 0)
        info = json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        info = {}
    info.update(details)
    os.ftruncate(lock.fd, 0)
    os.pwrite(lock.fd, (json.dumps(info) + "\n").encode(), 0)


def service_state(spool: Spool, name: str) -> dict[str, Any]:
    path = spool.run_dir / f"{name}.pid"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return {"running": False}
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            running = False
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
            running = True
        raw = os.pread(fd, 65536, 0)
    finally:
        os.close(fd)
    try:
        info = json.loads(raw) if raw.strip() else {}
    except ValueError:
        info = {}
    if not running:
        return {"running": False, "last_pid": info.get("pid")}
    return {"running": True, **info}


def queue_counts(spool: Spool, now: float | None = None) -> dict[str, dict[str, Any]]:
    now = now if now is not None else time.time()
    out: dict[str, dict[str, Any]] = {}

    def oldest(ids: list[str]) -> float | None:
        ages = [a for a in (age_seconds(i, now) for i in ids) if a is not None]
        return round(max(ages), 1) if ages else None

    for q in Spool.WORK:
        new, cur = spool.list(q, State.NEW), spool.list(q, State.CUR)
        out[q.value] = {"new": len(new), "cur": len(cur), "oldest_seconds": oldest(new + cur)}
        if q is Queue.RUN:  # run/slurm/: on the Slurm cluster (dts.slurm)
            on_cluster = spool.list(q, State.SLURM)
            out[q.value]["slurm"] = len(on_cluster)
            out[q.value]["oldest_seconds"] = oldest(new + cur + on_cluster)
    for q in Spool.FINAL:
        ids = spool.list(q)
        out[q.value] = {"count": len(ids), "oldest_seconds": oldest(ids)}
    try:
        studies = [p for p in spool.incoming.iterdir() if p.is_dir()]
    except FileNotFoundError:
        studies = []
    out["incoming"] = {"studies": len(studies)}
    return out


def station_status(spool: Spool) -> dict[str, Any]:
    since = utcnow() - timedelta(hours=24)
    failures = sum(1 for _ in read_events(spool, EventFilter(since=since, status=("error",))))
    return {
        "spool": str(spool.root),
        "queues": queue_counts(spool),
        "receiver": service_state(spool, "receiver"),
        "watch": service_state(spool, "watch"),
        "web": service_state(spool, "web"),
        "slurm": {"jobs": cluster_jobs(spool)},
        "errors_24h": failures,
        "free_mb": round(spool.free_mb()),
    }


def needs_attention(status: dict[str, Any], max_age: float) -> list[str]:
    """Reasons a person should look (``dts status --check``)."""
    reasons = []
    failed = status["queues"][Queue.FAILED.value]["count"]
    if failed:
        reasons.append(f"{failed} failed job(s) in failed/")
    for q in Spool.WORK:
        age = status["queues"][q.value]["oldest_seconds"]
        if age is not None and age > max_age:
            reasons.append(f"{q.value}: oldest job waits for {age:.0f}s (> {max_age:.0f}s)")
    return reasons
