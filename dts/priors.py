"""Owns prior studies: the patient's earlier studies a stream asks for with ``priors``.

Before a run (``fetch``, called by the run stage), dts C-FINDs the stream's
``priors.from`` destination at STUDY level by the job's PatientID, picks the most
recent earlier studies that match ``within``, ``modality`` and ``description``
(``choose``) and retrieves each into the job as
``prior/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``:

- C-GET (``method = "get"``): the peer sends the instances back on the same
  association (``dts.dicom.qr``), dts acting as their storage SCP there
  (``_GetStore``); every instance is checked (its study, its patient, its UIDs) and on
  disk (fsync) before success is answered. One of another patient is refused with a failure status and fails the job.
- C-MOVE (``method = "move"``): the peer opens an association of its own to dts's
  receiver (``dts receive`` or ``dts watch``, another process). Before the C-MOVE the
  run stage registers what it waits for in ``spool/priors/expect/`` and the receiver
  routes the expected study's instances to ``spool/priors/<job>/`` instead of
  ``incoming/``, refusing what is not the expected patient's (``dts.expectations``).
  After the C-MOVE's final response the expectation is removed and the files are
  renamed into the job; a refusal the receiver noted fails the job naming it.

The processing sees the priors as the selection ``prior`` (``/input/prior/<Study>/
<Series>/``, ``link_view``) and in task.json; job.json's ``priors`` records what was
fetched. Priors never leave the station: the output check refuses any result that is
a prior instance or lies in a prior study, ``allow_new_study`` or not (``facts``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from .config import PRIOR_SELECTION, Priors, Stream
from .dicom import qr
from .dicom.header import read_header
from .dicom.store import NetSettings, Peer
from .dicom.uid import valid_uid
from .errors import JobFailed, TemporaryFailure
from .expectations import (
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    REFUSED_FILE,
    SUCCESS,
    expect,
    forget,
    place,
    refusals,
    sweep,
)
from .jobrecord import JobRecord, PriorsRecord, PriorStudyEntry
from .journal import Event, Stage, Status
from .sender import peer_of
from .spool import Job, fsync_dir, isotime
from .station import Station
from .status import service_state

log = logging.getLogger(__name__)

PRIOR_DIR = "prior"            # <job>/prior: the fetched priors
FETCH_DIR = ".prior-fetch"     # <job>/.prior-fetch: being retrieved (renamed to prior/)
MOVE_DESTINATION_UNKNOWN = 0xA801  # a C-MOVE's peer does not know the destination AE


class PriorsMissing(TemporaryFailure):
    """``required`` priors were not found: tried again until ``max_attempts``."""

_WILDCARDS = re.compile(r"[*?\\]")


# -- what the C-FIND answered --------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One study the C-FIND answered with."""

    study_uid: str
    date: str | None = None
    time: str | None = None
    description: str | None = None
    modalities: tuple[str, ...] = ()
    sop_classes: tuple[str, ...] = ()

    @property
    def when(self) -> datetime | None:
        return _when(self.date, self.time)


@dataclass(frozen=True)
class Current:
    """The job's own study: what priors are compared with."""

    study_uid: str
    patient_id: str
    date: str | None
    time: str | None
    modalities: frozenset[str]

    @property
    def when(self) -> datetime | None:
        return _when(self.date, self.time)


def _when(date: str | None, time_: str | None) -> datetime | None:
    if not date or not re.fullmatch(r"\d{8}", date.strip()):
        return None
    t = re.sub(r"[^0-9]", "", (time_ or "").split(".")[0])[:6].ljust(6, "0")
    try:
        return datetime.strptime(date.strip() + t, "%Y%m%d%H%M%S")
    except ValueError:
        try:
            return datetime.strptime(date.strip(), "%Y%m%d")
        except ValueError:
            return None


def choose(candidates: list[Candidate], current: Current, cfg: Priors) -> list[Candidate]:
    """The most recent earlier studies that match the stream's ``priors``: never the
    current study, never an undated one or one not before it, at most ``max``."""
    now = current.when
    picked: list[tuple[datetime, Candidate]] = []
    for c in candidates:
        when = c.when
        if c.study_uid == current.study_uid or when is None:
            continue
        if now is not None:
            if when >= now:
                continue
            if cfg.within is not None and now - when > timedelta(seconds=cfg.within):
                continue
        if cfg.modality == "same":
            if not current.modalities.intersection(c.modalities):
                continue
        elif cfg.modality_pattern is not None:
            pattern = cfg.modality_pattern
            if not any(pattern.fullmatch(m) for m in c.modalities):
                continue
        if cfg.description is not None and not cfg.description.search(c.description or ""):
            continue
        picked.append((when, c))
    picked.sort(key=lambda p: (p[0], p[1].study_uid), reverse=True)
    return [c for _w, c in picked[:cfg.max]]


