"""Owns ``dts watch``: the whole station in one process.

One process runs the receiver and the classify, run and send stages. Each stage
is a worker thread (``[station] max_parallel_runs`` of them for run) that sleeps
until a watchdog observer sees something arrive in its queue's ``new/`` folder,
then claims and processes everything there. A periodic rescan
(``[station] rescan_seconds``; for send also the next ``next_attempt_at``) wakes
each worker anyway, so an event the observer missed never leaves work waiting.
Claims are the spool's: ``dts watch`` and stray ``dts classify --once`` runs on
the same spool never process a job twice.

At start it holds the service locks ``watch`` and ``receiver`` (one station per
spool) and moves back the jobs of dead workers (for run, stopping what they left
running). Beside the stages it runs retention (``[station] retention``, the
free-disk watermark ``clean_below_free_mb``) and the journal database shipper
(``[journal] url``), each in a thread.

Stopping (``stop`` set, e.g. on SIGTERM): the receiver stops accepting and lets
open associations finish; the stages take no new job; in-flight work may finish
within ``grace`` seconds, after which running containers/commands are stopped
and their jobs put back in ``run/new`` (the runner does that on cancel). Nothing
is half-done: whatever is still held when the process ends is released by the
kernel and recovered at the next start.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import worker
from .errors import UsageError
from .journal import Event, Stage, Status
from .spool import Claim, Job, Queue, State, parse_isotime
from .station import Station
from .status import ServiceLock, hold_service, queue_counts
from .worker import Outcome

log = logging.getLogger(__name__)

OnResult = Callable[[str, str, Outcome], None]  # stage, job id, outcome


@dataclass
class StageState:
    """What one stage is doing, for the status line."""

    name: str
    active: set[str] = field(default_factory=set)
    done: int = 0
    failed: int = 0
    retry: int = 0

    def count(self, outcome: Outcome) -> None:
        if outcome is Outcome.DONE:
            self.done += 1
        elif outcome is Outcome.FAILED:
            self.failed += 1
        elif outcome is Outcome.RETRY:
            self.retry += 1


class _Wake:
    """Watchdog handler: any change in a queue's new/ folder wakes its workers."""

    def __init__(self, events: list[threading.Event]) -> None:
        self.events = events

    def dispatch(self, event: Any) -> None:
        log.debug("watchdog: %s %s", getattr(event, "event_type", ""), getattr(event, "src_path", ""))
        if getattr(event, "event_type", "") in ("opened", "closed", "closed_no_write"):
            return
        for e in self.events:
            e.set()


def next_due(station: Station, now: float | None = None) -> float | None:
    """Seconds until the earliest ``next_attempt_at`` in send/new (0: something is due)."""
    now = time.time() if now is None else now
    earliest: float | None = None
    spool = station.spool
    for job_id in spool.list(Queue.SEND, State.NEW):
        try:
            due = Job(spool.dir(Queue.SEND, State.NEW) / job_id).read().get("next_attempt_at")
            t = parse_isotime(str(due)).timestamp() if due else now
        except Exception:
            t = now
        earliest = t if earliest is None else min(earliest, t)
    return None if earliest is None else max(0.0, earliest - now)


