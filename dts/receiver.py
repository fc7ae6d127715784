"""Owns ``dts receive``: the DICOM C-STORE/C-ECHO service and ``incoming/``.

Each instance arrives as a file under ``tmp/`` (pynetdicom writes the fragments
there as they come, see ``dts.dicom.patches.set_receive_directory``), is fsynced, and is
renamed to ``incoming/<Study>/<Series>/<SOP>.dcm``; only then is success
answered. The study's connection metadata is written once, durably, to
``incoming/<Study>/.study.json`` before its first instance is acknowledged.

A study is published when no instance arrived for ``stable_seconds`` and no
open association carried it. Publishing is a chain of renames that a restart
completes wherever a crash cut it:

1. ``tmp/<job>/`` is created with a ``.receiving`` marker naming the study;
2. ``incoming/<Study>`` is renamed to ``tmp/<job>/input`` (the files move, no copy);
3. ``job.json`` and the ``received`` event are written;
4. ``tmp/<job>`` is renamed into ``classify/new/``.

``recover()`` (run by ``start()``) finishes every marked job in ``tmp/`` from the
step it reached, then adopts the studies left in ``incoming/``.

``dts web`` receives by STOW-RS into the same ``incoming/`` from another process, so
whoever publishes goes through the study's gate (``dts.carriers``): every association
that carries a study holds it shared until it closes, a publisher takes it alone or
leaves the study for later. The chain itself (``publish_study``,
``finish_publication``, ``recover_publications``) is shared with ``dts.stow``.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import logging
import os
import shutil
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pynetdicom import evt

from . import carriers, commitment, expectations, receivepool
from .carriers import AssociationSlots
from .dicom import ae as dicom_ae
from .dicom import patches, scp
from .dicom.header import read_header
from .dicom.pending import PendingBudget
from .dicom.uid import valid_uid
from .errors import TemporaryFailure
from .jobrecord import JobRecord
from .journal import Event, Stage, Status
from .spool import (
    LOCK_NAME,
    Job,
    Queue,
    dump_json,
    fsync_dir,
    isotime,
    new_job_id,
    write_file_durably,
)
from .station import Station

LOGGER = logging.getLogger(__name__)

STUDY_META = ".study.json"
MARKER = ".receiving"

# DIMSE statuses of the Storage Service Class
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
# Connections pynetdicom may count beyond dts's own limits: ones closing down.
PYNETDICOM_SLACK = 64
# Connections closed over the pending budget are journalled at most this often.
CLOSED_REPORT_SECONDS = 60.0
# publish_study's answer when the study is carried (or not quiet) now: try again later
BUSY = "<busy>"

def check_uids(header: dict[str, str | None]) -> str | None:
    """Why these UIDs cannot become path components, or None when they are fine."""
    for key, name in (("study_uid", "Study Instance UID"), ("series_uid", "Series Instance UID"),
                      ("sop_uid", "SOP Instance UID")):
        value = header.get(key)
        if not value:
            return f"{name} is missing"
        if not valid_uid(value):
            return f"{name} {_show(value)} is not a valid UID (digits and dots, at most 64)"
    return None


def _show(value: str) -> str:
    return repr(value if len(value) <= 70 else value[:67] + "...")


@dataclass(frozen=True)
class Connection:
    calling_ae: str
    called_ae: str
    peer: str
    peer_port: int

    def as_dict(self) -> dict[str, Any]:
        return {"calling_ae": self.calling_ae, "called_ae": self.called_ae, "peer": self.peer,
                "peer_port": self.peer_port}


@dataclass
class _Study:
    uid: str
    meta: dict[str, Any]
    last: float = field(default_factory=time.monotonic)
    active: int = 0  # instances being stored right now
    assocs: set[int] = field(default_factory=set)  # open associations that carried it
    series: set[str] = field(default_factory=set)  # series folders known to exist
    sops: set[str] = field(default_factory=set)
    duplicates: int = 0
    sources: list[dict[str, Any]] = field(default_factory=list)
    ino: int | None = None  # incoming/<Study>'s inode: which incarnation this state is of


def job_data(study_uid: str, meta: dict[str, Any], input_dir: Path, *,
             duplicates: int = 0) -> JobRecord:
    """job.json of a freshly received (or imported) study."""
    series: dict[str, int] = {}
    last = 0.0  # when the last instance was written: the start of the turnaround
    for entry in sorted(os.scandir(input_dir), key=lambda e: e.name):
        if entry.is_dir():
            count = 0
            for f in os.scandir(entry.path):
                if f.name.endswith(".dcm") and not f.name.startswith("."):
                    count += 1
                    last = max(last, f.stat().st_mtime)
            series[entry.name] = count
    data: JobRecord = {
        "study_uid": study_uid,
        "patient_id": meta.get("patient_id"),
        "accession": meta.get("accession"),
        "calling_ae": meta.get("calling_ae"),
        "called_ae": meta.get("called_ae"),
        "peer": meta.get("peer"),
        "peer_port": meta.get("peer_port"),
        "received_at": meta.get("received_at"),
        "completed_at": isotime(),
        "last_received_at": isotime(datetime.fromtimestamp(last, UTC)) if last else None,
        "instances": sum(series.values()),
        "series": series,
        "source": meta.get("source", "dicom"),
        "stream": None,
        "attempts": 0,
        "error": None,
    }
    if meta.get("sources") and len(meta["sources"]) > 1:
        data["sources"] = meta["sources"]
    if duplicates:
        data["duplicates"] = duplicates
    return data


class Receiver:
    """The C-STORE/C-ECHO service of one station (see the module docstring).

    ``workers`` above 1 makes this one of that many worker processes serving one port
    (``dts.receivepool``): its supervisor accepts the connections and hands them over
    ``channel``, ``max_associations`` is counted station-wide in lock files, the pending
    budget is this worker's share, and which study is still carried, or quiet, is decided with
    the other workers through ``dts.carriers``."""

    def __init__(self, station: Station, *, host: str | None = None,
                 port: int | None = None, workers: int = 1,
                 channel: socket.socket | None = None) -> None:
        self.station = station
        self.channel = channel  # a worker's: connections come over it (dts.receivepool)
        self.spool = station.spool
        self.cfg = station.config.station
        self.host = host if host is not None else self.cfg.host
        self.port = port if port is not None else self.cfg.port
        self._lock = threading.Lock()
        self._studies: dict[str, _Study] = {}
        self._moving: dict[str, threading.Event] = {}  # studies being renamed away
        self._conns: dict[int, Connection] = {}  # id(assoc) -> who it is
        self._carried: dict[int, set[str]] = {}  # id(assoc) -> studies it carried
        # (id(assoc), study) -> the association's shared hold on the study's gate
        self._carriers: dict[tuple[int, str], carriers.Carrier] = {}
        self._publish_lock = threading.Lock()
        self._stop = threading.Event()
        self._server: Any = None
        self._checker: threading.Thread | None = None
        self._free_checked = 0.0
        self._incoming = str(self.spool.incoming)
        self._tmp = str(self.spool.tmp)
        self._expected = str(self.spool.priors / expectations.EXPECT_DIR)
        self._free_ok = True
        self._unfinished = False  # a publication failed after its files moved to tmp/
        self.workers = max(1, workers)
        self.shared = self.workers > 1
        total = max(1, self.cfg.max_pending_connections // self.workers)
        self._budget = PendingBudget(total,
                                     min(total, max(1, self.cfg.max_pending_per_host
                                                    // self.workers)))
        self._closed_reported = -CLOSED_REPORT_SECONDS
        self._slots: AssociationSlots | None = None
        self._held_slots: dict[int, int] = {}  # id(assoc) -> its slot's descriptor
        if self.shared:
            self._slots = AssociationSlots(self.spool.run_dir / "associations",
                                           self.cfg.max_associations)

    # -- life cycle -----------------------------------------------------------
    def start(self) -> None:
        """Recover, then serve in background threads (returns at once)."""
        self.recover()
        patches.tune()
        patches.set_receive_directory(self.spool.tmp)
        # acse_timeout: how long a connection may take to send its A-ASSOCIATE-RQ
        # pynetdicom counts every accepted connection as an association; dts counts
        # associations itself (_on_requested) and connections not yet associated in
        # self._budget, so pynetdicom's own limit only has to stay out of the way.
        ae = dicom_ae.make_ae(self.cfg.ae_title, max_pdu=self.cfg.max_pdu,
                              acse_timeout=self.cfg.network_timeout,
                              dimse_timeout=self.cfg.dimse_timeout,
                              network_timeout=self.cfg.network_timeout,
                              max_associations=(self.cfg.max_associations
                                                + self.cfg.max_pending_connections
                                                + PYNETDICOM_SLACK))
        dicom_ae.add_scp_contexts(ae)
        # Storage commitment answers (dts.commitment): the peer, as the commitment SCP,
        # opens the association and proposes the SCP role; dts takes the SCU role
        ae.add_supported_context(commitment.SOP_CLASS, scu_role=True, scp_role=True)
        scp.enable(ae, self._fast_store, self._tmp)
        ssl_context = None
        if self.cfg.tls is not None:
            tls = self.cfg.tls
            ssl_context = dicom_ae.server_ssl_context(tls.certificate, tls.private_key,
                                                      tls.ca_certificates,
                                                      tls.require_client_certificate)
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_N_EVENT_REPORT, self._on_event_report),
            (evt.EVT_N_ACTION, self._on_action),
            (evt.EVT_CONN_CLOSE, self._on_close),
        ]
        try:
            if self.channel is not None:  # a worker: its supervisor accepts for it
                patches.serve_handed_connections(self.channel)
            self._server = ae.start_server((self.host, self.port), block=False,
                                           evt_handlers=handlers, ssl_context=ssl_context)
        except OSError as exc:
            raise TemporaryFailure(f"cannot listen on {self.host}:{self.port}: "
                                   f"{exc.strerror or exc}") from None
        self.port = int(self._server.server_address[1])
        if self.channel is None:
            dicom_ae.widen_backlog(self._server)
        # socketserver asks this on the accepting thread, in the order of the accepts
        self._server.verify_request = self._on_accept
        self._checker = threading.Thread(target=self._check_loop, name="dts-stable",
                                         daemon=True)
        self._checker.start()
        if self.channel is not None:
            self._tell(receivepool.SERVING)
        if self.shared:
            return  # the pool says it once for all its workers
        self.station.journal.emit(Stage.RECEIVE, Event.RECEIVER_STARTED, Status.INFO,
                                  f"listening on {self.host}:{self.port} as {self.cfg.ae_title}",
                                  port=self.port, ae_title=self.cfg.ae_title, best_effort=True)

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, let open associations finish (up to ``timeout``, then abort
        them), publish what is stable; studies still arriving stay in incoming/."""
        if self._server is None:
            return
        server, self._server = self._server, None
        # socketserver's shutdown stops accepting; pynetdicom's would not wait for
        # open associations, so we wait for them ourselves.
        socketserver.BaseServer.shutdown(server)
        socketserver.TCPServer.server_close(server)
        deadline = time.monotonic() + (timeout if timeout is not None
                                       else self.cfg.network_timeout)
        # Established associations may finish; connections that never associated are cut.
        while time.monotonic() < deadline and any(a.is_established
                                                  for a in server.active_associations):
            time.sleep(0.05)
        # A reader blocked on a peer that sends nothing must not hold the process (the
        # DUL thread is not a daemon): the sockets are cut first, then pynetdicom ends.
        for assoc in server.active_associations:
            dicom_ae.cut(assoc)
        for assoc in server.active_associations:
            assoc.abort()
        try:
            server.ae._servers.remove(server)
        except (ValueError, AttributeError):
            pass
        self._stop.set()
        if self._checker is not None:
            self._checker.join(10)
        with self._lock:
            held, self._carriers = list(self._carriers.values()), {}
        for carrier in held:
            carrier.release()
        self.publish_stable()
        if self.shared:
            return
        self.station.journal.emit(Stage.RECEIVE, Event.RECEIVER_STOPPED, Status.INFO,
                                  "receiver stopped", port=self.port, best_effort=True)

    def _check_loop(self) -> None:
        interval = min(0.5, max(0.05, self.cfg.stable_seconds / 5))
        while not self._stop.wait(interval):
            try:
                self.poll()
            except Exception:  # keep serving; the next round tries again
                LOGGER.exception("publishing stable studies failed")

    def poll(self) -> list[str]:
        """One round of the background loop: report journal lines a full disk kept out
        and connections closed over budget, finish publications that failed halfway,
        publish what is stable; the new job ids."""
        self.station.journal.report_lost()
        self._report_closed()
        published = []
        if self._unfinished:  # e.g. job.json could not be written: the disk was full
            self._unfinished = False
            try:
                published = self._recover_tmp(live=True)
            except BaseException:
                self._unfinished = True
                raise
        return published + self.publish_stable()

    def _report_closed(self, *, now: float | None = None) -> None:
        """At most once per CLOSED_REPORT_SECONDS: one journal line for the connections
        closed over the pending budget (a flood must not flood the journal too)."""
        now = time.monotonic() if now is None else now
        if now - self._closed_reported < CLOSED_REPORT_SECONDS:
            return
        closed = self._budget.closed_since_last()
        if not closed:
            return
        self._closed_reported = now
        total = sum(closed.values())
        worst = sorted(closed.items(), key=lambda kv: -kv[1])[:10]
        self.station.journal.emit(
            Stage.RECEIVE, Event.CONNECTIONS_CLOSED, Status.WARNING,
            f"closed {total} connection(s) that had sent no association request, over the "
            f"budget (max_pending_connections {self._budget.total}, max_pending_per_host "
            f"{self._budget.per_host}); most from {worst[0][0]}",
            closed=total, by_host=dict(worst), best_effort=True)

    # -- association handling ----------------------------------------------------
    def _on_accept(self, request: Any, client_address: Any) -> bool:
        """A connection was accepted: it takes a place in the pending budget, which may
        shut down the oldest pending ones (they had not associated); always served."""
        host = str(client_address[0]) if client_address else "?"
        for victim in self._budget.opened(request, host):
            dicom_ae.shut(victim)
        return True

    def _on_requested(self, event: Any) -> None:
        assoc = event.assoc
        self._budget.done(dicom_ae.socket_of(assoc))
        prim = assoc.requestor.primitive
        calling = _ae_text(prim.calling_ae_title)
        called = _ae_text(prim.called_ae_title)
        peer, peer_port = dicom_ae.peer_of(assoc)
        conn = Connection(calling, called, peer, peer_port)
        reason, diagnostic = self._refusal(conn)
        result, source = 0x01, 0x01  # rejected permanent, by the service user
        if reason is None:
            if self._slots is not None:  # counted with the other workers
                slot = self._slots.take()
                if slot is not None:
                    with self._lock:
                        self._held_slots[id(assoc)] = slot
                        self._conns[id(assoc)] = conn
                    return
            else:
                with self._lock:
                    if len(self._conns) < self.cfg.max_associations:
                        self._conns[id(assoc)] = conn
                        return
            reason = f"max_associations ({self.cfg.max_associations}) are open"
            # transient, by the service provider (presentation): local limit exceeded
            result, source, diagnostic = 0x02, 0x03, 0x02
        self.station.journal.emit(
            Stage.RECEIVE, Event.ASSOCIATION_REFUSED, Status.WARNING,
            f"refused association from {calling}@{peer} to {called}: {reason}",
            **conn.as_dict(), reason=reason, best_effort=True)
        dicom_ae.reject(assoc, result, source, diagnostic)

    def _refusal(self, conn: Connection) -> tuple[str | None, int]:
        cfg = self.cfg
        if cfg.allowed_hosts:
            try:
                addr = ipaddress.ip_address(conn.peer)
                allowed = any(addr in ipaddress.ip_network(n, strict=False)
                              for n in cfg.allowed_hosts)
            except ValueError:
                allowed = False
            if not allowed:
                return f"host {conn.peer} is not in allowed_hosts", 0x01
        if cfg.allowed_calling_ae and conn.calling_ae not in cfg.allowed_calling_ae:
            return f"calling AE {conn.calling_ae!r} is not in allowed_calling_ae", 0x03
        if cfg.check_called_ae and conn.called_ae != cfg.ae_title and not any(
                s.called_ae.search(conn.called_ae) for s in self.station.config.streams):
            return (f"called AE {conn.called_ae!r} is neither {cfg.ae_title!r} nor a "
                    "stream's called_ae"), 0x07
        return None, 0

    def _on_close(self, event: Any) -> None:
        sock = dicom_ae.socket_of(event.assoc)
        if sock is not None:  # else closed: the budget forgets it by itself
            self._budget.done(sock)
        scp.discard_partial(event.assoc)  # a data set cut off on pynetdicom's path
        key = id(event.assoc)
        self._closed(key)
        if self.channel is not None:
            self._tell(receivepool.ENDED)

    def _tell(self, what: bytes) -> None:
        """Tell the supervisor (a worker's channel): serving, a connection ended. A full
        channel (the supervisor not reading) loses the word, never blocks the worker."""
        try:
            assert self.channel is not None
            self.channel.send(what, socket.MSG_DONTWAIT)
        except OSError:
            pass

    def _closed(self, key: int) -> None:
        """The association ``key`` ended: it carries nothing any more."""
        now = time.monotonic()
        with self._lock:
            self._conns.pop(key, None)
            slot = self._held_slots.pop(key, None)
            for uid in self._carried.pop(key, ()):
                st = self._studies.get(uid)
                if st is not None:
                    st.assocs.discard(key)
                    st.last = max(st.last, now)
            held = [self._carriers.pop(k) for k in list(self._carriers) if k[0] == key]
        for carrier in held:
            carrier.release()
        if slot is not None:
            AssociationSlots.give_back(slot)

    def _on_echo(self, event: Any) -> int:
        return SUCCESS

    def _on_event_report(self, event: Any) -> tuple[int, None]:
        """A storage commitment answer: validated and kept for its job (dts.commitment)."""
        return commitment.on_report(self.station, event, via="receiver")

    def _on_action(self, event: Any) -> tuple[int, None]:
        """dts asks for storage commitment; it commits nothing itself: 0x0123 No such
        action (instead of pynetdicom's 0x0110 for a handler that is missing)."""
        LOGGER.warning("refused an N-ACTION from %s: dts is no storage commitment SCP",
                       dicom_ae.peer_of(event.assoc)[0])
        return commitment.NO_SUCH_ACTION, None

    # -- storing -------------------------------------------------------------------
    def _connection(self, assoc: Any) -> Connection:
        conn = self._conns.get(id(assoc))
        if conn is None:  # EVT_REQUESTED always runs first; be safe anyway
            peer, port = dicom_ae.peer_of(assoc)
            conn = Connection(_ae_text(assoc.requestor.ae_title),
                              _ae_text(assoc.acceptor.ae_title), peer, port)
        return conn

    def _fast_store(self, assoc: Any, req: scp.StoreRequest) -> int:
        """A C-STORE from the fast path (``dts.dicom.scp``): the data set is in ``req.path``, or
        could not be written (``req.error``: refused like any write error)."""
        conn = self._connection(assoc)
        if req.error is not None:
            return self._refuse(conn, OUT_OF_RESOURCES, req.error,
                                {"sop_uid": req.AffectedSOPInstanceUID})
        return self._store(conn, id(assoc), req, req.path, synced=False)

    def _on_store(self, event: Any) -> int:
        assoc = event.assoc
        conn = self._connection(assoc)
        req = event.request
        own_tmp: Path | None = None
        try:
            path = str(event.dataset_path)
        except AttributeError:  # pynetdicom kept it in memory: write it ourselves
            own_tmp = self.spool.tmp / f".rx-{os.getpid()}-{threading.get_ident()}.dcm"
            path = str(own_tmp)
            try:
                write_file_durably(own_tmp, event.encoded_dataset())
            except OSError as exc:
                return self._refuse(conn, OUT_OF_RESOURCES, f"cannot write: {exc}", None)
        error = getattr(getattr(req, "_dataset_file", None), "error", None)
        if error is not None:  # the data set could not be written (the disk is full)
            return self._refuse(conn, OUT_OF_RESOURCES, error, None)
        try:
            return self._store(conn, id(assoc), req, path, synced=own_tmp is not None)
        finally:
            if own_tmp is not None:
                own_tmp.unlink(missing_ok=True)

    def _store(self, conn: Connection, assoc_key: int, req: Any, path: str,
               *, synced: bool) -> int:
        try:
            header = read_header(path)
        except ValueError as exc:
            return self._refuse(conn, CANNOT_UNDERSTAND, str(exc), None)
        except OSError as exc:
            return self._refuse(conn, OUT_OF_RESOURCES, f"cannot read: {exc}", None)
        command_sop = str(req.AffectedSOPInstanceUID or "")
        if not header.get("sop_uid"):
            header["sop_uid"] = command_sop
        why = check_uids(header)
        if why is None and command_sop != header["sop_uid"]:
            why = "the data set's SOP Instance UID differs from the request's"
        if why is not None:
            return self._refuse(conn, CANNOT_UNDERSTAND, why, header)
        if not self._enough_space():
            return self._refuse(conn, OUT_OF_RESOURCES,
                                f"less than min_free_mb={self.cfg.min_free_mb} MB free "
                                f"in {self.spool.root}", header)
        study_uid = str(header["study_uid"])
        series_uid = str(header["series_uid"])
        sop_uid = str(header["sop_uid"])
        if expectations.expected(self._expected, study_uid):  # a C-MOVE of dts's run stage?
            answer = self._store_prior(conn, path, header, synced=synced)
            if answer is not None:
                return answer
            synced = True  # no live expectation holds it: received as usual
        try:
            if not synced:
                fh = getattr(req, "_dataset_file", None)
                if fh is not None and not fh.closed:
                    fh.flush()
                    os.fsync(fh.fileno())
                else:
                    _fsync_path(Path(path))
            if (assoc_key, study_uid) not in self._carriers:
                self._carry(assoc_key, study_uid)
            st = self._enter(study_uid, assoc_key, conn, header)
        except OSError as exc:
            return self._refuse(conn, OUT_OF_RESOURCES, f"cannot write: {exc}", header)
        try:
            # plain strings: this runs once per instance, pathlib costs show up here
            study_dir = os.path.join(self._incoming, study_uid)
            series_dir = os.path.join(study_dir, series_uid)
            if series_uid not in st.series:
                os.makedirs(series_dir, exist_ok=True)
                fsync_dir(study_dir)
                st.series.add(series_uid)
            dest = os.path.join(series_dir, sop_uid + ".dcm")
            src = path
            if os.path.dirname(path) != self._tmp:  # a receive folder elsewhere: via tmp/
                src = os.path.join(self._tmp, f".rx-copy-{sop_uid}")
                shutil.copyfile(path, src)
                _fsync_path(Path(src))
            try:
                os.rename(src, dest)
            except FileNotFoundError:
                # the study folder was published by dts web and made anew by a STOW-RS
                # request since: this series' folder is not in it (any more)
                if not os.path.isfile(src):
                    raise
                os.makedirs(series_dir, exist_ok=True)
                fsync_dir(study_dir)
                os.rename(src, dest)
            fsync_dir(series_dir)
        except OSError as exc:
            self._leave(st, None)
            return self._refuse(conn, OUT_OF_RESOURCES, f"cannot write: {exc}", header)
        self._leave(st, sop_uid)
        return SUCCESS

    def _store_prior(self, conn: Connection, path: str, header: dict[str, str | None], *,
                     synced: bool) -> int | None:
        """An instance of a study a run job retrieves as a prior by C-MOVE goes to that
        job (``dts.expectations.route``), never into incoming/, durable before success; None
        when no live expectation holds it (the file is synced then)."""
        try:
            if not synced:
                _fsync_path(Path(path))
            routed = expectations.route(self.spool, self._tmp, conn.calling_ae, header, path)
        except OSError as exc:
            return self._refuse(conn, OUT_OF_RESOURCES, f"cannot write: {exc}", header)
        if routed is None:
            return None
        status, why = routed
        return status if status == SUCCESS else self._refuse(conn, status, why, header)

    def _enough_space(self) -> bool:
        if self.cfg.min_free_mb <= 0:
            return True
        now = time.monotonic()
        if now - self._free_checked > 0.2:  # statvfs at most 5 times a second
            self._free_ok = self.spool.free_mb() >= self.cfg.min_free_mb
            self._free_checked = now
        return self._free_ok

    def _refuse(self, conn: Connection, status: int, reason: str,
                header: dict[str, str | None] | None) -> int:
        """Journal the refusal and return ``status``. The status goes out whatever happens
        to the line: on a full disk the line cannot be written (``best_effort``: counted and
        reported later), and an exception here would reach the peer as 0xC211, a permanent
        failure, instead of the 0xA700 that tells it to try again."""
        study = (header or {}).get("study_uid")
        sop = (header or {}).get("sop_uid")
        try:
            self.station.journal.emit(
                Stage.RECEIVE, Event.INSTANCE_REFUSED,
                Status.ERROR if status == OUT_OF_RESOURCES else Status.WARNING,
                f"refused an instance from {conn.calling_ae}@{conn.peer} with 0x{status:04X}: "
                f"{reason}",
                study_uid=study if valid_uid(study) else None,
                sop_uid=sop if valid_uid(sop) else None,
                dimse_status=f"0x{status:04X}", reason=reason, **conn.as_dict(),
                best_effort=True)
        except Exception:
            LOGGER.exception("cannot journal the refusal of an instance (0x%04X: %s)",
                             status, reason)
        return status

    def _carry(self, assoc_key: int, study_uid: str) -> None:
        """Hold the study's gate for this association (once per association and study).
        Held, nobody else publishes it. A study known here whose folder is gone, or is
        another folder now (its inode), was published meanwhile by another process (dts
        web, another receiver worker) and is forgotten: its instances make it anew."""
        carrier = carriers.carry(self.spool, study_uid)
        study_dir = os.path.join(self._incoming, study_uid)
        try:
            ino: int | None = os.stat(study_dir).st_ino
        except FileNotFoundError:
            ino = None
        with self._lock:
            st = self._studies.get(study_uid)
            if st is not None and not st.active and not st.assocs \
                    and study_uid not in self._moving \
                    and (ino is None or (st.ino is not None and st.ino != ino)):
                del self._studies[study_uid]
            self._carriers[(assoc_key, study_uid)] = carrier

    def _enter(self, study_uid: str, assoc_key: int, conn: Connection,
               header: dict[str, str | None]) -> _Study:
        """Register an instance in flight for ``study_uid``, creating the study (folder and
        durable metadata) on its first instance."""
        while True:
            with self._lock:
                moving = self._moving.get(study_uid)
                if moving is None:
                    st = self._studies.get(study_uid)
                    if st is not None:
                        st.active += 1
                        st.assocs.add(assoc_key)
                        self._carried.setdefault(assoc_key, set()).add(study_uid)
                        if conn.as_dict() not in st.sources:
                            st.sources.append(conn.as_dict())
                            st.meta["sources"] = st.sources
                        return st
                    st = _Study(study_uid, meta={}, active=1, assocs={assoc_key})
                    self._studies[study_uid] = st
                    self._carried.setdefault(assoc_key, set()).add(study_uid)
                    # Others wait while the folder and metadata are made.
                    self._moving[study_uid] = created = threading.Event()
                    break
            moving.wait()
        try:
            study_dir = self.spool.incoming / study_uid
            meta = {**conn.as_dict(), "study_uid": study_uid,
                    "patient_id": header.get("patient_id"),
                    "accession": header.get("accession"), "received_at": isotime(),
                    "source": "dicom", "sources": [conn.as_dict()]}
            try:
                study_dir.mkdir()
            except FileExistsError:
                # adopted after a restart, or made a moment ago by another receive worker
                # (its first instance came to both at once): keep the first metadata
                try:
                    meta = {**meta, **json.loads((study_dir / STUDY_META).read_bytes())}
                except (OSError, ValueError):
                    pass
            else:
                fsync_dir(self.spool.incoming)
            write_file_durably(study_dir / STUDY_META, dump_json(meta))
            st.ino = study_dir.stat().st_ino
            st.meta = meta
            st.sources = list(meta.get("sources") or [conn.as_dict()])
            return st
        except BaseException:
            with self._lock:
                st.active -= 1
                if st.active == 0 and not st.series:
                    self._studies.pop(study_uid, None)
            raise
        finally:
            with self._lock:
                self._moving.pop(study_uid, None)
            created.set()

    def _leave(self, st: _Study, sop_uid: str | None) -> None:
        with self._lock:
            st.active -= 1
            st.last = time.monotonic()
            if sop_uid is not None:
                if sop_uid in st.sops:
                    st.duplicates += 1
                st.sops.add(sop_uid)

    # -- publishing ------------------------------------------------------------------
    def publish_stable(self, *, force: bool = False) -> list[str]:
        """Publish every study that is complete (quiet for stable_seconds, no open
        association carried it, nothing in flight); ``force`` ignores the quiet time
        (nothing may be arriving). Returns the new job ids."""
        with self._publish_lock:
            now = time.monotonic()
            ready: list[_Study] = []
            server = self._server
            # An association whose close we somehow missed must not hold a study forever.
            live = {id(a) for a in server.active_associations} if server is not None else set()
            gone = [k for k in list(self._held_slots) if k not in live] \
                if server is not None else []
            for key in gone:  # closes we missed: their slots go too
                self._closed(key)
            stale: list[carriers.Carrier] = []
            with self._lock:
                for uid, st in list(self._studies.items()):
                    if st.assocs - live:
                        stale += [c for k in st.assocs - live
                                  if (c := self._carriers.pop((k, uid), None)) is not None]
                        st.assocs &= live
                        st.last = max(st.last, now)
                    if st.active or st.assocs or uid in self._moving:
                        continue
                    if not force and now - st.last < self.cfg.stable_seconds:
                        continue
                    del self._studies[uid]
                    self._moving[uid] = threading.Event()
                    ready.append(st)
            for carrier in stale:
                carrier.release()
            jobs = []
            for st in ready:
                try:
                    job_id = self._publish(st, force=force)
                    if job_id == BUSY:  # carried by another process, or active there lately
                        with self._lock:
                            self._studies.setdefault(st.uid, st)
                    elif job_id:
                        jobs.append(job_id)
                except Exception as exc:
                    LOGGER.exception("cannot publish study %s", st.uid)
                    with self._lock:  # try again later (first: the journal may be full too)
                        st.last = time.monotonic()
                        self._studies.setdefault(st.uid, st)
                    self.station.journal.emit(Stage.RECEIVE, Event.PUBLISH_FAILED, Status.ERROR,
                                              f"cannot publish study {st.uid}: {exc}; it stays "
                                              "in incoming/ and is tried again",
                                              study_uid=st.uid, best_effort=True)
                finally:
                    with self._lock:
                        done = self._moving.pop(st.uid, None)
                    if done is not None:
                        done.set()
            return jobs

    def _publish(self, st: _Study, *, force: bool = False) -> str | None:
        return publish_study(self.station, st.uid, st.duplicates,
                             stable_seconds=self.cfg.stable_seconds, force=force,
                             on_moved=self._set_unfinished)

    def _set_unfinished(self) -> None:
        self._unfinished = True  # the files are in tmp/<job>: finished from there

    def _finish(self, job: Job, study_uid: str, duplicates: int) -> str:
        return finish_publication(self.station, job, study_uid, duplicates)

    # -- recovery ---------------------------------------------------------------------
    def recover(self) -> list[str]:
        """Finish publications a crash interrupted and adopt studies left in incoming/.
        Returns the ids of jobs published now. A publication that cannot be finished now
        (the disk is full) is tried again by ``poll()``: the receiver starts anyway and
        refuses with 0xA700 until there is room."""
        try:
            published = self._recover_tmp()
        except OSError as exc:
            LOGGER.error("cannot finish a publication left in %s (%s); tried again while "
                         "serving", self.spool.tmp, exc)
            self._unfinished = True
            published = []
        now = time.monotonic()
        with self._lock:
            for entry in os.scandir(self.spool.incoming):
                if not entry.is_dir() or entry.name in self._studies:
                    continue
                study_dir = Path(entry.path)
                if not valid_uid(entry.name):
                    continue  # not ours: leave it be
                if not any(e.is_dir() for e in os.scandir(study_dir)):
                    shutil.rmtree(study_dir, ignore_errors=True)  # nothing acknowledged in it
                    continue
                try:
                    meta = json.loads((study_dir / STUDY_META).read_bytes())
                except (OSError, ValueError):
                    meta = {}
                st = _Study(entry.name, meta=meta, last=now,
                            series={e.name for e in os.scandir(study_dir) if e.is_dir()},
                            sources=list(meta.get("sources") or []), ino=entry.inode())
                self._studies[entry.name] = st
        return published

    def _recover_tmp(self, *, live: bool = False) -> list[str]:
        return recover_publications(self.station, live=live)

    def pending(self) -> list[str]:
        """Study UIDs in incoming/ known to this receiver (not yet published)."""
        with self._lock:
            return sorted(self._studies)


