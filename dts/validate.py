"""Owns the check of what a processing run produced, before anything of it leaves.

Patient safety rule: a model's DICOM output may only go into the study and the
patient it was given. Every DICOM file in ``output/`` must parse, carry a
StudyInstanceUID of the input (unless the stream sets ``allow_new_study``) and the
input's PatientID (always), have valid UIDs and a SOP Instance UID that is new
(never one of the input's, never twice in the output). One violation fails the
whole job; the message names the file and the rule.

Non-DICOM files (reports, JSON, PNG) are kept: folder destinations take them; the
DICOM sender sends only what is listed as ``outputs``.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from .dicom.uid import valid_uid
from .errors import JobFailed
from .jobrecord import JobRecord, OutputEntry

DICOM_SUFFIXES = (".dcm", ".dicom")
# at most this many violations are listed in one message
_MAX_LISTED = 10


@dataclass(frozen=True)
class Violation:
    file: str   # relative to output/
    rule: str   # short name of the rule, e.g. "foreign-patient"
    detail: str

    def __str__(self) -> str:
        return f"{self.file}: {self.rule}: {self.detail}"


class InvalidOutput(JobFailed):
    """The output broke a rule; nothing of it may leave the station."""

    def __init__(self, violations: list[Violation]) -> None:
        self.violations = violations
        listed = "; ".join(str(v) for v in violations[:_MAX_LISTED])
        more = len(violations) - _MAX_LISTED
        super().__init__(f"output refused ({len(violations)} problem"
                         f"{'s' if len(violations) != 1 else ''}): {listed}"
                         + (f"; and {more} more" if more > 0 else ""))


@dataclass
class InputFacts:
    """What the output is checked against: the input's studies, patient and instances."""

    study_uids: set[str] = field(default_factory=set)
    patient_ids: set[str] = field(default_factory=set)
    sop_uids: set[str] = field(default_factory=set)
    # the job's prior studies (dts.priors): never sent on, allow_new_study or not
    prior_study_uids: set[str] = field(default_factory=set)
    prior_sop_uids: set[str] = field(default_factory=set)

    @classmethod
    def from_job(cls, input_dir: Path, job_data: JobRecord) -> InputFacts:
        """Instances are named by their SOP Instance UID (validated when received); the
        study and patient come from job.json and, to be sure, from one header per series."""
        facts = cls()
        if job_data.get("study_uid"):
            facts.study_uids.add(str(job_data["study_uid"]))
        if "patient_id" in job_data and job_data["patient_id"] is not None:
            facts.patient_ids.add(str(job_data["patient_id"]).strip())
        try:
            series_dirs = sorted(p for p in input_dir.iterdir() if p.is_dir())
        except FileNotFoundError:
            series_dirs = []
        for series in series_dirs:
            first = True
            for f in sorted(series.iterdir()):
                if f.suffix == ".dcm":
                    facts.sop_uids.add(f.stem)
                    if first:
                        first = False
                        _add_header(facts, f)
        return facts


def _add_header(facts: InputFacts, path: Path) -> None:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["StudyInstanceUID", "PatientID", "SOPInstanceUID"])
    except (InvalidDicomError, OSError, ValueError):
        return
    if ds.get("StudyInstanceUID"):
        facts.study_uids.add(str(ds.StudyInstanceUID))
    facts.patient_ids.add(str(ds.get("PatientID", "") or "").strip())
    if ds.get("SOPInstanceUID"):
        facts.sop_uids.add(str(ds.SOPInstanceUID))


@dataclass(frozen=True)
class OutputObject:
    """A DICOM result as the sender needs it, so that it never has to parse it again."""

    file: str            # relative to output/
    sop_uid: str
    sop_class: str
    transfer_syntax: str
    study_uid: str
    series_uid: str

    def as_dict(self) -> OutputEntry:
        """The ``outputs`` entry of job.json."""
        return {"file": self.file, "sop_uid": self.sop_uid, "sop_class": self.sop_class,
                "transfer_syntax": self.transfer_syntax, "study_uid": self.study_uid,
                "series_uid": self.series_uid}


@dataclass
class Checked:
    dicom: list[OutputObject] = field(default_factory=list)
    other: list[str] = field(default_factory=list)   # non-DICOM files, relative to output/

    @property
    def empty(self) -> bool:
        return not self.dicom and not self.other


