"""Owns ``dts watch``: the whole station in one process.

One process runs the receiver and the classify, run and send stages. Each stage
is a ``worker.ClaimLoop`` (``[station] max_parallel_runs`` claimers for run) that sleeps
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
(``[journal] url``), each in a thread, and with ``[web] enabled`` the page: ``dts web``
as a child process of its own (so it never slows the receiver), restarted with backoff
when it dies and stopped by its PID at shutdown.

Stopping (``stop`` set, e.g. on SIGTERM): the receiver stops accepting and lets
open associations finish; the stages take no new job; in-flight work may finish
within ``grace`` seconds, after which running containers/commands are stopped
and their jobs put back in ``run/new`` (the runner does that on cancel). Nothing
is half-done: whatever is still held when the process ends is released by the
kernel and recovered at the next start.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import worker
from .errors import UsageError
from .journal import Event, Stage, Status
from .spool import Job, Queue, State, parse_isotime
from .station import Station
from .status import ServiceLock, hold_service, queue_counts, update_service
from .worker import Outcome

log = logging.getLogger(__name__)

OnResult = Callable[[str, str, Outcome], None]  # stage, job id, outcome


@dataclass
class StageState:
    """What one stage is doing, for the status line."""

    name: str
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

    def __init__(self, wake: Callable[[], None]) -> None:
        self.wake = wake

    def dispatch(self, event: Any) -> None:
        log.debug("watchdog: %s %s", getattr(event, "event_type", ""), getattr(event, "src_path", ""))
        if getattr(event, "event_type", "") in ("opened", "closed", "closed_no_write"):
            return
        self.wake()


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
                 receive: bool = True, grace: float = 30.0, web: bool | None = None,
                 on_result: OnResult | None = None,
                 on_event: Callable[[str], None] | None = None) -> None:
        self.station = station
        self.cfg = station.config.station
        self.host, self.port = host, port
        self.receive = receive
        self.web = station.config.web.enabled if web is None else web
        self.web_process: subprocess.Popen[bytes] | None = None
        self.grace = grace
        self.on_result = on_result
        self.on_event = on_event
        self.stages = {name: StageState(name) for name in ("classify", "run", "send")}
        self.stopping = threading.Event()   # stages take no new job
        self.cancel = threading.Event()     # running processing is stopped and put back
        self.helpers_stop = threading.Event()
        self.receiver: Any = None
        self.db_up: bool | None = None
        self.started_at = time.time()
        self._lock = threading.Lock()
        self.loops = self._claim_loops()
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
        if any(s.executor == "slurm" and s.enabled for s in self.station.config.streams):
            from . import slurm

            for warning in slurm.check_ready(self.station):  # UsageError: refused at start
                log.warning("%s", warning)
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
        self._recover()
        if self.receive:
            from .receivepool import make_receiver

            self.receiver = make_receiver(self.station, host=self.host, port=self.port)
            self.receiver.start()  # recovers incoming/ and half-published studies first
            self.port = self.receiver.port
            details["port"] = self.port
            for lk in self._locks:
                update_service(lk, details)
            if hasattr(self.receiver, "pids"):  # worker processes: dts status lists them
                rlock = self._locks[-1]  # the receiver's lock (not watch's)
                update_service(rlock, {"workers": self.receiver.pids()})
                self.receiver.on_change = lambda pids: update_service(rlock, {"workers": pids})
            self._say(f"receiving as {self.cfg.ae_title} on "
                      f"{self.receiver.host}:{self.receiver.port}")
        # The observer first: a job published before it watches is found by the workers'
        # first scan, one published after wakes them; none falls in between.
        self._start_observer()
        self._start_workers()
        self._start_helpers()
        # said once everything serves: the receiver listens (its workers too), stages run
        self.station.journal.emit(Stage.WATCH, Event.WATCH_STARTED, Status.INFO,
                                  f"dts watch started (pid {os.getpid()})",
                                  max_parallel_runs=self.cfg.max_parallel_runs)

    def _recover(self) -> None:
        from . import runner

        for q in (Queue.CLASSIFY, Queue.REVIEW, Queue.SEND):
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

    def _claim_loops(self) -> dict[str, worker.ClaimLoop]:
        from . import classifier, runner, sender

        # Back in new/ for a temporary reason (engine down, rules unusable, an unexpected
        # error): its own move back must not wake a stage into a tight loop. The sender's
        # retries have their due time; this pause is shorter.
        pause = min(600.0, self.cfg.rescan_seconds)

        def loop(name: str, queue: Queue, process: worker.Process, **kw: Any) -> worker.ClaimLoop:
            return worker.ClaimLoop(self.station, queue, process, stop=self.stopping,
                                    poll=self.cfg.rescan_seconds, keep_going=True,
                                    on_result=functools.partial(self._result, name),
                                    name=f"dts-{name}", **kw)
        return {
            "classify": loop("classify", Queue.CLASSIFY, classifier.process, pause=pause),
            "run": loop("run", Queue.RUN, functools.partial(runner.process, cancel=self.cancel),
                        claimers=self.cfg.max_parallel_runs, pause=pause,
                        ready=runner.ready_for(self.station)),
            "send": loop("send", Queue.SEND, sender.process, ready=sender.ready,
                         claimers=self.cfg.max_parallel_sends,
                         pause=min(pause, self.cfg.send_backoff / 2),
                         due=lambda: next_due(self.station)),
        }

    def _start_workers(self) -> None:
        for loop in self.loops.values():
            loop.start()

    def _start_observer(self) -> None:
        from watchdog.observers import Observer

        spool = self.station.spool
        self.observer = Observer()
        for loop in self.loops.values():
            self.observer.schedule(_Wake(loop.wake),  # type: ignore[arg-type]
                                   str(spool.dir(loop.queue, State.NEW)), recursive=False)
        # a storage commitment answer the receiver kept makes its waiting job due
        self.observer.schedule(_Wake(self.loops["send"].wake),  # type: ignore[arg-type]
                               str(spool.commitment), recursive=False)
        self.observer.daemon = True
        self.observer.start()

    def _start_helpers(self) -> None:
        if self.cfg.retention is not None or self.cfg.clean_below_free_mb > 0:
            self._helper("retention", self._retention_loop)
        if self.station.config.journal.url:
            self._helper("journaldb", self._ship_loop)
        if self.station.config.notify:
            self._helper("notify", self._notify_loop)
        if self.web:
            self._helper("web", self._web_loop)
        from . import slurm

        if slurm.follow_jobs(self.station):
            self._helper("slurm", self._slurm_loop)

    def _helper(self, name: str, target: Callable[[], None]) -> None:
        t = threading.Thread(target=target, name=f"dts-{name}", daemon=True)
        self._helpers.append(t)
        t.start()

    # -- the stages ---------------------------------------------------------------------
    def _result(self, name: str, job_id: str, outcome: Outcome) -> None:
        with self._lock:
            self.stages[name].count(outcome)
        if self.on_result is not None:
            self.on_result(name, job_id, outcome)

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

    def _notify_loop(self) -> None:
        from .notify import Notifier

        Notifier(self.station).run(self.helpers_stop, interval=1.0)

    def _slurm_loop(self) -> None:
        """Follow the jobs on the Slurm cluster (run/slurm/) and collect those that ended;
        the cluster jobs themselves go on when dts watch stops."""
        from . import runner, slurm

        follower = slurm.Follower(self.station, functools.partial(runner.collect, self.station),
                                  on_result=functools.partial(self._result, "run"),
                                  wake=self.loops["run"].wake)
        follower.serve(self.helpers_stop)

    def _web_command(self) -> list[str]:
        cfg = self.station.config
        return [sys.executable, "-m", "dts", "--config", str(cfg.path), "--spool",
                str(self.station.spool.root), "web"]

    def _web_loop(self) -> None:
        """Run ``dts web`` as a child process (the page never shares the receiver's
        process), restart it with backoff when it dies, stop it by its PID at shutdown.
        A refusal to start (exit 2: a configuration or usage error) is not retried."""
        cfg = self.station.config.web
        backoff = 1.0
        while not self.helpers_stop.is_set():
            started = time.monotonic()
            try:
                # a session of its own: a Ctrl-C on the terminal reaches dts watch only,
                # which stops the page by its PID once the stages are parked
                proc = subprocess.Popen(self._web_command(), stdin=subprocess.DEVNULL,
                                        start_new_session=True)
            except OSError as exc:
                log.error("cannot start dts web: %s", exc)
                code: int | None = None
            else:
                self.web_process = proc
                self._say(f"page: dts web (pid {proc.pid}) on "
                          f"{'https' if cfg.tls else 'http'}://{cfg.host}:{cfg.port}/")
                while proc.poll() is None and not self.helpers_stop.wait(0.5):
                    pass
                if proc.poll() is None:  # shutting down
                    _stop_child(proc)
                    return
                code = proc.returncode
            if time.monotonic() - started > 60:
                backoff = 1.0  # it ran a while: a new failure starts the backoff again
            refused = code == 2
            self.station.journal.emit(
                Stage.WATCH, Event.WEB_EXITED, Status.ERROR,
                f"dts web exited with status {code}" + (
                    ": it refused to start (see its message); not restarted" if refused
                    else f"; restarting in {backoff:g}s"), exit_code=code)
            if refused:
                return
            if self.helpers_stop.wait(backoff):
                return
            backoff = min(backoff * 2, 60.0)

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
        self.stopping.set()  # wakes the idle claimers too
        deadline = time.monotonic() + self.grace
        busy = [n for loop in self.loops.values()
                for n in loop.join(max(0.0, deadline - time.monotonic()))]
        if busy:
            running = sorted(j for loop in self.loops.values() for j in loop.active())
            self._say(f"grace period of {self.grace:g}s over: stopping {', '.join(running)} "
                      "and putting the job(s) back")
            self.cancel.set()
            for loop in self.loops.values():
                loop.join(30.0)
        observer = getattr(self, "observer", None)
        if observer is not None:
            observer.stop()
            observer.join(5)
        parked = [n for loop in self.loops.values() for n in loop.join(0.0)]
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
            stages = {n: {"active": self.loops[n].active(), "done": s.done, "failed": s.failed,
                          "retry": s.retry} for n, s in self.stages.items()}
        return {
            "queues": queue_counts(self.station.spool),
            "stages": stages,
            "receiving": self.receiver.pending() if self.receiver is not None else [],
            "port": self.port,
            "journal_db": self.db_up,
            "uptime_seconds": round(time.time() - self.started_at),
        }


def _stop_child(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM to the child by its PID, SIGKILL after ``timeout``."""
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    except OSError:
        pass