def publish_study(station: Station, study_uid: str, duplicates: int = 0, *,
                  stable_seconds: float, force: bool = False,
                  on_moved: Callable[[], None] | None = None) -> str | None:
    """Publish ``incoming/<study_uid>`` (the chain of the module docstring) if nobody
    carries it and no carrier was active for ``stable_seconds`` (``force``: whatever the
    time). The new job id; None when the study is not in incoming/ (any more); ``BUSY``
    when it must wait. ``on_moved`` is called when the publication fails after the files
    moved to tmp/ (``recover_publications(live=True)`` finishes it)."""
    spool = station.spool
    gate = carriers.try_exclusive(spool, study_uid)
    if gate is None:
        return BUSY
    gone = False
    try:
        if not force and gate.quiet_seconds() < stable_seconds:
            return BUSY
        study_dir = spool.incoming / study_uid
        if not study_dir.is_dir():
            gone = True
            return None
        job = spool.create_tmp_job()
        fd = _hold(job.path)
        moved = False
        try:
            write_file_durably(job.path / MARKER, dump_json({"study_uid": study_uid,
                                                             "duplicates": duplicates}))
            fsync_dir(spool.tmp)
            os.rename(study_dir, job.input_dir)  # step 2: the files move with their folder
            moved = gone = True
            fsync_dir(spool.incoming)
            fsync_dir(job.path)
            return finish_publication(station, job, study_uid, duplicates)
        except BaseException:
            if moved:
                if on_moved is not None:
                    on_moved()
            else:  # nothing moved: no empty job left behind for every retry
                shutil.rmtree(job.path, ignore_errors=True)
            raise
        finally:
            _release(fd)
    finally:
        gate.release(remove=gone)


