"""Owns prior studies: the patient's earlier studies a stream asks for with ``priors``.

Before a run (``fetch``, called by the run stage), dts C-FINDs the stream's
``priors.from`` destination at STUDY level by the job's PatientID, picks the most
recent earlier studies that match ``within``, ``modality`` and ``description``
(``choose``) and retrieves each into the job as
``prior/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``:

- C-GET (``method = "get"``): the peer sends the instances back on the same
  association, dts acting as their storage SCP there (``_GetStore``); every instance
  is checked (its study, its patient, its UIDs) and on disk (fsync) before success is
  answered. One of another patient is refused with a failure status and fails the job.
- C-MOVE (``method = "move"``): the peer opens an association of its own to dts's
  receiver (``dts receive`` or ``dts watch``, another process). Before the C-MOVE the
  run stage registers what it waits for: ``spool/priors/expect/<StudyInstanceUID>/
  <job>.json`` (job, patient, the peer's AE title, a deadline; written under tmp/ and
  renamed). The receiver asks ``route`` about each instance of a study that has such a
  folder: an instance of an expected study, from that AE title and of that patient, is
  stored (fsync first) in ``spool/priors/<job>/<Study>/<Series>/<SOP>.dcm``, never in
  ``incoming/``, so it never becomes a job of its own; anything else of that study is
  refused and written down in ``spool/priors/<job>/refused.jsonl`` for the run stage
  to name. After the C-MOVE's final response the expectation is removed and the files
  are renamed into the job. An expectation left by a run stage that died is ignored
  after its deadline and removed (``sweep``; ``dts clean`` removes folders left over).

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
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from .config import PRIOR_SELECTION, Destination, Priors, Stream
from .dicom.header import read_header
from .dicom.uid import valid_uid
from .errors import JobFailed, TemporaryFailure
from .jobrecord import JobRecord, PriorsRecord, PriorStudyEntry
from .journal import Event, Stage, Status
from .spool import Job, Spool, dump_json, fsync_dir, isotime, parse_isotime, utcnow
from .station import Station

log = logging.getLogger(__name__)

PRIOR_DIR = "prior"            # <job>/prior: the fetched priors
FETCH_DIR = ".prior-fetch"     # <job>/.prior-fetch: being retrieved (renamed to prior/)
EXPECT_DIR = "expect"          # spool/priors/expect/<Study>/<job>.json
REFUSED_FILE = "refused.jsonl"  # spool/priors/<job>/refused.jsonl
# How long an expectation holds after the C-MOVE began; the run stage removes it as soon
# as the C-MOVE ends, so this only matters after it died.
EXPECT_SECONDS = 3600.0

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700      # "refused for now": a sender may try again later
CANNOT_UNDERSTAND = 0xC000     # refused for good: not what was asked for
MOVE_DESTINATION_UNKNOWN = 0xA801
_PENDING = (0xFF00, 0xFF01)


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
    """Where and how to reach ``priors.from``."""

    dest: Destination
    calling_ae: str
    timeout: float        # DIMSE: for each response
    network_timeout: float
    max_pdu: int

    @classmethod
    def of(cls, station: Station, cfg: Priors) -> Network:
        st = station.config.station
        dest = station.config.destinations[cfg.source]
        return cls(dest=dest, calling_ae=dest.calling_ae or st.ae_title,
                   timeout=st.dimse_timeout, network_timeout=st.network_timeout,
                   max_pdu=st.max_pdu)

    def __str__(self) -> str:
        d = self.dest
        return f"{d.name} ({d.ae_title}@{d.host}:{d.port})"

    def associate(self, contexts: list[tuple[str, list[str] | None]],
                  roles: list[Any] | None = None,
                  handlers: list[Any] | None = None) -> Any:
        """An established association, or TemporaryFailure (the PACS is down)."""
        from .dicom import ae as dicom_ae
        from .sender import tls_context

        d = self.dest
        assert d.ae_title and d.host and d.port
        ae = dicom_ae.make_ae(self.calling_ae, max_pdu=self.max_pdu,
                              acse_timeout=min(self.network_timeout, 30.0),
                              dimse_timeout=self.timeout, network_timeout=self.network_timeout,
                              connection_timeout=min(self.network_timeout, 10.0))
        for abstract, syntaxes in contexts:
            if syntaxes is None:
                ae.add_requested_context(abstract)
            else:
                ae.add_requested_context(abstract, syntaxes)
        tls = tls_context(d)
        tls_args = (tls, (d.tls.server_name if d.tls else None) or d.host) if tls else None
        try:
            assoc = ae.associate(d.host, d.port, ae_title=d.ae_title, ext_neg=roles or None,
                                 evt_handlers=handlers or None, tls_args=tls_args)
        except (OSError, RuntimeError) as exc:
            raise TemporaryFailure(f"priors: cannot reach {self}: {exc}") from None
        if assoc.is_rejected:
            raise TemporaryFailure(f"priors: {self} rejected the association from "
                                   f"{self.calling_ae}")
        if not assoc.is_established:
            raise TemporaryFailure(f"priors: cannot reach {self}")
        if not assoc.accepted_contexts:
            assoc.release()
            raise TemporaryFailure(f"priors: {self} accepted none of the presentation contexts "
                                   "proposed")
        dicom_ae.park_reactor(assoc)
        return assoc


def _status(ds: Any) -> int | None:
    return int(ds.Status) if ds is not None and "Status" in ds else None


def query(net: Network, patient_id: str) -> tuple[list[Candidate], list[str]]:
    """C-FIND at STUDY level by ``patient_id``: the studies, and why answers were
    ignored (invalid UIDs, another PatientID than asked for)."""
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND  # type: ignore[attr-defined]

    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientID = patient_id
    for keyword in ("StudyInstanceUID", "StudyDate", "StudyTime", "StudyDescription",
                    "ModalitiesInStudy", "SOPClassesInStudy", "AccessionNumber"):
        setattr(ds, keyword, "")
    assoc = net.associate([(FIND, None)])
    found: list[Candidate] = []
    ignored: list[str] = []
    final: int | None = None
    try:
        for status, ident in assoc.send_c_find(ds, FIND):
            code = _status(status)
            if code is None:
                raise TemporaryFailure(f"priors: {net} did not answer the C-FIND "
                                       f"(within {net.timeout:g} s, or it aborted)")
            if code in _PENDING:
                if ident is None:
                    continue
                candidate, why = _candidate(ident, patient_id)
                if candidate is None:
                    ignored.append(why)
                    log.warning("priors: ignored a C-FIND answer of %s: %s", net, why)
                else:
                    found.append(candidate)
            else:
                final = code
    finally:
        if assoc.is_established:
            assoc.release()
    if final is not None and final != SUCCESS and not 0xB000 <= final <= 0xBFFF:
        raise TemporaryFailure(f"priors: {net} answered the C-FIND with status 0x{final:04X}")
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


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _place(src: str, dest_dir: str, name: str, tmp: str, *, move: bool) -> str:
    """Put the received file ``src`` as ``dest_dir/name`` durably (renamed when ``move``
    and on the same filesystem, else copied through ``tmp``)."""
    new = not os.path.isdir(dest_dir)
    os.makedirs(dest_dir, exist_ok=True)
    if new:
        fsync_dir(os.path.dirname(dest_dir))
    dest = os.path.join(dest_dir, name)
    if move:
        _fsync_file(src)
        os.rename(src, dest)
    else:
        part = os.path.join(tmp, f".prior-copy-{os.getpid()}-{name}")
        shutil.copyfile(src, part)
        _fsync_file(part)
        os.rename(part, dest)
    fsync_dir(dest_dir)
    return dest


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
        own: str | None = None
        received = getattr(event.request, "_dataset_path", None)
        if isinstance(received, (str, os.PathLike)):  # into a file (dts watch's receiver)
            path = str(received)
        else:
            own = str(self.tmp / f".prior-get-{os.getpid()}-{time.monotonic_ns()}.dcm")
            with open(own, "wb") as fh:
                fh.write(event.encoded_dataset())
            path = own
        moved = os.path.dirname(path) == str(self.tmp)
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
                _place(path, str(self.root / self.study_uid / series), sop + ".dcm",
                       str(self.tmp), move=moved)
            except OSError as exc:
                log.error("priors: cannot store %s: %s", sop, exc)
                return OUT_OF_RESOURCES
            self.fetched.series[series] = self.fetched.series.get(series, 0) + 1
            return SUCCESS
        finally:
            for leftover in (own, path):
                if leftover:
                    try:
                        os.unlink(leftover)
                    except FileNotFoundError:
                        pass

    def _refuse(self, event: Any, why: str) -> int:
        sop = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "?")
        text = f"instance {sop if valid_uid(sop) else '?'}: {why}"
        self.fetched.refused.append(text)
        log.warning("priors: refused %s", text)
        return CANNOT_UNDERSTAND


def _storage_classes(candidate: Candidate) -> list[str]:
    """The SOP classes to accept on a C-GET: what the study holds, when the PACS said
    so (SOPClassesInStudy), else the common ones (a context each, 127 at most)."""
    import pynetdicom

    if candidate.sop_classes:
        return list(dict.fromkeys(candidate.sop_classes))[:127]
    return [str(cx.abstract_syntax) for cx in pynetdicom.StoragePresentationContexts][:127]


def _transfer_syntaxes() -> list[str]:
    import pynetdicom
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    first = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    return first + [str(t) for t in pynetdicom.ALL_TRANSFER_SYNTAXES if t not in first]


def _identifier(study_uid: str, patient_id: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study_uid
    ds.PatientID = patient_id  # a PACS that keys on the patient too finds the study
    return ds


def _final(responses: Any, net: Network, what: str) -> Dataset:
    last: Dataset | None = None
    for status, _ident in responses:
        if _status(status) is None:
            raise TemporaryFailure(f"priors: {net} did not answer the {what} (within "
                                   f"{net.timeout:g} s, or it aborted)")
        last = status
    if last is None:
        raise TemporaryFailure(f"priors: {net} did not answer the {what}")
    return last


def _suboperations(status: Dataset) -> tuple[int, int]:
    """(failed, warning) sub-operations a final C-GET/C-MOVE response reports."""
    return (int(status.get("NumberOfFailedSuboperations", 0) or 0),
            int(status.get("NumberOfWarningSuboperations", 0) or 0))


def retrieve_get(net: Network, candidate: Candidate, patient_id: str, root: Path,
                 tmp: Path) -> Fetched:
    """C-GET one study into ``root/<Study>/<Series>/<SOP>.dcm``."""
    from pynetdicom import build_role, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET  # type: ignore[attr-defined]

    classes = _storage_classes(candidate)
    syntaxes = _transfer_syntaxes()
    store = _GetStore(root, tmp, candidate.study_uid, patient_id)
    assoc = net.associate([(GET, None)] + [(c, syntaxes) for c in classes],
                          roles=[build_role(c, scp_role=True) for c in classes],
                          handlers=[(evt.EVT_C_STORE, store)])
    try:
        final = _final(assoc.send_c_get(_identifier(candidate.study_uid, patient_id), GET),
                       net, "C-GET")
    finally:
        if assoc.is_established:
            assoc.release()
    code = int(final.Status)
    if store.fetched.refused:
        return store.fetched
    failed, _warned = _suboperations(final)
    if code != SUCCESS and not (0xB000 <= code <= 0xBFFF and not failed):
        raise TemporaryFailure(f"priors: {net} answered the C-GET of study "
                               f"{candidate.study_uid} with 0x{code:04X} ({failed} instance(s) "
                               "not delivered)")
    return store.fetched


def retrieve_move(station: Station, net: Network, job: Job, candidate: Candidate,
                  patient_id: str, root: Path) -> Fetched:
    """C-MOVE one study to this station's receiver, which routes it to
    ``spool/priors/<job>/`` (the module docstring); then into ``root``."""
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE  # type: ignore[attr-defined]

    from .status import service_state

    spool = station.spool
    ae_title = station.config.station.ae_title
    if not service_state(spool, "receiver").get("running"):
        raise TemporaryFailure(f"priors: no receiver runs on spool {spool.root} (dts receive "
                               "or dts watch): a C-MOVE has nowhere to deliver to")
    staging = spool.priors / job.id
    shutil.rmtree(staging / candidate.study_uid, ignore_errors=True)
    (staging / REFUSED_FILE).unlink(missing_ok=True)
    assert net.dest.ae_title
    expectation = expect(spool, candidate.study_uid, job.id, patient_id, net.dest.ae_title)
    try:
        assoc = net.associate([(MOVE, None)])
        try:
            final = _final(assoc.send_c_move(_identifier(candidate.study_uid, patient_id),
                                             ae_title, MOVE), net, "C-MOVE")
        finally:
            if assoc.is_established:
                assoc.release()
    finally:
        forget(expectation)
    fetched = Fetched(refused=_refusals(staging))
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
    code = int(final.Status)
    failed, _warned = _suboperations(final)
    if code == MOVE_DESTINATION_UNKNOWN:
        raise JobFailed(f"priors: {net} does not know the move destination {ae_title!r} "
                        f"(0xA801): add this station ({ae_title}, its host and port) to the "
                        "PACS's DICOM nodes")
    if code != SUCCESS and not (0xB000 <= code <= 0xBFFF and not failed):
        raise TemporaryFailure(f"priors: {net} answered the C-MOVE of study "
                               f"{candidate.study_uid} to {ae_title} with 0x{code:04X} "
                               f"({failed} instance(s) not delivered)")
    return fetched


# -- expectations (C-MOVE) ---------------------------------------------------------------


def expect(spool: Spool, study_uid: str, job_id: str, patient_id: str, calling_ae: str,
           seconds: float = EXPECT_SECONDS) -> Path:
    """Register that ``job_id`` waits for ``study_uid`` from ``calling_ae`` (atomic)."""
    folder = spool.priors / EXPECT_DIR / study_uid
    body = dump_json({"job": job_id, "study_uid": study_uid, "patient_id": patient_id,
                      "calling_ae": calling_ae, "created_at": isotime(),
                      "deadline": isotime(utcnow() + timedelta(seconds=seconds))})
    part = spool.tmp / f".prior-expect-{job_id}-{study_uid}.json"
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    dest = folder / f"{job_id}.json"
    for _ in range(5):  # another job's forget() may remove the empty folder meanwhile
        folder.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(part, dest)
            break
        except FileNotFoundError:
            continue
    else:
        part.unlink(missing_ok=True)
        raise TemporaryFailure(f"priors: cannot register the expected study {study_uid}")
    fsync_dir(folder)
    fsync_dir(folder.parent)
    return dest


def forget(expectation: Path) -> None:
    expectation.unlink(missing_ok=True)
    try:
        expectation.parent.rmdir()
    except OSError:
        pass  # another job waits for the same study


def expected(expect_root: str, study_uid: str) -> bool:
    """Whether some job waits for ``study_uid`` (one stat: asked for every instance)."""
    return os.path.isdir(os.path.join(expect_root, study_uid))


def _live(folder: str, now: datetime) -> list[dict[str, Any]]:
    out = []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    for name in names:
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as fh:
                entry = json.loads(fh.read(65536))
            deadline = parse_isotime(str(entry["deadline"]))
            job_id = str(entry["job"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if deadline < now or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", job_id):
            continue  # stale: the run stage that wrote it is gone (sweep removes it)
        out.append(entry)
    return out


def route(spool: Spool, tmp: str, calling_ae: str,
          header: dict[str, str | None], path: str) -> tuple[int, str] | None:
    """The receiver's question for an instance (its UIDs checked, its file durable)
    of a study some job waits for: None when no live expectation holds it (receive it
    as usual), else the status to answer and, for a failure, why. Stored instances go
    to ``spool/priors/<job>/<Study>/<Series>/<SOP>.dcm`` for every job waiting."""
    study = str(header.get("study_uid"))
    waiting = _live(os.path.join(spool.priors, EXPECT_DIR, study), utcnow())
    if not waiting:
        return None
    ours = [e for e in waiting if e.get("calling_ae") == calling_ae]
    if not ours:
        return OUT_OF_RESOURCES, (f"study {study} is being retrieved as a prior from "
                                  f"{', '.join(sorted({str(e.get('calling_ae')) for e in waiting}))}"
                                  f"; not accepted from {calling_ae!r} meanwhile")
    patient = (header.get("patient_id") or "").strip()
    series, sop = str(header.get("series_uid")), str(header.get("sop_uid"))
    placed: str | None = None
    for entry in ours:
        job_id = str(entry["job"])
        if patient != str(entry.get("patient_id") or ""):
            why = (f"instance {sop} of study {study}: its PatientID is another patient's than "
                   f"job {job_id}'s, which retrieves it as a prior")
            _note_refusal(spool, job_id, why)
            return CANNOT_UNDERSTAND, why
    try:
        for entry in ours:
            dest_dir = os.path.join(spool.priors, str(entry["job"]), study, series)
            if placed is None:
                placed = _place(path, dest_dir, sop + ".dcm", tmp,
                                move=os.path.dirname(path) == tmp)
            else:  # a second job waits for the same study: a hard link
                os.makedirs(dest_dir, exist_ok=True)
                dest = os.path.join(dest_dir, sop + ".dcm")
                if not os.path.exists(dest):
                    os.link(placed, dest)
                fsync_dir(dest_dir)
    except OSError as exc:
        return OUT_OF_RESOURCES, f"cannot store prior instance {sop}: {exc.strerror or exc}"
    return SUCCESS, ""


def _note_refusal(spool: Spool, job_id: str, why: str) -> None:
    folder = spool.priors / job_id
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / REFUSED_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, json.dumps({"time": isotime(), "reason": why}).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        log.error("priors: cannot note a refusal for %s: %s", job_id, exc)


def _refusals(staging: Path) -> list[str]:
    try:
        lines = (staging / REFUSED_FILE).read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(str(json.loads(line)["reason"]))
        except (ValueError, KeyError, TypeError):
            continue
    return out


def sweep(spool: Spool, *, active: set[str] | None = None, dry_run: bool = False) -> list[str]:
    """Remove expectations past their deadline and, when ``active`` (the ids of the jobs
    in ``run/cur/``) is given, the expectations and ``spool/priors/<job>/`` folders of
    every other job (only a run stage holding the job waits for them); what was removed,
    relative to ``spool/priors``."""
    removed: list[str] = []
    root = spool.priors / EXPECT_DIR
    now = utcnow()
    try:
        studies = sorted(os.listdir(root))
    except FileNotFoundError:
        studies = []
    for study in studies:
        folder = root / study
        live = {str(e["job"]) for e in _live(str(folder), now)}
        if active is not None:
            live &= active
        try:
            names = sorted(os.listdir(folder))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in names:
            if name.removesuffix(".json") in live:
                continue
            removed.append(f"{EXPECT_DIR}/{study}/{name}")
            if not dry_run:
                (folder / name).unlink(missing_ok=True)
        if not dry_run:
            try:
                folder.rmdir()
            except OSError:
                pass
    if active is None:
        return removed
    try:
        entries = sorted(os.listdir(spool.priors))
    except FileNotFoundError:
        return removed
    for name in entries:
        if name == EXPECT_DIR or name in active:
            continue
        removed.append(name)
        if not dry_run:
            shutil.rmtree(spool.priors / name, ignore_errors=True)
    return removed


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
    record["found"], record["ignored"] = len(chosen), len(ignored)
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
    for c in chosen:
        if cfg.method == "move":
            got = retrieve_move(station, net, job, c, current.patient_id, fetch_root)
        else:
            got = retrieve_get(net, c, current.patient_id, fetch_root, station.spool.tmp)
        if got.refused:
            shutil.rmtree(fetch_root, ignore_errors=True)
            raise JobFailed(f"priors: {net} delivered what was not asked for while retrieving "
                            f"study {c.study_uid} by C-{cfg.method.upper()}, refused: "
                            + "; ".join(got.refused[:5])
                            + (f" (and {len(got.refused) - 5} more)" if len(got.refused) > 5
                               else ""))
        entry: PriorStudyEntry = {"study_uid": c.study_uid, "date": c.date, "time": c.time,
                                  "description": c.description,
                                  "modalities": list(c.modalities),
                                  "instances": got.instances, "series": dict(got.series)}
        record["studies"].append(entry)
    shutil.rmtree(station.spool.priors / job.id, ignore_errors=True)
    final = job.path / PRIOR_DIR
    shutil.rmtree(final, ignore_errors=True)
    os.rename(fetch_root, final)
    fsync_dir(job.path)
    studies = record["studies"]
    what = ", ".join(f"{s['study_uid']} ({s.get('date') or 'undated'}, {s['instances']} "
                     "instance(s))" for s in studies)
    return _record(station, job, record, f"{len(studies)} prior stud{'y' if len(studies) == 1 else 'ies'} "
                   f"from {net} by C-{cfg.method.upper()}: {what}{note}",
                   status=Status.WARNING if ignored else Status.OK)


def _record(station: Station, job: Job, record: PriorsRecord, message: str, *,
            missing: bool = False, status: Status = Status.INFO) -> PriorsRecord:
    record["fetched_at"] = isotime()
    if missing:
        shutil.rmtree(job.path / PRIOR_DIR, ignore_errors=True)
    data = job.read()
    data["priors"] = record
    job.write(data)
    event = Event.PRIORS_MISSING if missing else Event.PRIORS_FETCHED
    station.journal.emit(Stage.RUN, event, status, message, job=job, job_data=data,
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