def current_study(job: Job, data: JobRecord) -> Current:
    """The job's study from job.json and study.json (a header of input/ for what a
    study.json made elsewhere may lack)."""
    try:
        doc = json.loads((job.path / "study.json").read_text())
    except (OSError, ValueError):
        doc = {}
    if not isinstance(doc, dict):
        doc = {}
    modalities = {str(m) for m in doc.get("ModalitiesInStudy") or [] if m}
    modalities |= {str(s.get("Modality")) for s in doc.get("series") or []
                   if isinstance(s, dict) and s.get("Modality")}
    date, time_ = doc.get("StudyDate"), doc.get("StudyTime")
    if not modalities or not date:
        head = _first_header(job.input_dir)
        modalities = modalities or ({head["Modality"]} if head.get("Modality") else set())
        date, time_ = date or head.get("StudyDate"), time_ or head.get("StudyTime")
    return Current(study_uid=str(data.get("study_uid") or doc.get("StudyInstanceUID") or ""),
                   patient_id=str(data.get("patient_id") or "").strip(),
                   date=str(date) if date else None, time=str(time_) if time_ else None,
                   modalities=frozenset(modalities))


def _first_header(input_dir: Path) -> dict[str, str]:
    import pydicom

    for series in sorted(input_dir.iterdir()) if input_dir.is_dir() else []:
        for f in sorted(series.glob("*.dcm")):
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True,
                                     specific_tags=["Modality", "StudyDate", "StudyTime"])
            except Exception as exc:  # noqa: BLE001 (pydicom raises many kinds on garbage)
                log.debug("priors: %s unreadable: %s", f, exc)
                continue
            return {k: str(ds.get(k, "") or "") for k in ("Modality", "StudyDate", "StudyTime")}
    return {}


# -- talking to the PACS ---------------------------------------------------------------


@dataclass
class Network:
    """Where and how to reach ``priors.from`` (its destination's AE title, address,
    calling AE title and TLS; the station's timeouts and PDU size)."""

    peer: Peer
    net: NetSettings
    max_pdu: int

    @classmethod
    def of(cls, station: Station, cfg: Priors) -> Network:
        st = station.config.station
        return cls(peer=peer_of(station.config.destinations[cfg.source], st),
                   net=NetSettings.of(st), max_pdu=st.max_pdu)

    def __str__(self) -> str:
        return str(self.peer)