class Watch:
    """The station in one process. ``run(stop)`` blocks until ``stop`` is set."""

    def __init__(self, station: Station, *, host: str | None = None, port: int | None = None,
                 receive: bool = True, grace: float = 30.0,
                 on_result: OnResult | None = None,
                 on_event: Callable[[str], None] | None = None) -> None:
        self.station = station
        self.cfg = station.config.station
        self.host, self.port = host, port
        self.receive = receive
        self.grace = grace
        self.on_result = on_result
        self.on_event = on_event
        self.stages = {name: StageState(name) for name in ("classify", "run", "send")}
        self.wake = {name: threading.Event() for name in self.stages}
        self.run_wakes: list[threading.Event] = []
        self.stopping = threading.Event()   # stages take no new job
        self.cancel = threading.Event()     # running processing is stopped and put back
        self.helpers_stop = threading.Event()
        self.receiver: Any = None
        self.db_up: bool | None = None
        self.started_at = time.time()
        self._lock = threading.Lock()
        self._not_before: dict[str, float] = {}  # jobs paused after a temporary failure
        self._threads: list[threading.Thread] = []
        self._helpers: list[threading.Thread] = []
        self._locks: list[ServiceLock] = []

    # -- life cycle ---------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        try:
            self._start()
            stop.wait()
        finally:
            self._shutdown()

    def _say(self, message: str) -> None:
        log.info("%s", message)
        if self.on_event is not None:
            self.on_event(message)

    def _start(self) -> None:
        spool = self.station.spool
        details = {"host": self.host or self.cfg.host, "port": self.port if self.port is not None
                   else self.cfg.port, "ae_title": self.cfg.ae_title}
        lock = hold_service(spool, "watch", **details)
        if lock is None:
            raise UsageError(f"dts watch is already running on spool {spool.root}")
        self._locks.append(lock)
        if self.receive:
            rlock = hold_service(spool, "receiver", **details)
            if rlock is None:
                raise UsageError(f"a receiver (dts receive) is already running on spool "
                                 f"{spool.root}: stop it, or run dts watch --no-receive")
            self._locks.append(rlock)
        self.station.journal.emit(Stage.WATCH, Event.WATCH_STARTED, Status.INFO,
                                  f"dts watch started (pid {os.getpid()})",
                                  max_parallel_runs=self.cfg.max_parallel_runs)
        self._recover()
        if self.receive:
            from .receiver import Receiver

            self.receiver = Receiver(self.station, host=self.host, port=self.port)
            self.receiver.start()  # recovers incoming/ and half-published studies first
            self.port = self.receiver.port
            details["port"] = self.port
            for lk in self._locks:
                _rewrite(lk, details)
            self._say(f"receiving as {self.cfg.ae_title} on "
                      f"{self.receiver.host}:{self.receiver.port}")
        # The observer first: a job published before it watches is found by the workers'
        # first scan, one published after wakes them; none falls in between.
        self._start_observer()
        self._start_workers()
        self._start_helpers()

    def _recover(self) -> None:
        from . import runner

        for q in (Queue.CLASSIFY, Queue.SEND):
            for job_id in worker.recover(self.station, q):
                self._say(f"recovered {q}/{job_id}")
        def stop_orphans(job: Job) -> None:
            before = len(job.read().get("orphans_stopped") or [])
            runner.on_recovered(job)
            stopped = (job.read().get("orphans_stopped") or [])[before:]
            if stopped:
                self.station.journal.emit(Stage.RUN, Event.ORPHAN_STOPPED, Status.WARNING,
                                          f"stopped {', '.join(stopped)} left by a dts that "
                                          "died", job=job)
        for job_id in worker.recover(self.station, Queue.RUN, stop_orphans):
            self._say(f"recovered run/{job_id}")

    def _start_workers(self) -> None:
        from . import classifier, runner, sender

        run_process = functools.partial(runner.process, cancel=self.cancel)
        self._spawn("classify", Queue.CLASSIFY, classifier.process, None, self.wake["classify"])
        for i in range(max(1, self.cfg.max_parallel_runs)):
            ev = threading.Event()
            self.run_wakes.append(ev)
            self._spawn("run", Queue.RUN, run_process, None, ev, index=i)
        self._spawn("send", Queue.SEND, sender.process, sender.ready, self.wake["send"])

    def _spawn(self, name: str, queue: Queue, process: worker.Process,
               ready: Callable[[Job], bool] | None, wake: threading.Event,
               index: int = 0) -> None:
        t = threading.Thread(target=self._worker, args=(name, queue, process, ready, wake),
                             name=f"dts-{name}-{index}", daemon=True)
        self._threads.append(t)
        t.start()

    def _start_observer(self) -> None:
        from watchdog.observers import Observer

        spool = self.station.spool
        self.observer = Observer()
        targets = {Queue.CLASSIFY: [self.wake["classify"]], Queue.RUN: self.run_wakes,
                   Queue.SEND: [self.wake["send"]]}
        for q, events in targets.items():
            self.observer.schedule(_Wake(events), str(spool.dir(q, State.NEW)),  # type: ignore[arg-type]
                                   recursive=False)
        self.observer.daemon = True
        self.observer.start()

    def _start_helpers(self) -> None:
        if self.cfg.retention is not None or self.cfg.clean_below_free_mb > 0:
            self._helper("retention", self._retention_loop)
        if self.station.config.journal.url:
            self._helper("journaldb", self._ship_loop)

    def _helper(self, name: str, target: Callable[[], None]) -> None:
        t = threading.Thread(target=target, name=f"dts-{name}", daemon=True)
        self._helpers.append(t)
        t.start()

    # -- the stages ---------------------------------------------------------------------
    def _timeout(self, name: str) -> float:
        timeout = self.cfg.rescan_seconds
        if name == "send":
            due = next_due(self.station)
            if due is not None:
                timeout = min(timeout, due + 0.01)
        now = time.monotonic()
        with self._lock:
            for job_id in [j for j, t in self._not_before.items() if t <= now]:
                del self._not_before[job_id]  # paused long enough (or gone elsewhere)
            soonest = min(self._not_before.values(), default=None)
        if soonest is not None:  # wake when a paused job may be tried again
            timeout = min(timeout, max(0.05, soonest - now))
        return max(0.01, timeout)

    def _worker(self, name: str, queue: Queue, process: worker.Process,
                ready: Callable[[Job], bool] | None, wake: threading.Event) -> None:
        state = self.stages[name]
        busy_wait = 0.0
        while not self.stopping.is_set():
            wake.clear()
            busy = False
            try:
                busy = self._drain(state, queue, process, ready)
            except Exception:  # a bug must not silence a stage: log, pause, go on
                log.exception("%s worker: unexpected error", name)
                self.stopping.wait(1.0)
            if self.stopping.is_set():
                break
            timeout = self._timeout(name)
            if busy:
                # A job is there but its lock is held: typically its publisher between the
                # rename into new/ and releasing the lock, a moment later. Look again soon.
                busy_wait = min(timeout, max(0.02, busy_wait * 2))
                timeout = busy_wait
            else:
                busy_wait = 0.0
            wake.wait(timeout)

    def _drain(self, state: StageState, queue: Queue, process: worker.Process,
               ready: Callable[[Job], bool] | None) -> bool:
        """Process what can be claimed; True if some waiting job could not be (locked)."""
        seen: set[str] = set()
        spool = self.station.spool

        def take(job: Job) -> bool:
            if job.id in seen:
                return False  # each job once per round: a retried one waits for the next
            with self._lock:
                if self._not_before.get(job.id, 0.0) > time.monotonic():
                    return False
            return ready is None or ready(job)

        while not self.stopping.is_set():
            claim = spool.claim_next(queue, take)
            if claim is None:
                return any(take(Job(spool.dir(queue, State.NEW) / j))
                           for j in spool.list(queue, State.NEW))
            seen.add(claim.id)
            outcome = self._process(state, claim, process)
            with self._lock:
                if outcome is Outcome.RETRY and not self.cancel.is_set():
                    # Back in new/ for a temporary reason (engine down, rules unusable, an
                    # unexpected error): its own move back must not wake us into a tight
                    # loop. The sender's retries have their due time; this pause is shorter.
                    pause = min(600.0, self.cfg.rescan_seconds)
                    if queue is Queue.SEND:
                        pause = min(pause, self.cfg.send_backoff / 2)
                    self._not_before[claim.id] = time.monotonic() + pause
                else:
                    self._not_before.pop(claim.id, None)
        return False

    def _process(self, state: StageState, claim: Claim, process: worker.Process) -> Outcome:
        job_id = claim.id
        with self._lock:
            state.active.add(job_id)
        try:
            outcome = worker.run_one(self.station, claim, process)
        finally:
            with self._lock:
                state.active.discard(job_id)
        with self._lock:
            state.count(outcome)
        if self.on_result is not None:
            try:
                self.on_result(state.name, job_id, outcome)
            except Exception:
                log.exception("status output failed")
        return outcome

    # -- helpers ------------------------------------------------------------------------
    def _retention_loop(self) -> None:
        from .retention import clean, ensure_free_disk

        retention = self.cfg.retention
        watermark = self.cfg.clean_below_free_mb
        every = max(1.0, min(3600.0, (retention or 3600.0) / 4))
        last_clean: float | None = None
        while not self.helpers_stop.is_set():
            try:
                if watermark > 0:
                    rep = ensure_free_disk(self.station, watermark)
                    if rep.removed:
                        self._say(f"free disk below {watermark} MB: removed "
                                  f"{len(rep.removed)} oldest finished job(s)")
                if retention is not None and (last_clean is None or
                                              time.monotonic() - last_clean >= every):
                    last_clean = time.monotonic()
                    rep = clean(self.station, retention)
                    if rep.removed:
                        self._say(f"retention: removed {len(rep.removed)} finished job(s)")
            except Exception:
                log.exception("retention failed")
            self.helpers_stop.wait(min(every, self.cfg.rescan_seconds))

    def _ship_loop(self) -> None:
        from .journaldb import Shipper

        url = self.station.config.journal.url
        assert url
        try:
            shipper = Shipper(self.station.spool, url)
        except Exception as exc:
            self.station.journal.emit(Stage.WATCH, Event.JOURNAL_DB_UNUSABLE, Status.ERROR,
                                      f"journal database not used: {exc}")
            return

        def on_state(up: bool, message: str) -> None:
            before, self.db_up = self.db_up, up
            if up and before is None:
                return  # reachable from the start: nothing worth an event
            self.station.journal.emit(Stage.WATCH,
                                      Event.JOURNAL_DB_UP if up else Event.JOURNAL_DB_DOWN,
                                      Status.INFO if up else Status.WARNING,
                                      message + ("" if up else "; events wait in spool/log "
                                                 "and are delivered when it is back"))
        try:
            shipper.run(self.helpers_stop, interval=1.0, on_state=on_state)
        finally:
            shipper.close()

    # -- stopping -----------------------------------------------------------------------
    def _shutdown(self) -> None:
        if not self._locks:
            return  # never started
        self._say("stopping: no new work is taken, in-flight work finishes")
        if self.receiver is not None:
            try:
                self.receiver.stop(timeout=min(self.grace, self.cfg.network_timeout))
            except Exception:
                log.exception("stopping the receiver failed")
        self.stopping.set()
        for ev in [*self.wake.values(), *self.run_wakes]:
            ev.set()
        deadline = time.monotonic() + self.grace
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        busy = [t for t in self._threads if t.is_alive()]
        if busy:
            with self._lock:
                running = sorted(j for s in self.stages.values() for j in s.active)
            self._say(f"grace period of {self.grace:g}s over: stopping {', '.join(running)} "
                      "and putting the job(s) back")
            self.cancel.set()
            for t in busy:
                t.join(30.0)
        observer = getattr(self, "observer", None)
        if observer is not None:
            observer.stop()
            observer.join(5)
        parked = [t.name for t in self._threads if t.is_alive()]
        self.station.journal.emit(
            Stage.WATCH, Event.WATCH_STOPPED, Status.INFO if not parked else Status.WARNING,
            "dts watch stopped" + (f"; {', '.join(parked)} still busy: their jobs are "
                                   "recovered at the next start" if parked else ""))
        self.helpers_stop.set()
        for t in self._helpers:
            t.join(15.0)
        for lk in reversed(self._locks):
            lk.release()
        self._locks.clear()

    # -- status -------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            stages = {n: {"active": sorted(s.active), "done": s.done, "failed": s.failed,
                          "retry": s.retry} for n, s in self.stages.items()}
        return {
            "queues": queue_counts(self.station.spool),
            "stages": stages,
            "receiving": self.receiver.pending() if self.receiver is not None else [],
            "port": self.port,
            "journal_db": self.db_up,
            "uptime_seconds": round(time.time() - self.started_at),
        }


def _rewrite(lock: ServiceLock, details: dict[str, Any]) -> None:
    """Update a held service lock's JSON (the receiver's port is known after it starts)."""
    try:
        raw = os.pread(lock.fd, 65536, 0)
        info = json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        info = {}
    info.update(details)
    os.ftruncate(lock.fd, 0)
    os.pwrite(lock.fd, (json.dumps(info) + "\n").encode(), 0)
