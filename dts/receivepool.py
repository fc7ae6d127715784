"""The receiver on every core: ``[station] receive_workers`` processes on one port.

One process (``dts receive``, or ``dts watch``) holds the ``receiver`` service lock and
the listening socket, and supervises the workers: each is a ``dts receive --worker
K/N@PID:FD`` child process (``ps`` shows them) running a ``receiver.Receiver`` that serves
the connections this process hands it. The supervisor accepts every connection and sends
it at once (the socket itself, SCM_RIGHTS, over a Unix socket pair, the worker's FD) to
the worker with the fewest open connections (each worker says when it serves and when a
connection of its ended), so that four associations are two per worker, never four on
one of them as the kernel's hash of SO_REUSEPORT listeners left it now and then. While no
worker serves (all restarting) nothing is accepted: the kernel's backlog keeps the
connections. What must hold station-wide is decided in the spool, where the kernel keeps
it honest when a worker dies (``dts.carriers``): ``max_associations`` (slot locks in
``tmp/.run/associations/``), and "no open association carries the study, quiet for
stable_seconds" (the study's gate ``tmp/.run/carry/<Study>``, held shared by every
carrying association, taken alone by the publisher, its mtime the last activity: the same
gate ``dts web`` uses for STOW-RS); a study is published by exactly one worker.
Allow-lists, the disk watermark, TLS and every refusal status are each worker's,
unchanged. The pending budget (``max_pending_connections``, ``max_pending_per_host``) is
split evenly among workers.

A worker that dies is restarted (journal: ``receive-worker-exited``), after a pause
when it keeps dying; the connections it had end with it, and new ones go to the others.
A worker dies with its supervisor (it asks the kernel for SIGKILL when its parent ends,
PR_SET_PDEATHSIG, and also looks itself; it is told its supervisor's pid and does not
start without it). ``stop()`` stops accepting, sends SIGTERM to every worker (each lets
its open associations finish, publishes what is stable) and SIGKILL to those still
running at the deadline. ``receive_workers = 1`` is the one-process receiver without any
of this.
"""

from __future__ import annotations

import ctypes
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .dicom.uid import valid_uid
from .errors import TemporaryFailure
from .journal import Event, Stage, Status
from .station import Station
from .status import service_state

LOGGER = logging.getLogger(__name__)
READY_TIMEOUT = 60.0  # a worker must listen within this long after it was started
PR_SET_PDEATHSIG = 1


def worker_count(station: Station) -> int:
    """``[station] receive_workers``, 0 meaning one per core."""
    n = station.config.station.receive_workers
    return n if n > 0 else (os.cpu_count() or 1)


def make_receiver(station: Station, *, host: str | None = None,
                  port: int | None = None) -> Any:
    """The station's receiver: a ``Receiver`` in this process, or a ``ReceiverPool``."""
    workers = worker_count(station)
    if workers <= 1:
        from .receiver import Receiver

        return Receiver(station, host=host, port=port)
    return ReceiverPool(station, host=host, port=port, workers=workers)


