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

from . import review
from .journal import EventFilter, read_events
from .slurm import cluster_jobs
from .spool import Queue, Spool, State, age_seconds, parse_isotime, utcnow

# the webhooks' outbox (dts.notify): spool/notify/<delivery>.json, given up in gave-up/
NOTIFY_DIR = "notify"
NOTIFY_CURSOR = "cursor.json"
NOTIFY_GAVE_UP = "gave-up"


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


def receiver_state(spool: Spool) -> dict[str, Any]:
    """The receiver service, with its worker processes (``dts.receivepool``) when it
    has them: ``workers`` lists each one's index, pid and whether it is alive."""
    state = service_state(spool, "receiver")
    if state.get("running") and isinstance(state.get("workers"), list):
        workers = []
        for path in sorted(spool.run_dir.glob("receiver-worker-*.pid")):
            index = path.stem.rsplit("-", 1)[1]
            if not index.isdigit():
                continue
            w = service_state(spool, path.stem)
            if w.get("running") and w.get("pid") in state["workers"]:
                workers.append({"index": int(index), "pid": w.get("pid"),
                                "listening": bool(w.get("listening"))})
        state["workers"] = sorted(workers, key=lambda w: w["index"])
    return state


def queue_counts(spool: Spool, now: float | None = None) -> dict[str, dict[str, Any]]:
    now = now if now is not None else time.time()
    out: dict[str, dict[str, Any]] = {}

    def oldest(ids: list[str]) -> float | None:
        ages = [a for a in (age_seconds(i, now) for i in ids) if a is not None]
        return round(max(ages), 1) if ages else None

    for q in Spool.WORK:
        new, cur = spool.list(q, State.NEW), spool.list(q, State.CUR)
        out[q.value] = {"new": len(new), "cur": len(cur), "oldest_seconds": oldest(new + cur)}
        if q is Queue.REVIEW and new + cur:  # how long a person has been waited for
            out[q.value]["oldest_seconds"] = review.oldest_waiting(spool, now)
        if q is Queue.RUN:  # run/slurm/: on the Slurm cluster (dts.slurm)
            on_cluster = spool.list(q, State.SLURM)
            out[q.value]["slurm"] = len(on_cluster)
            out[q.value]["oldest_seconds"] = oldest(new + cur + on_cluster)
    for q in Spool.FINAL:
        ids = spool.list(q)
        out[q.value] = {"count": len(ids), "oldest_seconds": oldest(ids)}
    try:
        studies = [p for p in spool.incoming.iterdir()
                   if p.is_dir() and not p.name.startswith(".")]
    except FileNotFoundError:
        studies = []
    out["incoming"] = {"studies": len(studies)}
    return out


def notify_state(spool: Spool) -> dict[str, Any]:
    """The webhooks' outbox: deliveries pending, the oldest's age, how many given up."""
    folder = spool.root / NOTIFY_DIR
    try:
        pending = [p for p in folder.iterdir() if p.suffix == ".json"
                   and p.name != NOTIFY_CURSOR and not p.name.startswith(".")]
    except FileNotFoundError:
        pending = []
    oldest: float | None = None
    for p in pending:
        try:
            created = json.loads(p.read_bytes()).get("created_at")
            age = (utcnow() - parse_isotime(str(created))).total_seconds()
        except (OSError, ValueError, TypeError, AttributeError):
            continue
        oldest = age if oldest is None else max(oldest, age)
    try:
        gave_up = sum(1 for p in (folder / NOTIFY_GAVE_UP).iterdir() if p.suffix == ".json")
    except FileNotFoundError:
        gave_up = 0
    return {"pending": len(pending),
            "oldest_seconds": round(oldest, 1) if oldest is not None else None,
            "gave_up": gave_up}


def station_status(spool: Spool) -> dict[str, Any]:
    since = utcnow() - timedelta(hours=24)
    failures = sum(1 for _ in read_events(spool, EventFilter(since=since, status=("error",))))
    return {
        "spool": str(spool.root),
        "queues": queue_counts(spool),
        "receiver": receiver_state(spool),
        "watch": service_state(spool, "watch"),
        "web": service_state(spool, "web"),
        "notify": notify_state(spool),
        "slurm": {"jobs": cluster_jobs(spool)},
        "errors_24h": failures,
        "free_mb": round(spool.free_mb()),
    }


def needs_attention(status: dict[str, Any], max_age: float,
                    review_alert_after: float | None = None) -> list[str]:
    """Reasons a person should look (``dts status --check``): failed jobs, a work queue
    whose oldest job is older than ``max_age``, results waiting in review/ longer than
    ``review_alert_after`` (``[station] review_alert_after``)."""
    reasons = []
    failed = status["queues"][Queue.FAILED.value]["count"]
    if failed:
        reasons.append(f"{failed} failed job(s) in failed/")
    for q in Spool.WORK:
        if q is Queue.REVIEW:
            continue  # waiting for a person is its purpose: its own limit below
        age = status["queues"][q.value]["oldest_seconds"]
        if age is not None and age > max_age:
            reasons.append(f"{q.value}: oldest job waits for {age:.0f}s (> {max_age:.0f}s)")
    waiting = status["queues"].get(Queue.REVIEW.value) or {}
    age = waiting.get("oldest_seconds")
    if review_alert_after is not None and age is not None and age > review_alert_after:
        reasons.append(f"review: results wait for a person for {age:.0f}s (> "
                       f"{review_alert_after:.0f}s, [station] review_alert_after): "
                       "dts review")
    hooks = status.get("notify") or {}
    if hooks.get("gave_up"):
        reasons.append(f"{hooks['gave_up']} webhook deliveries given up (spool/notify/gave-up/)")
    if hooks.get("oldest_seconds") is not None and hooks["oldest_seconds"] > max_age:
        reasons.append(f"webhooks: the oldest delivery waits for {hooks['oldest_seconds']:.0f}s "
                       f"(> {max_age:.0f}s)")
    return reasons
