"""Owns ``study.json``: the study document that streams are evaluated on.

Built from a job's ``input/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` without ever
reading pixel data: study-level attributes, the connection the study came on, and one
object per series with DICOM keyword keys, ``NumImages`` and ``ClassifyType``.

How much is read (measured by ``tests/bench/bench_classify.py``, 5,000 instances of
64x64 in 10 series, 2-core machine): ``dcmread(stop_before_pixels=True)`` of every
header alone takes about 0.8 s, and building the document from every header about
2.7 s (converting the elements the rules read) -- too slow for a stage that should take
well under a second. So:

- every file is checked cheaply (its first 132 bytes carry the ``DICM`` marker; a file
  without it is parsed in full, and one that does not parse fails the job);
- per series a spread sample of headers is read (first, last and evenly between them,
  ``ceil(sqrt(n))`` of them, at least 3), and each sampled image's *signature* is taken:
  the values of every tag any classification rule reads;
- if the sampled images differ in a way the rules can tell apart (signatures differ and
  so do the clause results: a tri-plane localizer, a series mixing original and derived
  images), every header of that series is read, and the rules see all images.

Trade-off: a series whose sample is uniform is assumed uniform. An image that differs
in a rule-relevant tag from an otherwise uniform series and that the sample missed does
not add its type (or, with SeriesLevel, does not veto it). The SOP Instance UIDs (for
the feedback-loop guard) and ``NumImages`` come from the file names, so they are exact.
For 5,000 instances in 10 series this reads 230 headers instead of 5,000 and takes
about 0.12 s (22x faster than reading every header). Rules are evaluated once per
distinct signature, not per image.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.valuerep import IS, DSfloat, PersonName

from .dicom.uid import valid_uid
from .jobrecord import JobRecord
from .rorselect import values_of
from .rules import Facts, RuleSet

MIN_SAMPLE = 3

STUDY_KEYS = ("StudyInstanceUID", "PatientID", "AccessionNumber", "StudyDate", "StudyTime",
              "StudyDescription", "StudyID", "PatientSex", "PatientAge", "InstitutionName")
SERIES_KEYS = ("SeriesInstanceUID", "SeriesNumber", "Modality", "SeriesDescription",
               "ProtocolName", "BodyPartExamined", "ImageType", "SequenceName",
               "ScanningSequence", "SequenceVariant", "Manufacturer", "ManufacturerModelName",
               "SOPClassUID", "Rows", "Columns", "SliceThickness", "PixelSpacing",
               "RepetitionTime", "EchoTime", "MagneticFieldStrength", "ContrastBolusAgent",
               "SeriesDate", "SeriesTime")
CONNECTION_KEYS: tuple[Literal["calling_ae", "called_ae", "peer"], ...] = (
    "calling_ae", "called_ae", "peer")
_TAGS: dict[str, int] = {k: int(tag_for_keyword(k) or 0) for k in STUDY_KEYS + SERIES_KEYS}


class StudyError(Exception):
    """The job's input cannot be classified (no instances, an unreadable file)."""


@dataclass
class SeriesInput:
    uid: str
    files: list[Path]
    read: list[tuple[Path, Dataset]] = field(default_factory=list)
    exhaustive: bool = False

    @property
    def sop_uids(self) -> list[str]:
        return [f.name.removesuffix(".dcm") for f in self.files]


@dataclass
class Study:
    doc: dict[str, Any]
    series: dict[str, SeriesInput]
    images: int
    headers_read: int

    def sop_uids(self) -> list[str]:
        return [sop for s in self.series.values() for sop in s.sop_uids]


def jsonable(value: Any) -> Any:
    """A DICOM value as plain JSON (numbers as numbers, multi-values as lists)."""
    if value is None or isinstance(value, (bytes, DicomSequence)):
        return None
    if isinstance(value, (MultiValue, list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, IS):
        return int(value)
    if isinstance(value, DSfloat):
        f = float(value)
        return None if math.isnan(f) or math.isinf(f) else f
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, PersonName):
        return None  # names never go into the study document
    return str(value).strip()