def die_with_parent(supervisor: int) -> bool:
    """In a worker: be killed when the supervisor (its parent, ``supervisor`` by the pid it
    was given) ends. False when it is gone already: before the request was made, the
    kernel could not know (the worker then compares ``os.getppid()`` now and then)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    return os.getppid() == supervisor


# What a worker says on its channel: it serves (connections may come), a connection
# of its ended. The supervisor sends one byte with each connection's descriptor.
SERVING = b"+"
ENDED = b"-"
HANDED = b"c"


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    pause: float = 1.0
    restarts: int = 0
    exits: list[int] = field(default_factory=list)
    channel: socket.socket | None = None  # the supervisor's end of the worker's socket pair
    serving: bool = False  # said SERVING on this channel: connections can be handed
    load: int = 0  # connections handed and not ended
    restart_at: float | None = None  # when a dead worker is started again


class ReceiverPool:
    """``workers`` receiver processes on one port (see the module docstring)."""

    def __init__(self, station: Station, *, host: str | None = None,
                 port: int | None = None, workers: int = 2) -> None:
        self.station = station
        self.cfg = station.config.station
        self.host = host if host is not None else self.cfg.host
        self.port = port if port is not None else self.cfg.port
        self.workers = [_Worker(i) for i in range(workers)]
        self._sock: socket.socket | None = None
        self._stopping = threading.Event()
        # The thread that starts workers must outlive them: PR_SET_PDEATHSIG fires when
        # it ends. So the supervisor ends only after every worker stopped (``_done``).
        self._done = threading.Event()
        self._lock = threading.RLock()
        self._supervisor: threading.Thread | None = None
        self._listening = False  # the port is bound at once, listened on once workers serve
        self._dropped = 0  # connections no worker took, since the last warning
        self._dropped_said = -10.0
        self._next = 0  # where the search for the least busy worker starts (ties rotate)
        self.on_change: Any = None  # called with the worker pids when they change

    # -- life cycle -----------------------------------------------------------
    def start(self) -> None:
        """Take the port, start every worker and return once all of them serve."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))  # held: listening once the workers serve
        except OSError as exc:
            sock.close()
            raise TemporaryFailure(f"cannot listen on {self.host}:{self.port}: "
                                   f"{exc.strerror or exc}") from None
        sock.setblocking(False)
        self._sock = sock
        self.port = int(sock.getsockname()[1])
        started = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, args=(started,),
                                            name="dts-receive-pool", daemon=True)
        self._supervisor.start()
        started.wait(30)
        deadline = time.monotonic() + READY_TIMEOUT
        for w in self.workers:
            self._wait_ready(w, deadline)
        try:
            sock.listen(socket.SOMAXCONN)
            self._listening = True
        except OSError as exc:
            self._kill_all()
            raise TemporaryFailure(f"cannot listen on {self.host}:{self.port}: "
                                   f"{exc.strerror or exc}") from None
        self.station.journal.emit(
            Stage.RECEIVE, Event.RECEIVER_STARTED, Status.INFO,
            f"listening on {self.host}:{self.port} as {self.cfg.ae_title} "
            f"({len(self.workers)} workers)",
            port=self.port, ae_title=self.cfg.ae_title, workers=self.pids(), best_effort=True)

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting; SIGTERM to every worker; SIGKILL to those still running after
        ``timeout`` (default: network_timeout) plus 5 seconds for their last
        publications."""
        if self._sock is None:
            return
        self._stopping.set()
        with self._lock:  # no restart from now on
            procs = [w.proc for w in self.workers if w.proc is not None]
        for proc in procs:
            try:
                proc.send_signal(signal.SIGTERM)
            except OSError:
                pass
        deadline = time.monotonic() + (timeout if timeout is not None
                                       else self.cfg.network_timeout) + 5.0
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                LOGGER.warning("receive worker %d did not stop in time: killed", proc.pid)
                proc.kill()
                proc.wait(10)
        self._done.set()
        if self._supervisor is not None:
            self._supervisor.join(10)
        self._close_channels()
        self._sock.close()
        self._sock = None
        self.station.journal.emit(Stage.RECEIVE, Event.RECEIVER_STOPPED, Status.INFO,
                                  "receiver stopped", port=self.port, best_effort=True)

    # -- the workers ------------------------------------------------------------
    def _argv(self, w: _Worker, fd: int) -> list[str]:
        station = self.station
        return [sys.executable, "-m", "dts", "--config", str(station.config.path),
                "--spool", str(station.spool.root), "receive", "--host", self.host,
                "--port", str(self.port),
                "--worker", f"{w.index}/{len(self.workers)}@{os.getpid()}:{fd}"]

    def _spawn(self, w: _Worker) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("DTS_CONFIG", "DTS_SPOOL")}
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            w.proc = subprocess.Popen(self._argv(w, theirs.fileno()), env=env,
                                      stdin=subprocess.DEVNULL, close_fds=True,
                                      pass_fds=(theirs.fileno(),))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        with self._lock:
            old, w.channel = w.channel, ours
            w.serving, w.load, w.restart_at = False, 0, None
        if old is not None:
            old.close()
        w.started = time.monotonic()

    def _wait_ready(self, w: _Worker, deadline: float) -> None:
        name = f"receiver-worker-{w.index}"
        while True:
            if w.proc is None:
                self._kill_all()
                raise TemporaryFailure(f"receive worker {w.index} could not be started")
            state = service_state(self.station.spool, name)
            if state.get("running") and state.get("pid") == w.proc.pid and \
                    state.get("listening"):
                return
            code = w.proc.poll()
            if code is not None or not self._supervisor_alive():
                self._kill_all()
                raise TemporaryFailure(f"receive worker {w.index} exited with {code} before "
                                       f"it listened on {self.host}:{self.port}")
            if time.monotonic() > deadline:
                self._kill_all()
                raise TemporaryFailure(f"receive worker {w.index} did not listen within "
                                       f"{READY_TIMEOUT:g} s")
            time.sleep(0.05)

    def _supervisor_alive(self) -> bool:
        return self._supervisor is not None and self._supervisor.is_alive()

    def _kill_all(self) -> None:
        self._stopping.set()
        self._done.set()
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait(10)
        self._close_channels()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _close_channels(self) -> None:
        with self._lock:
            channels = [w.channel for w in self.workers if w.channel is not None]
            for w in self.workers:
                w.channel, w.serving = None, False
        for channel in channels:
            channel.close()

    def _supervise(self, started: threading.Event) -> None:
        """The pool's one thread (it starts every worker, so it outlives them): hands
        each accepted connection to a worker, hears from the workers, restarts a dead one
        after its pause."""
        try:
            for w in self.workers:
                self._spawn(w)
        finally:
            started.set()
        selector = selectors.DefaultSelector()
        watched: dict[int, socket.socket] = {}  # fd -> what the selector has
        try:
            while not self._done.is_set():
                self._watch(selector, watched)
                for key, _ in selector.select(0.2):
                    if key.data is None:
                        self._dispatch()
                    else:
                        self._hear(key.data, key.fileobj)  # type: ignore[arg-type]
                self._look_after_workers()
        finally:
            selector.close()

    def _watch(self, selector: selectors.BaseSelector, watched: dict[int, socket.socket]) -> None:
        """Have the selector watch every worker's channel, and the listening socket while
        some worker serves and the pool is not stopping."""
        wanted: dict[int, tuple[socket.socket, _Worker | None]] = {}
        with self._lock:
            for w in self.workers:
                if w.channel is not None:
                    wanted[w.channel.fileno()] = (w.channel, w)
            if self._sock is not None and self._listening and not self._stopping.is_set() and \
                    any(w.serving for w in self.workers):
                wanted[self._sock.fileno()] = (self._sock, None)
        for fd in [fd for fd, sock in watched.items()
                   if fd not in wanted or wanted[fd][0] is not sock]:
            try:
                selector.unregister(watched.pop(fd))
            except (KeyError, ValueError):
                pass
        for fd, (sock, owner) in wanted.items():
            if fd not in watched:
                selector.register(sock, selectors.EVENT_READ, owner)
                watched[fd] = sock

    def _dispatch(self) -> None:
        """Accept what is waiting and hand each connection to the least busy worker."""
        for _ in range(64):  # then the workers' messages get their turn
            listening = self._sock
            if listening is None:
                return
            try:
                conn, _ = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors: the backlog keeps the rest
                LOGGER.warning("cannot accept a connection: %s", exc)
                time.sleep(0.05)
                return
            try:
                if not self._hand(conn):
                    self._dropped += 1
                    now = time.monotonic()
                    if now - self._dropped_said >= 10:  # a flood must not flood the log
                        LOGGER.warning("no receive worker took %d connection(s) (all busy "
                                       "or restarting): closed", self._dropped)
                        self._dropped, self._dropped_said = 0, now
            finally:
                conn.close()  # the worker has its own descriptor of it

    def _hand(self, conn: socket.socket) -> bool:
        with self._lock:
            n = len(self.workers)
            order = sorted((w for w in self.workers if w.serving and w.channel is not None),
                           key=lambda w: (w.load, (w.index - self._next) % n))
            self._next = (self._next + 1) % n
        for w in order:
            channel = w.channel
            if channel is None:
                continue
            try:
                socket.send_fds(channel, [HANDED], [conn.fileno()])
            except OSError:  # gone, or not reading (its buffer full): the next one
                continue
            with self._lock:
                if w.channel is channel:
                    w.load += 1
            return True
        return False

    def _hear(self, w: _Worker, channel: socket.socket) -> None:
        """What a worker said: it serves, a connection of its ended, or (end of file) it
        is gone."""
        while True:
            try:
                data = channel.recv(64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            with self._lock:
                if w.channel is not channel:
                    return
                if not data:  # the worker is gone: the selector forgets its channel
                    w.channel, w.serving = None, False
                    channel.close()
                    return
                if data == SERVING:
                    w.serving = True
                else:
                    w.load = max(0, w.load - data.count(ENDED))

    def _look_after_workers(self) -> None:
        """Journal a worker that ended and start it again once its pause is over."""
        now = time.monotonic()
        for w in self.workers:
            if w.proc is None or self._stopping.is_set():
                continue
            if w.restart_at is not None:
                if now < w.restart_at:
                    continue
                w.restarts += 1
                try:
                    with self._lock:
                        if self._stopping.is_set():
                            continue
                        self._spawn(w)
                except OSError:
                    LOGGER.exception("cannot restart receive worker %d", w.index)
                    w.restart_at = now + w.pause
                    continue
                if self.on_change is not None:
                    self.on_change(self.pids())
                continue
            code = w.proc.poll()
            if code is None:
                continue
            lived = now - w.started
            w.pause = 1.0 if lived > 30 else min(30.0, w.pause * 2)
            with self._lock:
                w.serving = False
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            self.station.journal.emit(
                Stage.RECEIVE, Event.RECEIVE_WORKER_EXITED, Status.ERROR,
                f"receive worker {w.index} (pid {w.proc.pid}) ended with {how}; "
                f"restarted in {w.pause:g} s", worker=w.index, pid=w.proc.pid,
                exit_code=code, best_effort=True)
            w.restart_at = now + w.pause

    # -- what it is doing ---------------------------------------------------------
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers if w.proc is not None]

    def pending(self) -> list[str]:
        """Study UIDs in incoming/ (not yet published), whichever worker has them."""
        try:
            return sorted(e.name for e in os.scandir(self.station.spool.incoming)
                          if e.is_dir() and valid_uid(e.name))
        except FileNotFoundError:
            return []