def _looks_like_dicom(path: Path) -> bool:
    """By name, by the Part 10 marker, or by a first element of group 0002/0008 (a dataset
    written without preamble must not slip past the checks as an "other" file)."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    if len(head) == 132 and head[128:132] == b"DICM":
        return True
    return len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00") and head[3] == 0


def check_output(output_dir: Path, facts: InputFacts, *,
                 allow_new_study: bool = False) -> Checked:
    """Check every file under ``output_dir``; InvalidOutput listing every violation."""
    result = Checked()
    violations: list[Violation] = []
    seen: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(output_dir, followlinks=False):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = str(path.relative_to(output_dir))
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                continue
            # A link could point at any file of the host; a device or pipe is no result.
            if not stat.S_ISREG(st.st_mode):
                kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
                violations.append(Violation(rel, "not-a-file", f"{kind}; only plain files "
                                            "are accepted as output"))
                continue
            if not _looks_like_dicom(path):
                result.other.append(rel)
                continue
            obj, problems = _check_dicom(path, rel, facts, allow_new_study)
            violations += problems
            if obj is None:
                continue
            if obj.sop_uid in seen:
                violations.append(Violation(rel, "duplicate-sop-uid",
                                            f"SOPInstanceUID {obj.sop_uid} is also used by "
                                            f"{seen[obj.sop_uid]}"))
                continue
            seen[obj.sop_uid] = rel
            if not problems:
                result.dicom.append(obj)
    if violations:
        raise InvalidOutput(violations)
    return result


def _pixel_data_short(ds: pydicom.Dataset) -> str:
    """For uncompressed pixel data, a description of how much is missing (pydicom reads
    a file cut short without complaint)."""
    meta = getattr(ds, "file_meta", None)
    ts = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if "PixelData" not in ds or ts is None or ts.is_compressed:
        return ""
    try:
        expected = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
                    * int(ds.get("NumberOfFrames", 1) or 1) * int(ds.BitsAllocated) + 7) // 8
    except (AttributeError, TypeError, ValueError):
        return ""
    actual = len(ds.PixelData)
    return f"{actual} bytes, {expected} expected" if actual < expected else ""


def _check_dicom(path: Path, rel: str, facts: InputFacts,
                 allow_new_study: bool) -> tuple[OutputObject | None, list[Violation]]:
    problems: list[Violation] = []
    try:
        ds = pydicom.dcmread(path, force=True)
        ds.get("PixelData")  # values are read lazily: a truncated file fails only here
    except Exception as exc:  # pydicom raises many kinds on broken files
        return None, [Violation(rel, "unreadable", f"not a valid DICOM file: {exc}")]
    if "SOPClassUID" not in ds and "SOPInstanceUID" not in ds:
        return None, [Violation(rel, "unreadable", "not a DICOM object (no SOP Class or "
                                "SOP Instance UID)")]
    short = _pixel_data_short(ds)
    if short:
        return None, [Violation(rel, "unreadable", f"truncated: PixelData is {short}")]
    meta = getattr(ds, "file_meta", None)
    ts = str(getattr(meta, "TransferSyntaxUID", "") or "") if meta is not None else ""
    values = {
        "SOPClassUID": str(ds.get("SOPClassUID", "") or ""),
        "SOPInstanceUID": str(ds.get("SOPInstanceUID", "") or ""),
        "StudyInstanceUID": str(ds.get("StudyInstanceUID", "") or ""),
        "SeriesInstanceUID": str(ds.get("SeriesInstanceUID", "") or ""),
        "TransferSyntaxUID": ts,
    }
    for keyword, value in values.items():
        if not value:
            problems.append(Violation(rel, "missing-attribute", f"{keyword} is missing"))
        elif not valid_uid(value, conformant=True):
            problems.append(Violation(rel, "invalid-uid", f"{keyword} {value!r} is not a valid "
                                      "UID (digits and dots, at most 64 characters)"))
    if problems:
        return None, problems
    sop_uid = values["SOPInstanceUID"]
    if meta is not None and meta.get("MediaStorageSOPInstanceUID") not in (None, sop_uid):
        problems.append(Violation(rel, "meta-mismatch", "MediaStorageSOPInstanceUID "
                                  f"{meta.MediaStorageSOPInstanceUID} differs from "
                                  f"SOPInstanceUID {sop_uid}"))
    patient = str(ds.get("PatientID", "") or "").strip()
    if patient not in facts.patient_ids:
        # never name the patient: the IDs are enough to find the case, and stay in the spool
        problems.append(Violation(rel, "foreign-patient", "PatientID differs from the "
                                  "input's: results may only go to the patient they were "
                                  "made from"))
    study = values["StudyInstanceUID"]
    if sop_uid in facts.prior_sop_uids:
        problems.append(Violation(rel, "prior-instance", f"SOPInstanceUID {sop_uid} is an "
                                  "instance of a prior study retrieved for this job: priors "
                                  "never leave the station"))
    elif study in facts.prior_study_uids:
        problems.append(Violation(rel, "prior-study", f"StudyInstanceUID {study} is a prior "
                                  "study retrieved for this job: results go into the current "
                                  "study (allow_new_study permits a new one, never a prior)"))
    elif not allow_new_study and study not in facts.study_uids:
        problems.append(Violation(rel, "foreign-study", f"StudyInstanceUID {study} is not the "
                                  "input's study (set allow_new_study = true in the stream to "
                                  "permit a new study of the same patient)"))
    if sop_uid in facts.sop_uids:
        problems.append(Violation(rel, "reused-sop-uid", f"SOPInstanceUID {sop_uid} belongs to "
                                  "an input instance; a result needs a new UID"))
    obj = OutputObject(file=rel, sop_uid=sop_uid, sop_class=values["SOPClassUID"],
                       transfer_syntax=ts, study_uid=study,
                       series_uid=values["SeriesInstanceUID"])
    return obj, problems
