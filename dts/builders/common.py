"""What every built object shares: the input's headers, the run's identity, and the
attributes written on every object (equipment, date and time of the run, series)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from .. import __version__
from ..results import Code, InvalidResults

MANUFACTURER = "dts"
# the wording every built object carries (ImageComments / DerivationDescription, and the
# pixels of a Secondary Capture with burn_in)
NOT_FOR_DIAGNOSTIC_USE = "AI result - not for diagnostic use"
BUILT_DIR = "dts-built"          # inside output/: the objects the builder wrote
DEFAULT_SERIES_DESCRIPTION = "{stream} {kind}"
FIRST_SERIES_NUMBER = 9001
# kind -> its order when series numbers are handed out, and its name in descriptions
KINDS = {"sr": "SR", "text": "text SR", "seg": "SEG", "pdf": "PDF", "sc": "images",
         "kos": "key images"}


class BuildError(InvalidResults):
    """results.json asked for something that cannot be built from what the run wrote
    (names the file, the field and the reason, like every InvalidResults)."""


@dataclass
class RunContext:
    """Who made the results and when (the runner fills it from the stream and the run)."""

    stream: str
    model_name: str
    model_version: str = "unknown"
    image_digest: str | None = None           # sha256 hex of the container image
    run_time: datetime = field(default_factory=datetime.now)
    series_description: str = DEFAULT_SERIES_DESCRIPTION
    previous: list[dict[str, Any]] = field(default_factory=list)   # job.json `built` of
    #                                                                the last run

    def software_versions(self) -> list[str]:
        out = [f"dts {__version__}", self.model_version[:64]]
        if self.image_digest:
            out.append(self.image_digest[-64:])
        return out

    def description(self, kind: str) -> str:
        text = self.series_description.replace("{stream}", self.stream)
        return text.replace("{kind}", KINDS[kind]).replace("{model}", self.model_name)[:64]

    def previous_srs(self, kind: str) -> list[Dataset]:
        """Minimal references (what Predecessor Documents Sequence needs) to the SRs of
        this kind the last run built."""
        out = []
        for entry in self.previous:
            if entry.get("kind") != kind:
                continue
            ds = Dataset()
            ds.StudyInstanceUID = entry["study_uid"]
            ds.SeriesInstanceUID = entry["series_uid"]
            ds.SOPClassUID = entry["sop_class"]
            ds.SOPInstanceUID = entry["sop_uid"]
            out.append(ds)
        return out

    def series_numbers(self, kinds: list[str]) -> dict[str, int]:
        """A series number per kind, after every number the last run used."""
        old = [int(e["series_number"]) for e in self.previous
               if isinstance(e.get("series_number"), int)]
        first = max(old) + 1 if old else FIRST_SERIES_NUMBER
        return {kind: first + i for i, kind in enumerate(k for k in KINDS if k in kinds)}


@dataclass
class InputSeries:
    uid: str
    headers: list[Dataset]            # sorted: along the slice normal, else by InstanceNumber
    files: list[Path]

    @property
    def modality(self) -> str:
        return str(self.headers[0].get("Modality", ""))


class InputIndex:
    """The input's instances by series (headers only, pixels are never read)."""

    def __init__(self, input_dir: Path) -> None:
        """Every DICOM file under ``input_dir`` (a job's ``input/<series>/``, or the view a
        model sees, ``<selection>/<series>/``), grouped by its SeriesInstanceUID."""
        self.series: dict[str, InputSeries] = {}
        self.by_sop: dict[str, Dataset] = {}
        groups: dict[str, list[tuple[Dataset, Path]]] = {}
        for f in sorted(input_dir.rglob("*")) if input_dir.is_dir() else []:
            if not f.is_file() or f.is_symlink() or f.name == "task.json":
                continue
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
                sop, series = str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)
            except (InvalidDicomError, OSError, ValueError, AttributeError):
                continue
            if sop in self.by_sop:
                continue  # the same instance in two selections
            for keyword in _TYPE2:  # highdicom copies them; absent is empty
                if keyword not in ds:
                    setattr(ds, keyword, "")
            self.by_sop[sop] = ds
            groups.setdefault(series, []).append((ds, f))
        for uid, pairs in groups.items():
            pairs.sort(key=lambda p: _slice_key(p[0]))
            self.series[uid] = InputSeries(uid, [p[0] for p in pairs], [p[1] for p in pairs])

    @property
    def first(self) -> Dataset:
        for s in self.series.values():
            return s.headers[0]
        raise BuildError("input", "", "the job has no input instance to build results for")

    def all_headers(self) -> list[Dataset]:
        return [h for s in self.series.values() for h in s.headers]

    def get_series(self, file: str, where: str, uid: str) -> InputSeries:
        if uid not in self.series:
            raise BuildError(file, where, f"series_uid {uid} is not a series of the input")
        return self.series[uid]

    def get_sop(self, file: str, where: str, uid: str) -> Dataset:
        if uid not in self.by_sop:
            raise BuildError(file, where, f"SOP Instance UID {uid} is not an instance of the "
                             "input")
        return self.by_sop[uid]


_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
          "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName")


def _slice_key(ds: Dataset) -> tuple[float, int]:
    try:
        iop = np.array([float(x) for x in ds.ImageOrientationPatient])
        ipp = np.array([float(x) for x in ds.ImagePositionPatient])
        normal = np.cross(iop[:3], iop[3:])
        position = float(ipp @ normal)
    except (AttributeError, TypeError, ValueError):
        position = 0.0
    return position, int(ds.get("InstanceNumber") or 0)


def coded(code: Code) -> Any:
    import highdicom as hd

    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme,
                              meaning=code.meaning)


_SH = re.compile(r"[^A-Za-z0-9 ._-]")


def finish(ds: Dataset, ctx: RunContext, kind: str, index: InputIndex) -> Dataset:
    """What every built object carries beyond what highdicom wrote."""
    src = index.first
    for keyword in ("AccessionNumber", "PatientID", "StudyInstanceUID"):
        if keyword in src:
            setattr(ds, keyword, src.data_element(keyword).value)  # type: ignore[union-attr]
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = ctx.model_name[:64]
    ds.SoftwareVersions = ctx.software_versions()
    date, time = ctx.run_time.strftime("%Y%m%d"), ctx.run_time.strftime("%H%M%S")
    ds.SeriesDate = ds.ContentDate = date
    ds.SeriesTime = ds.ContentTime = time
    ds.SeriesDescription = ctx.description(kind)
    return ds


def save(ds: Dataset, out_dir: Path, name: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    ds.save_as(path, enforce_file_format=True)
    return path