def _attrs(ds: Dataset, keys: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in keys:
        try:
            elem = ds.get(_TAGS[key])
            out[key] = jsonable(elem.value) if elem is not None else None
        except (ValueError, TypeError, KeyError, OverflowError, UnicodeError):
            out[key] = None  # a malformed value: left out rather than failing the study
    return out


def _has_dicm(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return os.pread(fd, 4, 128) == b"DICM"
    except OSError:
        return False
    finally:
        os.close(fd)


def read_header(path: Path) -> Dataset:
    where = f"{path.parent.name}/{path.name}"
    marked = _has_dicm(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=not marked)
        # a file without the DICM marker is only DICOM if it parses into an instance
        uid = ds.get(0x00080018)
        ok = marked or (uid is not None and valid_uid(uid.value))
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError,
            AttributeError) as exc:
        raise StudyError(f"unreadable DICOM file {where}: {type(exc).__name__}: {exc}") from None
    if not ok:
        raise StudyError(f"unreadable DICOM file {where}: not DICOM (no DICM marker, "
                         "no SOP Instance UID)")
    return ds


def _sample(n: int) -> list[int]:
    k = min(n, max(MIN_SAMPLE, math.ceil(math.sqrt(n))))
    if k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def list_input(input_dir: Path) -> dict[str, SeriesInput]:
    """The series folders of a job's input and their files (names only, nothing read)."""
    if not input_dir.is_dir():
        raise StudyError("the job has no input/ folder")
    series: dict[str, SeriesInput] = {}
    for entry in sorted(os.scandir(input_dir), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            raise StudyError(f"unexpected file input/{entry.name} (expected "
                             "input/<SeriesInstanceUID>/<SOPInstanceUID>.dcm)")
        base = Path(entry.path)
        files = [base / name for name in sorted(
            e.name for e in os.scandir(entry.path) if not e.name.startswith(".") and e.is_file())]
        if files:
            series[entry.name] = SeriesInput(entry.name, files)
    return series


def scan_series(s: SeriesInput, rules: RuleSet, read_all: bool = False) -> list[Facts]:
    """Read the sample of one series (all of it if the sample is not uniform)."""
    n = len(s.files)
    chosen = list(range(n)) if read_all else _sample(n)
    if len(chosen) < n:
        for path in s.files:
            if not _has_dicm(path):
                read_header(path)  # raises StudyError if it does not parse at all
    s.read = [(s.files[i], read_header(s.files[i])) for i in chosen]
    distinct = rules.distinct([Facts(ds, n) for _p, ds in s.read])
    s.exhaustive = len(chosen) == n
    if not s.exhaustive and len(distinct) > 1:
        taken = set(chosen)
        rest = [(s.files[i], read_header(s.files[i])) for i in range(n) if i not in taken]
        s.read += rest
        distinct = rules.distinct(distinct + [Facts(ds, n) for _p, ds in rest])
        s.exhaustive = True
    return distinct


def _instance_number(ds: Dataset) -> float:
    try:
        return float(ds[0x00200013].value)
    except (KeyError, TypeError, ValueError):
        return math.inf


def build_study(input_dir: Path, job: JobRecord, rules: RuleSet, *,
                read_all: bool = False, tags: frozenset[int] = frozenset()) -> Study:
    """The study document of a job's input; StudyError if it cannot be classified.
    ``read_all`` reads every header instead of a sample (the benchmark's peer).
    ``tags`` (those the streams' ``ror_select`` statements read) are added per series
    under ``tags``: ``{"GGGGEEEE": [value as text, ...]}`` from the same instance as
    the other keys, a tag the instance lacks left out (``rorselect.values_of``)."""
    series = list_input(input_dir)
    if not series:
        raise StudyError("no instances in input/")
    docs: list[dict[str, Any]] = []
    first: Dataset | None = None
    read = 0
    for uid, s in series.items():
        facts = scan_series(s, rules, read_all)
        read += len(s.read)
        rep = min((ds for _p, ds in s.read), key=_instance_number)
        first = first if first is not None else rep
        doc = _attrs(rep, SERIES_KEYS)
        doc["SeriesInstanceUID"] = uid
        doc["NumImages"] = len(s.files)
        doc["ClassifyType"] = rules.classify(facts)
        if tags:
            found = {t: values_of(rep, t) for t in sorted(tags)}
            doc["tags"] = {f"{t:08X}": v for t, v in found.items() if v is not None}
        docs.append(doc)
    assert first is not None
    docs.sort(key=lambda d: (d["SeriesNumber"] is None,
                             d["SeriesNumber"] if isinstance(d["SeriesNumber"], int) else 0,
                             d["SeriesInstanceUID"]))
    doc = _attrs(first, STUDY_KEYS)
    if not doc.get("StudyInstanceUID"):
        doc["StudyInstanceUID"] = job.get("study_uid")
    doc["ModalitiesInStudy"] = sorted({d["Modality"] for d in docs if d.get("Modality")})
    doc["NumSeries"] = len(docs)
    doc["NumImages"] = sum(d["NumImages"] for d in docs)
    for key in CONNECTION_KEYS:
        doc[key] = job.get(key)
    doc["series"] = docs
    doc["classification"] = {"rules": str(rules.path), "rules_sha256": rules.sha256,
                             "headers_read": read}
    return Study(doc=doc, series=series, images=doc["NumImages"], headers_read=read)
