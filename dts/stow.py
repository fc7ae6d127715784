"""Owns STOW-RS into the station: a request's parts stored exactly like C-STOREs.

``dts web`` serves ``POST /dicom-web/studies[/{StudyInstanceUID}]`` (``dts.web.stow``);
this module does the work, without HTTP:

1. The body (``multipart/related; type="application/dicom"``) is parsed as it streams
   in (``MultipartParser``: strict limits on headers and parts, nothing held in memory
   beyond one chunk) and each part is written to the request's scratch folder
   ``tmp/.stow-<id>/`` (held by an flock for the request's life, so ``dts clean`` and a
   restarted ``dts web`` remove what a killed one left).
2. Each part is checked as the receiver checks a C-STORE: it must be DICOM (file meta,
   ``dts.dicom.header``), its UIDs valid (``receiver.check_uids``), its study the one in
   the URL if the URL names one, and the disk must have ``min_free_mb``. It is fsynced.
3. Only when the whole body has arrived within ``[stow] max_upload_mb`` do the accepted
   parts move: per study, under the study's gate (``dts.carriers``, held shared while the
   parts are renamed into ``incoming/<Study>/<Series>/<SOP>.dcm`` and the folders
   fsynced), the study's ``.study.json`` written first when the request creates the study.
   A body cut off, malformed or too large leaves nothing in ``incoming/``.
4. A study is published by ``Stow.publish_quiet`` (a thread of ``dts web``) through the
   receiver's own chain (``receiver.publish_study``) once no carrier touched it for
   ``stable_seconds``; the receiver may publish it too (it adopted it at a restart, or a
   C-STORE of the same study joined): the gate makes it happen exactly once.

The calling AE title of a STOW-RS study is ``[stow] source``, the peer the HTTP client's
address; job.json ``source`` is ``"stow"``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from . import carriers
from .dicom import filemeta
from .dicom.header import read_header
from .dicom.uid import valid_uid
from .journal import Event, Stage, Status
from .receiver import (
    BUSY,
    STUDY_META,
    check_uids,
    publish_study,
    recover_publications,
)
from .spool import LOCK_NAME, dump_json, fsync_dir, isotime, write_file_durably
from .station import Station

log = logging.getLogger(__name__)

SCRATCH_PREFIX = ".stow-"
MAX_PART_HEADERS = 16 * 1024  # bytes of one part's header block
MAX_PARTS = 10_000
MAX_BOUNDARY = 200
# PS3.18 Table 10.5.3-1 failure reasons
OUT_OF_RESOURCES = 0xA700
MISMATCH = 0xA900          # "data set does not match": here, not the study of the URL
CANNOT_UNDERSTAND = 0xC000


class MalformedBody(ValueError):
    """The body is not the multipart/related it says it is (400)."""


class _Sink:
    """Where a part's bytes go (a file), or nowhere."""

    def __init__(self, fh: BinaryIO | None) -> None:
        self.fh = fh

    def write(self, data: bytes) -> None:
        if self.fh is not None and data:
            self.fh.write(data)