def query(net: Network, patient_id: str) -> tuple[list[Candidate], list[str]]:
    """C-FIND at STUDY level by ``patient_id``: the studies, and why answers were
    ignored (invalid UIDs, another PatientID than asked for)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientID = patient_id
    for keyword in ("StudyInstanceUID", "StudyDate", "StudyTime", "StudyDescription",
                    "ModalitiesInStudy", "SOPClassesInStudy"):
        setattr(ds, keyword, "")
    try:
        answers, final = qr.find(net.peer, net.net, ds, max_pdu=net.max_pdu)
    except qr.NetworkError as exc:
        raise TemporaryFailure(f"priors: {exc}") from None
    code = int(final.Status)
    if code != SUCCESS and not 0xB000 <= code <= 0xBFFF:
        raise TemporaryFailure(f"priors: {net} answered the C-FIND with status 0x{code:04X}")
    found: list[Candidate] = []
    ignored: list[str] = []
    for ident in answers:
        candidate, why = _candidate(ident, patient_id)
        if candidate is None:
            ignored.append(why)
            log.warning("priors: ignored a C-FIND answer of %s: %s", net, why)
        else:
            found.append(candidate)
    return found, ignored


def _text(ident: Dataset, keyword: str) -> str | None:
    try:
        value = ident.get(keyword)
    except Exception:  # noqa: BLE001 (a value pydicom cannot decode)
        return None
    if value is None or value == "":
        return None
    return str(value).strip("\0 ") or None


def _list(ident: Dataset, keyword: str) -> tuple[str, ...]:
    try:
        value = ident.get(keyword)
    except Exception:  # noqa: BLE001
        return ()
    if value is None or value == "":
        return ()
    items = [value] if isinstance(value, str) else list(value)
    return tuple(t for t in (str(v).strip("\0 ") for v in items) if t)


def _candidate(ident: Dataset, patient_id: str) -> tuple[Candidate | None, str]:
    uid = _text(ident, "StudyInstanceUID")
    if not valid_uid(uid, conformant=True):
        shown = repr(uid if uid is None or len(uid) <= 70 else uid[:67] + "...")
        return None, f"StudyInstanceUID {shown} is not a valid UID"
    assert uid is not None
    answered = _text(ident, "PatientID")
    if answered is not None and answered != patient_id:
        return None, f"study {uid} has another PatientID than was asked for"
    classes = tuple(c for c in _list(ident, "SOPClassesInStudy") if valid_uid(c, conformant=True))
    return Candidate(study_uid=uid, date=_text(ident, "StudyDate"), time=_text(ident, "StudyTime"),
                     description=_text(ident, "StudyDescription"),
                     modalities=_list(ident, "ModalitiesInStudy"), sop_classes=classes), ""


# -- retrieving ------------------------------------------------------------------------


@dataclass
class Fetched:
    """The instances of one study now on disk, and what was refused."""

    series: dict[str, int] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)

    @property
    def instances(self) -> int:
        return sum(self.series.values())


def check_instance(header: dict[str, str | None], study_uid: str,
                   patient_id: str) -> str | None:
    """Why a delivered instance is not one of the prior asked for, or None."""
    for key, name in (("study_uid", "Study"), ("series_uid", "Series"), ("sop_uid", "SOP")):
        if not valid_uid(header.get(key)):
            return f"its {name} Instance UID is missing or not a valid UID"
    if header.get("study_uid") != study_uid:
        return f"it belongs to study {header.get('study_uid')}, not to {study_uid} as asked"
    if (header.get("patient_id") or "").strip() != patient_id:
        # never the IDs themselves: the other patient's ID does not go into a log
        return "its PatientID is another patient's than the job's"
    return None


class _GetStore:
    """The storage SCP of a C-GET's association: one study's instances into ``root``."""

    def __init__(self, root: Path, tmp: Path, study_uid: str, patient_id: str) -> None:
        self.root, self.tmp = root, tmp
        self.study_uid, self.patient_id = study_uid, patient_id
        self.fetched = Fetched()

    def __call__(self, event: Any) -> int:
        path, own = qr.received_file(event, self.tmp)
        moved = own or os.path.dirname(path) == str(self.tmp)
        try:
            try:
                header = read_header(path)
            except ValueError as exc:
                return self._refuse(event, f"not DICOM: {exc}")
            if not header.get("sop_uid"):
                header["sop_uid"] = str(event.request.AffectedSOPInstanceUID or "")
            why = check_instance(header, self.study_uid, self.patient_id)
            if why is not None:
                return self._refuse(event, why)
            series, sop = str(header["series_uid"]), str(header["sop_uid"])
            try:
                place(path, str(self.root / self.study_uid / series), sop + ".dcm",
                       str(self.tmp), move=moved)
            except OSError as exc:
                log.error("priors: cannot store %s: %s", sop, exc)
                return OUT_OF_RESOURCES
            self.fetched.series[series] = self.fetched.series.get(series, 0) + 1
            return SUCCESS
        finally:
            try:  # refused, or a copy: nothing is left behind in tmp/
                os.unlink(path)
            except FileNotFoundError:
                pass

    def _refuse(self, event: Any, why: str) -> int:
        sop = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "?")
        text = f"instance {sop if valid_uid(sop) else '?'}: {why}"
        self.fetched.refused.append(text)
        log.warning("priors: refused %s", text)
        return CANNOT_UNDERSTAND


def _identifier(study_uid: str, patient_id: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study_uid
    ds.PatientID = patient_id  # a PACS that keys on the patient too finds the study
    return ds


def _judge(final: Dataset, net: Network, what: str, study_uid: str) -> None:
    """A C-GET/C-MOVE's final status: success, or a warning without failed
    sub-operations; anything else is temporary (the PACS may deliver next time)."""
    code = int(final.Status)
    _done, failed, _warned = qr.suboperations(final)
    if code != SUCCESS and not (0xB000 <= code <= 0xBFFF and not failed):
        raise TemporaryFailure(f"priors: {net} answered the {what} of study {study_uid} with "
                               f"0x{code:04X} ({failed} instance(s) not delivered)")


def retrieve_get(net: Network, candidate: Candidate, patient_id: str, root: Path,
                 tmp: Path) -> Fetched:
    """C-GET one study into ``root/<Study>/<Series>/<SOP>.dcm``: the SOP classes the
    PACS named in SOPClassesInStudy (else the common ones) accepted in the SCP role."""
    store = _GetStore(root, tmp, candidate.study_uid, patient_id)
    classes = list(candidate.sop_classes) or qr.common_storage_classes()
    try:
        final = qr.get(net.peer, net.net, _identifier(candidate.study_uid, patient_id),
                       classes, store, max_pdu=net.max_pdu)
    except qr.NetworkError as exc:
        raise TemporaryFailure(f"priors: {exc}") from None
    if not store.fetched.refused:
        _judge(final, net, "C-GET", candidate.study_uid)
    return store.fetched


def retrieve_move(station: Station, net: Network, job: Job, candidate: Candidate,
                  patient_id: str, root: Path) -> Fetched:
    """C-MOVE one study to this station's receiver, which routes it to
    ``spool/priors/<job>/`` (the module docstring); then into ``root``."""

    spool = station.spool
    ae_title = station.config.station.ae_title
    if not service_state(spool, "receiver").get("running"):
        raise TemporaryFailure(f"priors: no receiver runs on spool {spool.root} (dts receive "
                               "or dts watch): a C-MOVE has nowhere to deliver to")
    staging = spool.priors / job.id
    shutil.rmtree(staging / candidate.study_uid, ignore_errors=True)
    (staging / REFUSED_FILE).unlink(missing_ok=True)
    expectation = expect(spool, candidate.study_uid, job.id, patient_id, net.peer.ae_title)
    try:
        final = qr.move(net.peer, net.net, _identifier(candidate.study_uid, patient_id),
                        ae_title, max_pdu=net.max_pdu)
    except qr.NetworkError as exc:
        raise TemporaryFailure(f"priors: {exc}") from None
    finally:
        forget(expectation)
    fetched = Fetched(refused=refusals(staging))
    study_dir = staging / candidate.study_uid
    if study_dir.is_dir():
        target = root / candidate.study_uid
        shutil.rmtree(target, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
        os.rename(study_dir, target)
        fsync_dir(root)
        fsync_dir(staging)
        fetched.series = {s.name: sum(1 for f in s.iterdir() if f.suffix == ".dcm")
                          for s in sorted(target.iterdir()) if s.is_dir()}
    if fetched.refused:
        return fetched
    if int(final.Status) == MOVE_DESTINATION_UNKNOWN:
        raise JobFailed(f"priors: {net} does not know the move destination {ae_title!r} "
                        f"(0xA801): add this station ({ae_title}, its host and port) to the "
                        "PACS's DICOM nodes")
    _judge(final, net, "C-MOVE", candidate.study_uid)
    return fetched


# -- the run stage's part ------------------------------------------------------------------


def fetch(station: Station, job: Job, stream: Stream) -> PriorsRecord:
    """Query, choose and retrieve the stream's priors into ``<job>/prior/`` and record
    them in job.json (``priors``). TemporaryFailure: the PACS is down, or ``required``
    priors were not found (yet); JobFailed: an instance of another patient (or study)
    was delivered, or the job cannot be asked about (no usable PatientID)."""
    cfg = stream.priors
    assert cfg is not None
    data = job.read()
    current = current_study(job, data)
    net = Network.of(station, cfg)
    sweep(station.spool)
    fetch_root = job.path / FETCH_DIR
    shutil.rmtree(fetch_root, ignore_errors=True)
    shutil.rmtree(station.spool.priors / job.id, ignore_errors=True)
    record: PriorsRecord = {"source": cfg.source, "method": cfg.method, "found": 0,
                            "ignored": 0, "studies": []}
    if not current.patient_id or _WILDCARDS.search(current.patient_id):
        # an empty PatientID (or one with * ? \) would match other patients' studies
        why = ("the job has no PatientID" if not current.patient_id
               else "the job's PatientID holds C-FIND wildcard characters (* ? \\)")
        if cfg.required:
            raise JobFailed(f"priors: {why}; required priors cannot be queried")
        return _record(station, job, record, f"no priors queried: {why}", missing=True)
    candidates, ignored = query(net, current.patient_id)
    chosen = choose(candidates, current, cfg)
    record["found"], record["ignored"] = len(candidates), len(ignored)
    note = (f"; ignored {len(ignored)} C-FIND answer(s): {'; '.join(ignored[:3])}"
            if ignored else "")
    if not chosen:
        if cfg.required:
            _record(station, job, record, f"no earlier study of the patient at {net} matches "
                    f"the stream's priors{note}", missing=True, status=Status.WARNING)
            raise PriorsMissing(f"priors: required, but no earlier study at {net} matches")
        return _record(station, job, record, f"no earlier study of the patient at {net} "
                       f"matches; the run goes ahead without priors{note}", missing=True)
    fetch_root.mkdir()
    try:
        for c in chosen:
            record["studies"].append(_retrieve(station, net, job, c, current.patient_id,
                                               cfg.method, fetch_root))
    except BaseException:
        shutil.rmtree(fetch_root, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(station.spool.priors / job.id, ignore_errors=True)
    final = job.path / PRIOR_DIR
    shutil.rmtree(final, ignore_errors=True)
    os.rename(fetch_root, final)
    fsync_dir(job.path)
    studies = record["studies"]
    what = ", ".join(f"{s['study_uid']} ({s.get('date') or 'undated'}, {s['instances']} "
                     "instance(s))" for s in studies)
    noun = "study" if len(studies) == 1 else "studies"
    return _record(station, job, record, f"{len(studies)} prior {noun} from {net} by "
                   f"C-{cfg.method.upper()}: {what}{note}",
                   status=Status.WARNING if ignored else Status.OK)


def _retrieve(station: Station, net: Network, job: Job, c: Candidate, patient_id: str,
              method: str, root: Path) -> PriorStudyEntry:
    if method == "move":
        got = retrieve_move(station, net, job, c, patient_id, root)
    else:
        got = retrieve_get(net, c, patient_id, root, station.spool.tmp)
    if got.refused:
        more = len(got.refused) - 5
        raise JobFailed(f"priors: {net} delivered what was not asked for while retrieving "
                        f"study {c.study_uid} by C-{method.upper()}, refused: "
                        + "; ".join(got.refused[:5]) + (f" (and {more} more)" if more > 0 else ""))
    return {"study_uid": c.study_uid, "date": c.date, "time": c.time,
            "description": c.description, "modalities": list(c.modalities),
            "instances": got.instances, "series": dict(got.series)}


def _record(station: Station, job: Job, record: PriorsRecord, message: str, *,
            missing: bool = False, status: Status = Status.INFO) -> PriorsRecord:
    record["fetched_at"] = isotime()
    if missing:
        shutil.rmtree(job.path / PRIOR_DIR, ignore_errors=True)
    data = job.read()
    data["priors"] = record
    job.write(data)
    station.journal.emit(Stage.RUN, Event.PRIORS_MISSING if missing else Event.PRIORS_FETCHED,
                         status, message, job=job, job_data=data,
                         source=record.get("source"), method=record.get("method"),
                         studies=[s["study_uid"] for s in record.get("studies", [])],
                         ignored=record.get("ignored", 0))
    return record


# -- the job's view and output check ------------------------------------------------------


def link_view(job: Job, view: Path, data: JobRecord,
              readable: Any = None) -> tuple[dict[str, list[str]], list[dict[str, Any]]]:
    """Hard-link ``<job>/prior/`` into ``view/prior/<Study>/<Series>/``; task.json's
    ``files["prior"]`` ({series: [paths]}) and ``priors`` (one entry per study)."""
    root = job.path / PRIOR_DIR
    (view / PRIOR_SELECTION).mkdir()
    files: dict[str, list[str]] = {}
    listed: list[dict[str, Any]] = []
    record = data.get("priors") or {}
    for study in record.get("studies") or []:
        uid = str(study.get("study_uid"))
        src_study = root / uid
        if not valid_uid(uid) or not src_study.is_dir():
            continue
        series_list = []
        for series in sorted(p for p in src_study.iterdir() if p.is_dir()):
            names = sorted(f.name for f in series.iterdir() if f.suffix == ".dcm")
            dest = view / PRIOR_SELECTION / uid / series.name
            dest.mkdir(parents=True)
            for name in names:
                os.link(series / name, dest / name)
                if readable is not None:
                    readable(dest / name)
            files[series.name] = [f"{PRIOR_SELECTION}/{uid}/{series.name}/{n}" for n in names]
            series_list.append({"series_uid": series.name, "instances": len(names),
                                "path": f"{PRIOR_SELECTION}/{uid}/{series.name}"})
        listed.append({"study_uid": uid, "date": study.get("date"), "time": study.get("time"),
                       "description": study.get("description"),
                       "modalities": study.get("modalities") or [],
                       "path": f"{PRIOR_SELECTION}/{uid}", "series": series_list})
    return files, listed


def facts(job: Job) -> tuple[set[str], set[str]]:
    """(study UIDs, SOP Instance UIDs) of the job's priors: no result may be one of them
    or lie in one of them (files are named by their validated SOP Instance UID)."""
    root = job.path / PRIOR_DIR
    studies: set[str] = set()
    sops: set[str] = set()
    if not root.is_dir():
        return studies, sops
    for study in root.iterdir():
        if study.is_dir():
            studies.add(study.name)
            for series in study.iterdir():
                if series.is_dir():
                    sops.update(f.stem for f in series.iterdir() if f.suffix == ".dcm")
    return studies, sops