def finish_publication(station: Station, job: Job, study_uid: str, duplicates: int) -> str:
    """Steps 3 and 4 of a publication whose input/ is in place (idempotent)."""
    meta_file = job.input_dir / STUDY_META
    try:
        meta = json.loads(meta_file.read_bytes())
    except (OSError, ValueError):
        meta = {}
    data = job_data(study_uid, meta, job.input_dir, duplicates=duplicates)
    job.write(data)
    if not any(e.get("event") == Event.RECEIVED for e in job.events()):
        srcs = data.get("sources") or [meta]
        who = ", ".join(f"{s.get('calling_ae')}@{s.get('peer')}" for s in srcs)
        station.journal.emit(
            Stage.RECEIVE, Event.RECEIVED, Status.OK,
            f"study {study_uid}: {data['instances']} instance(s) in "
            f"{len(data['series'])} series from {who}",
            job=job, job_data=data, instances=data["instances"],
            calling_ae=data["calling_ae"], called_ae=data["called_ae"], peer=data["peer"])
    meta_file.unlink(missing_ok=True)
    (job.path / MARKER).unlink(missing_ok=True)
    station.spool.publish(job, Queue.CLASSIFY)
    return job.id


def recover_publications(station: Station, *, live: bool = False,
                         partial: bool = True) -> list[str]:
    """Finish every marked publication in tmp/ that nobody holds (a crash, or, while
    ``live``, a publication that failed after its files moved: the disk was full).
    ``partial``: also remove half-received instances of a dead receiver (only the
    receiver itself, at its start, knows none of them is arriving)."""
    spool = station.spool
    published: list[str] = []
    for entry in sorted(os.scandir(spool.tmp), key=lambda e: e.name):
        if entry.name.startswith(".rx-") and entry.is_file():
            if live or not partial or _writer_alive(entry.name):
                continue  # may be an instance arriving right now (another worker's)
            try:  # half-received instances of a dead receiver: never acknowledged
                if time.time() - entry.stat().st_mtime > 60:
                    os.unlink(entry.path)
            except OSError:
                pass
            continue
        path = Path(entry.path)
        if not entry.is_dir() or not (path / MARKER).exists():
            continue
        fd = _hold(path, wait=False)
        if fd is None:
            continue  # someone alive is publishing it
        try:
            if not (path / MARKER).exists():
                continue
            try:
                marker = json.loads((path / MARKER).read_bytes())
            except ValueError:
                marker = {}
            study_uid = str(marker.get("study_uid") or "")
            job = Job(path)
            if not job.input_dir.is_dir():
                study_dir = spool.incoming / study_uid
                # crashed before step 2: the study moves now unless someone carries it
                gate = carriers.try_exclusive(spool, study_uid) if valid_uid(study_uid) \
                    else None
                moved = False
                try:
                    if gate is not None and study_dir.is_dir():
                        os.rename(study_dir, job.input_dir)
                        moved = True
                        fsync_dir(spool.incoming)
                        fsync_dir(path)
                finally:
                    if gate is not None:
                        gate.release(remove=moved)
                if not moved:  # nothing moved: the study (if any) is published later
                    shutil.rmtree(path, ignore_errors=True)
                    continue
            published.append(finish_publication(station, job, study_uid,
                                                 int(marker.get("duplicates") or 0)))
        finally:
            _release(fd)
    return published


def _ae_text(value: object) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value or "").strip()


def _writer_alive(name: str) -> bool:
    """A ``.rx-<pid>-...`` file whose writing process still lives (another worker's)."""
    try:
        pid = int(name.split("-")[1])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hold(job_path: Path, wait: bool = True) -> int | None:
    fd = os.open(job_path / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _release(fd: int | None) -> None:
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


__all__ = ["BUSY", "Receiver", "check_uids", "finish_publication", "job_data", "new_job_id",
           "publish_study", "recover_publications"]