class MultipartParser:
    """A streaming multipart (RFC 2046) parser: ``feed(bytes)`` as they come, ``close()``
    at the end. ``on_part(headers) -> file or None`` opens a part, ``on_end()`` ends it.
    Raises ``MalformedBody``."""

    def __init__(self, boundary: bytes, on_part: Any, on_end: Any) -> None:
        # RFC 2046 says at most 70 characters; Orthanc's STOW-RS client sends longer ones
        if not boundary or len(boundary) > MAX_BOUNDARY:
            raise MalformedBody(f"the boundary must be 1-{MAX_BOUNDARY} characters")
        self.delimiter = b"\r\n--" + boundary
        self.buf = b"\r\n"  # so that a boundary on the first line looks like the others
        self.state = "preamble"
        self.on_part, self.on_end = on_part, on_end
        self.sink = _Sink(None)
        self.parts = 0

    def feed(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.state == "preamble" or self.state == "body":
                i = self.buf.find(self.delimiter)
                if i < 0:
                    keep = len(self.delimiter) - 1
                    if self.state == "body" and len(self.buf) > keep:
                        self.sink.write(self.buf[:-keep])
                    if len(self.buf) > keep:
                        self.buf = self.buf[-keep:]
                    return
                if self.state == "body":
                    self.sink.write(self.buf[:i])
                    self.on_end()
                self.buf = self.buf[i + len(self.delimiter):]
                self.state = "delimiter"
            elif self.state == "delimiter":
                line_end = self.buf.find(b"\r\n")
                if self.buf.startswith(b"--"):
                    self.state, self.buf = "end", b""
                    return
                if line_end < 0:
                    if len(self.buf) > 1024:
                        raise MalformedBody("garbage after a boundary")
                    return
                if self.buf[:line_end].strip(b" \t"):
                    raise MalformedBody("garbage after a boundary")
                self.buf = self.buf[line_end + 2:]
                self.state = "headers"
            elif self.state == "headers":
                end = self.buf.find(b"\r\n\r\n")
                if self.buf.startswith(b"\r\n"):
                    end, skip = 0, 2
                else:
                    skip = 4
                if end < 0:
                    if len(self.buf) > MAX_PART_HEADERS:
                        raise MalformedBody(f"a part's headers are longer than "
                                            f"{MAX_PART_HEADERS} bytes")
                    return
                self.parts += 1
                if self.parts > MAX_PARTS:
                    raise MalformedBody(f"more than {MAX_PARTS} parts")
                headers = _headers(self.buf[:end])
                self.buf = self.buf[end + skip:]
                self.sink = _Sink(self.on_part(headers))
                self.state = "body"
            else:  # end: the epilogue is ignored
                self.buf = b""
                return

    def close(self) -> None:
        if self.state != "end":
            raise MalformedBody("the body ends before its closing boundary" if self.parts
                                else "the body holds no multipart/related parts")


def _headers(block: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in block.split(b"\r\n"):
        if not line.strip():
            continue
        name, sep, value = line.partition(b":")
        if not sep or not name.strip():
            raise MalformedBody("a part header without a name")
        out[name.decode("latin-1").strip().lower()] = value.decode("latin-1").strip()
    return out


def media_type(value: str) -> tuple[str, dict[str, str]]:
    """``type/subtype`` (lower case) and the parameters of a Content-Type."""
    kind, *params = value.split(";")
    out: dict[str, str] = {}
    for p in params:
        k, sep, v = p.strip().partition("=")
        if sep:
            v = v.strip()
            if len(v) >= 2 and v[0] == v[-1] == '"':
                v = v[1:-1]
            out[k.strip().lower()] = v
    return kind.strip().lower(), out


@dataclass
class Part:
    index: int
    path: Path | None
    sop_class: str | None = None
    sop_uid: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    failure: int | None = None  # a FailureReason: not stored
    reason: str = ""


@dataclass
class Outcome:
    """What a request stored and what it did not, as the STOW-RS response says it."""

    stored: list[Part] = field(default_factory=list)
    failed: list[Part] = field(default_factory=list)

    @property
    def http_status(self) -> int:
        if not self.failed:
            return 200
        return 202 if self.stored else 409

    def response(self) -> dict[str, Any]:
        """The PS3.18 response data set in DICOM JSON."""
        def uids(p: Part) -> dict[str, Any]:
            item: dict[str, Any] = {}
            if p.sop_class and valid_uid(p.sop_class):
                item["00081150"] = {"vr": "UI", "Value": [p.sop_class]}
            if p.sop_uid and valid_uid(p.sop_uid):
                item["00081155"] = {"vr": "UI", "Value": [p.sop_uid]}
            return item

        out: dict[str, Any] = {}
        if self.failed:
            out["00081198"] = {"vr": "SQ", "Value": [
                {**uids(p), "00081197": {"vr": "US", "Value": [p.failure]}}
                for p in self.failed]}
        if self.stored:
            out["00081199"] = {"vr": "SQ", "Value": [uids(p) for p in self.stored]}
        return out


class Request:
    """One STOW-RS request: parts into its scratch folder, checked, then moved."""

    def __init__(self, stow: Stow, *, peer: str, peer_port: int,
                 study_uid: str | None = None) -> None:
        self.stow, self.station = stow, stow.station
        self.peer, self.peer_port, self.study_uid = peer, peer_port, study_uid
        self.scratch = self.station.spool.tmp / f"{SCRATCH_PREFIX}{secrets.token_hex(8)}"
        self.scratch.mkdir(parents=True)
        self._lock = os.open(self.scratch / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                             0o644)
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        self.parts: list[Part] = []
        self._fh: BinaryIO | None = None

    # -- the parser's callbacks --------------------------------------------------------
    def open_part(self, headers: dict[str, str]) -> BinaryIO | None:
        part = Part(len(self.parts) + 1, None)
        self.parts.append(part)
        kind, _params = media_type(headers.get("content-type", "application/dicom"))
        if kind != "application/dicom":
            part.failure = CANNOT_UNDERSTAND
            part.reason = f"part {part.index} is {kind}, not application/dicom"
            return None
        part.path = self.scratch / f"{part.index:05d}.dcm"
        self._fh = open(part.path, "xb")  # noqa: SIM115 - closed in end_part
        return self._fh

    def end_part(self) -> None:
        fh, self._fh = self._fh, None
        part = self.parts[-1]
        if fh is None:
            return
        try:
            fh.flush()
            os.fsync(fh.fileno())
        finally:
            fh.close()
        self._check(part)

    def _check(self, part: Part) -> None:
        assert part.path is not None
        try:
            with open(part.path, "rb") as fh:
                meta = filemeta.read(fh)
            if meta is None:
                raise ValueError("not a DICOM file (PS3.10: no preamble, DICM and file "
                                 "meta information)")
            header = read_header(part.path)
        except ValueError as exc:
            part.failure, part.reason = CANNOT_UNDERSTAND, f"part {part.index}: {exc}"
            return
        except OSError as exc:
            part.failure, part.reason = OUT_OF_RESOURCES, f"part {part.index}: cannot read: {exc}"
            return
        part.sop_class = meta.sop_class
        if not header.get("sop_uid"):
            header["sop_uid"] = meta.sop_instance
        part.sop_uid, part.study_uid = header.get("sop_uid"), header.get("study_uid")
        part.series_uid = header.get("series_uid")
        why = check_uids(header)
        if why is None and meta.sop_instance != part.sop_uid:
            why = ("the file meta's Media Storage SOP Instance UID differs from the data "
                   "set's SOP Instance UID")
        if why is None and not (meta.sop_class and valid_uid(meta.sop_class)):
            why = "the file meta has no valid Media Storage SOP Class UID"
        if why is not None:
            part.failure, part.reason = CANNOT_UNDERSTAND, f"part {part.index}: {why}"
        elif self.study_uid is not None and part.study_uid != self.study_uid:
            part.failure = MISMATCH
            part.reason = (f"part {part.index}: its study {part.study_uid} is not the "
                           f"study of the request ({self.study_uid})")
        elif not self.stow.enough_space():
            part.failure = OUT_OF_RESOURCES
            part.reason = (f"less than min_free_mb={self.station.config.station.min_free_mb} "
                           f"MB free in {self.station.spool.root}")

    # -- the end --------------------------------------------------------------------------
    def commit(self) -> Outcome:
        """Move every accepted part into incoming/ (durably) and say what happened."""
        outcome = Outcome()
        by_study: dict[str, list[Part]] = {}
        for part in self.parts:
            if part.failure is None:
                by_study.setdefault(str(part.study_uid), []).append(part)
        for study_uid, parts in by_study.items():
            try:
                self.stow.move_in(study_uid, parts, self.peer, self.peer_port)
            except OSError as exc:
                for part in parts:
                    part.failure = OUT_OF_RESOURCES
                    part.reason = f"part {part.index}: cannot write: {exc}"
        for part in self.parts:
            (outcome.failed if part.failure is not None else outcome.stored).append(part)
            if part.failure is not None:
                self.stow.refused(part, self.peer, self.peer_port)
        return outcome

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        shutil.rmtree(self.scratch, ignore_errors=True)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
        finally:
            os.close(self._lock)


@dataclass
class _Pending:
    sops: set[str] = field(default_factory=set)
    duplicates: int = 0
    touched: int = 0  # requests that moved parts in: a publisher's snapshot is compared


class Stow:
    """The STOW-RS side of one station in ``dts web``: the studies it received that are
    not published yet, and the quiet-time publisher."""

    def __init__(self, station: Station) -> None:
        self.station = station
        self.cfg = station.config.stow
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._free_checked = 0.0
        self._free_ok = True

    # -- start: what a killed dts web left --------------------------------------------
    def recover(self) -> list[str]:
        """Finish publications a crash cut, remove scratch of dead requests, and adopt the
        STOW-RS studies left in incoming/ (ours: ``.study.json`` says source "stow")."""
        spool = self.station.spool
        published = recover_publications(self.station, partial=False)
        for entry in os.scandir(spool.tmp):
            if entry.name.startswith(SCRATCH_PREFIX) and entry.is_dir():
                fd = os.open(Path(entry.path) / LOCK_NAME,
                             os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a request of a live process
                finally:
                    os.close(fd)
                shutil.rmtree(entry.path, ignore_errors=True)
        for entry in os.scandir(spool.incoming):
            if not entry.is_dir() or not valid_uid(entry.name):
                continue
            try:
                meta = json.loads((Path(entry.path) / STUDY_META).read_bytes())
            except (OSError, ValueError):
                continue
            if meta.get("source") == "stow":
                with self._lock:
                    self._pending.setdefault(entry.name, _Pending())
        return published

    def enough_space(self) -> bool:
        minimum = self.station.config.station.min_free_mb
        if minimum <= 0:
            return True
        now = time.monotonic()
        if now - self._free_checked > 0.2:
            self._free_ok = self.station.spool.free_mb() >= minimum
            self._free_checked = now
        return self._free_ok

    def request(self, *, peer: str, peer_port: int, study_uid: str | None = None) -> Request:
        return Request(self, peer=peer, peer_port=peer_port, study_uid=study_uid)

    def connection(self, peer: str, peer_port: int) -> dict[str, Any]:
        return {"calling_ae": self.cfg.source, "called_ae": self.station.config.station.ae_title,
                "peer": peer, "peer_port": peer_port}

    def move_in(self, study_uid: str, parts: list[Part], peer: str, peer_port: int) -> None:
        """Rename ``parts`` into ``incoming/<study_uid>/`` while carrying the study."""
        spool = self.station.spool
        conn = self.connection(peer, peer_port)
        carrier = carriers.carry(spool, study_uid)
        try:
            study_dir = spool.incoming / study_uid
            if not study_dir.is_dir():
                study_dir.mkdir()
                fsync_dir(spool.incoming)
                first = parts[0]
                write_file_durably(study_dir / STUDY_META, dump_json({
                    **conn, "study_uid": study_uid, "received_at": isotime(),
                    "source": "stow", "sources": [conn],
                    **_identity(first)}))
            else:
                self._add_source(study_dir, conn)
            dirs: set[Path] = set()
            with self._lock:  # one step: a publisher forgets a study only if untouched
                pending = self._pending.setdefault(study_uid, _Pending())
                pending.touched += 1
            for part in parts:
                assert part.path is not None
                series_dir = study_dir / str(part.series_uid)
                if series_dir not in dirs and not series_dir.is_dir():
                    series_dir.mkdir()
                    fsync_dir(study_dir)
                dirs.add(series_dir)
                dest = series_dir / f"{part.sop_uid}.dcm"
                os.rename(part.path, dest)
                with self._lock:
                    if part.sop_uid in pending.sops:
                        pending.duplicates += 1
                    pending.sops.add(str(part.sop_uid))
            for d in dirs:
                fsync_dir(d)
        finally:
            carrier.release()

    def _add_source(self, study_dir: Path, conn: dict[str, Any]) -> None:
        """A study that exists already (another request, a C-STORE): this request's peer
        joins its sources, as a second association's would."""
        try:
            meta = json.loads((study_dir / STUDY_META).read_bytes())
        except (OSError, ValueError):
            return
        sources = list(meta.get("sources") or [])
        if conn not in sources:
            meta["sources"] = [*sources, conn]
            write_file_durably(study_dir / STUDY_META, dump_json(meta))

    def refused(self, part: Part, peer: str, peer_port: int) -> None:
        self.station.journal.emit(
            Stage.RECEIVE, Event.INSTANCE_REFUSED,
            Status.ERROR if part.failure == OUT_OF_RESOURCES else Status.WARNING,
            f"refused a STOW-RS part from {peer} with FailureReason 0x{part.failure or 0:04X}: "
            f"{part.reason}",
            study_uid=part.study_uid if valid_uid(part.study_uid) else None,
            sop_uid=part.sop_uid if valid_uid(part.sop_uid) else None,
            failure_reason=f"0x{part.failure or 0:04X}", reason=part.reason,
            **self.connection(peer, peer_port), best_effort=True)

    # -- publishing -------------------------------------------------------------------------
    def pending(self) -> list[str]:
        with self._lock:
            return sorted(self._pending)

    def publish_quiet(self, *, force: bool = False) -> list[str]:
        """Publish the STOW-RS studies nobody carried for ``stable_seconds``; job ids."""
        stable = self.station.config.station.stable_seconds
        jobs = []
        with self._lock:
            todo = {uid: (p, p.touched) for uid, p in self._pending.items()}
        for uid, (pending, touched) in todo.items():
            try:
                job_id = publish_study(self.station, uid, pending.duplicates,
                                       stable_seconds=stable, force=force)
            except Exception as exc:
                log.exception("cannot publish study %s", uid)
                self.station.journal.emit(Stage.RECEIVE, Event.PUBLISH_FAILED, Status.ERROR,
                                          f"cannot publish study {uid}: {exc}; it stays in "
                                          "incoming/ and is tried again", study_uid=uid,
                                          best_effort=True)
                continue
            if job_id == BUSY:
                continue
            with self._lock:
                if self._pending.get(uid) is pending and pending.touched == touched:
                    del self._pending[uid]
            if job_id:
                jobs.append(job_id)
        return jobs

    def start(self, stop: threading.Event) -> threading.Thread:
        """Recover, then publish quiet studies from a thread until ``stop``."""
        self.recover()
        interval = min(0.5, max(0.05, self.station.config.station.stable_seconds / 5))

        def loop() -> None:
            while not stop.wait(interval):
                try:
                    self.station.journal.report_lost()
                    recover_publications(self.station, live=True)
                    self.publish_quiet()
                except Exception:  # keep serving; the next round tries again
                    log.exception("publishing STOW-RS studies failed")

        thread = threading.Thread(target=loop, name="dts-stow", daemon=True)
        thread.start()
        return thread


def _identity(part: Part) -> dict[str, Any]:
    """Patient ID and accession of a study's first part (as the receiver keeps them)."""
    if part.path is None:
        return {}
    try:
        header = read_header(part.path)
    except (OSError, ValueError):
        return {}
    return {"patient_id": header.get("patient_id"), "accession": header.get("accession")}
