"""Per-series intensity statistics and a threshold segmentation, reported as DICOM SR.

The example processing of the default configuration, and a template for a
model that dts runs. It follows the run contract: it reads the input view
(``/input`` in a container, the first argument as a command: the selected
series as ``<selection>/<SeriesInstanceUID>/*.dcm`` and ``task.json``), takes its
parameter ``threshold`` from the environment, and writes into the output folder:

- a Comprehensive SR in the input's study and patient (new series, new UIDs),
  one measurement group per series: mean, standard deviation, minimum and
  maximum of the modality values (Hounsfield units for CT) and the volume of
  the voxels at or above ``threshold`` in ml (PixelSpacing x slice thickness),
  each source series referenced by UID and every source instance listed in the
  CurrentRequestedProcedureEvidenceSequence;
- ``statistics.json``, the same figures for a folder destination.

Usage: python -m dts.examples.series_statistics [INPUT [OUTPUT]]
(defaults: $DTS_INPUT or /input, $DTS_OUTPUT or /output). It needs only
pydicom and numpy, so it also runs in a small container (see Dockerfile).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SOFTWARE = "dts.examples.series_statistics"
VERSION = "1.0"
DEFAULT_THRESHOLD = 300.0
SERIES_NUMBER = 9101

# Concepts (SNOMED CT, DICOM, LOINC) and units (UCUM).
REPORT = ("18748-4", "LN", "Diagnostic imaging report")
GROUP = ("125007", "DCM", "Measurement Group")
SERIES_UID = ("112002", "DCM", "Series Instance UID")
FINDING = ("121071", "DCM", "Finding")
MEAN = ("373098007", "SCT", "Mean")
STDDEV = ("386136009", "SCT", "Standard Deviation")
MINIMUM = ("255605001", "SCT", "Minimum")
MAXIMUM = ("56851009", "SCT", "Maximum")
VOLUME = ("118565006", "SCT", "Volume")
HU = ("[hnsf'U]", "UCUM", "Hounsfield unit")
NO_UNIT = ("1", "UCUM", "no units")
ML = ("ml", "UCUM", "milliliter")


@dataclass
class SeriesStats:
    """Running figures of one series (images are read one at a time)."""

    series_uid: str
    selection: str
    modality: str = ""
    description: str = ""
    instances: list[tuple[str, str]] = field(default_factory=list)  # (SOP class, SOP instance)
    images: int = 0
    voxels: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    minimum: float = math.inf
    maximum: float = -math.inf
    above: int = 0
    volume_mm3: float | None = 0.0
    skipped: int = 0

    def add(self, values: np.ndarray, threshold: float, voxel_mm3: float | None) -> None:
        v = values.astype(np.float64, copy=False)
        self.images += 1
        self.voxels += v.size
        self.total += float(v.sum())
        self.total_sq += float(np.square(v).sum())
        self.minimum = min(self.minimum, float(v.min()))
        self.maximum = max(self.maximum, float(v.max()))
        n = int(np.count_nonzero(v >= threshold))
        self.above += n
        if voxel_mm3 is None or self.volume_mm3 is None:
            self.volume_mm3 = None
        else:
            self.volume_mm3 += n * voxel_mm3

    @property
    def mean(self) -> float:
        return self.total / self.voxels

    @property
    def std(self) -> float:
        return math.sqrt(max(0.0, self.total_sq / self.voxels - self.mean ** 2))

    @property
    def volume_ml(self) -> float | None:
        return None if self.volume_mm3 is None else self.volume_mm3 / 1000.0

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"series_uid": self.series_uid, "selection": self.selection,
                               "modality": self.modality, "images": self.images,
                               "skipped": self.skipped}
        if self.voxels:
            out.update(mean=self.mean, std=self.std, min=self.minimum, max=self.maximum,
                       voxels_above_threshold=self.above, volume_ml=self.volume_ml)
        return out


def voxel_volume_mm3(ds: Dataset) -> float | None:
    try:
        dy, dx = (float(x) for x in ds.PixelSpacing)
        thickness = float(ds.get("SpacingBetweenSlices") or ds.SliceThickness)
    except (AttributeError, TypeError, ValueError):
        return None
    return dy * dx * thickness if dy > 0 and dx > 0 and thickness > 0 else None


def modality_values(ds: Dataset) -> np.ndarray:
    """Stored pixel values mapped to modality values (Hounsfield units for CT)."""
    arr = ds.pixel_array
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return arr * slope + intercept if (slope, intercept) != (1.0, 0.0) else arr


def input_series(input_dir: Path) -> Iterable[tuple[str, str, list[Path]]]:
    """(selection name, SeriesInstanceUID, files) from task.json, or by walking the input."""
    task_file = input_dir / "task.json"
    if task_file.is_file():
        task = json.loads(task_file.read_text())
        for name, series in (task.get("files") or {}).items():
            for uid, files in series.items():
                yield name, uid, [input_dir / f for f in files]
        return
    groups: dict[str, list[Path]] = {}
    for path in sorted(input_dir.rglob("*")):
        if path.is_file() and path.name != "task.json":
            groups.setdefault(str(path.parent.relative_to(input_dir)), []).append(path)
    for rel, files in groups.items():
        yield rel.split(os.sep)[0], "", files


def measure(input_dir: Path, threshold: float) -> tuple[list[SeriesStats], Dataset | None]:
    """Statistics of every input series and one input header to copy patient/study from."""
    results: list[SeriesStats] = []
    first: Dataset | None = None
    for selection, uid, files in input_series(input_dir):
        stats = SeriesStats(series_uid=uid, selection=selection)
        for path in files:
            try:
                ds = pydicom.dcmread(path)
            except Exception:
                stats.skipped += 1
                continue
            if first is None:
                first = ds
            stats.series_uid = stats.series_uid or str(ds.SeriesInstanceUID)
            stats.modality = str(ds.get("Modality", ""))
            stats.description = str(ds.get("SeriesDescription", ""))
            stats.instances.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
            if "PixelData" not in ds:
                continue
            try:
                values = modality_values(ds)
            except Exception:  # a transfer syntax without a decoder here
                stats.skipped += 1
                continue
            stats.add(values, threshold, voxel_volume_mm3(ds))
        results.append(stats)
    return results, first


# -- the SR document ----------------------------------------------------------------


def code(value: tuple[str, str, str]) -> Dataset:
    ds = Dataset()
    ds.CodeValue, ds.CodingSchemeDesignator, ds.CodeMeaning = value
    return ds


def _item(value_type: str, concept: tuple[str, str, str],
          relationship: str = "CONTAINS") -> Dataset:
    ds = Dataset()
    ds.RelationshipType = relationship
    ds.ValueType = value_type
    ds.ConceptNameCodeSequence = Sequence([code(concept)])
    return ds


def num(concept: tuple[str, str, str], value: float, unit: tuple[str, str, str]) -> Dataset:
    ds = _item("NUM", concept)
    mv = Dataset()
    mv.NumericValue = _ds(value)
    mv.MeasurementUnitsCodeSequence = Sequence([code(unit)])
    ds.MeasuredValueSequence = Sequence([mv])
    return ds


def _ds(value: float) -> str:
    """A decimal string of at most 16 characters."""
    text = f"{value:.6g}"
    return text if len(text) <= 16 else f"{value:.8e}"[:16]


def text(concept: tuple[str, str, str], value: str) -> Dataset:
    ds = _item("TEXT", concept)
    ds.TextValue = value[:1024]
    return ds


def uidref(concept: tuple[str, str, str], value: str) -> Dataset:
    ds = _item("UIDREF", concept)
    ds.UID = value
    return ds


def group(stats: SeriesStats, threshold: float) -> Dataset:
    g = _item("CONTAINER", GROUP)
    g.ContinuityOfContent = "SEPARATE"
    unit = HU if stats.modality == "CT" else NO_UNIT
    items = [uidref(SERIES_UID, stats.series_uid)]
    if stats.voxels:
        items += [num(MEAN, stats.mean, unit), num(STDDEV, stats.std, unit),
                  num(MINIMUM, stats.minimum, unit), num(MAXIMUM, stats.maximum, unit)]
        if stats.volume_ml is not None:
            items.append(num(VOLUME, stats.volume_ml, ML))
    items.append(text(FINDING, summary(stats, threshold)))
    g.ContentSequence = Sequence(items)
    return g


def summary(stats: SeriesStats, threshold: float) -> str:
    name = f"Series {stats.series_uid} ({stats.selection}, {stats.modality or '?'})"
    if not stats.voxels:
        return f"{name}: no image could be measured ({stats.skipped} skipped)."
    vol = "unknown (no pixel spacing)" if stats.volume_ml is None else f"{stats.volume_ml:.2f} ml"
    return (f"{name}: {stats.images} images, mean {stats.mean:.1f}, sd {stats.std:.1f}, "
            f"range {stats.minimum:g} to {stats.maximum:g}; volume at or above {threshold:g}: "
            f"{vol}.")


_COPIED = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
           "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
           "ReferringPhysicianName", "StudyDescription", "SpecificCharacterSet")


def build_report(results: list[SeriesStats], source: Dataset, threshold: float,
                 now: datetime | None = None) -> Dataset:
    """A Comprehensive SR in the source's study and patient, with fresh UIDs."""
    now = now or datetime.now()
    ds = Dataset()
    for keyword in _COPIED:
        if keyword in source:
            setattr(ds, keyword, source.data_element(keyword).value)  # type: ignore[union-attr]
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                    "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName"):
        if keyword not in ds:  # type 2: present, may be empty
            setattr(ds, keyword, "")
    ds.SOPClassUID = COMPREHENSIVE_SR
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.SeriesNumber = SERIES_NUMBER
    ds.SeriesDescription = "dts series statistics"
    ds.InstanceNumber = 1
    ds.Manufacturer = "dts"
    ds.ManufacturerModelName = SOFTWARE
    ds.SoftwareVersions = VERSION
    ds.ContentDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.ContentTime = ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    ds.PerformedProcedureCodeSequence = Sequence()
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    # SR document content: the root container
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = Sequence([code(REPORT)])
    ds.ContinuityOfContent = "SEPARATE"
    measured = [s for s in results if s.voxels]
    overall = text(FINDING, f"dts series statistics, threshold {threshold:g}: "
                            f"{len(measured)} of {len(results)} series measured.")
    ds.ContentSequence = Sequence([overall] + [group(s, threshold) for s in results])
    # every instance the findings were made from
    series_items = []
    for s in results:
        if not s.instances:
            continue
        ref = Dataset()
        ref.SeriesInstanceUID = s.series_uid
        sops = []
        for sop_class, sop_uid in s.instances:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class
            item.ReferencedSOPInstanceUID = sop_uid
            sops.append(item)
        ref.ReferencedSOPSequence = Sequence(sops)
        series_items.append(ref)
    evidence = Dataset()
    evidence.StudyInstanceUID = ds.StudyInstanceUID
    evidence.ReferencedSeriesSequence = Sequence(series_items)
    ds.CurrentRequestedProcedureEvidenceSequence = Sequence([evidence])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def threshold_from_environment() -> float:
    raw = os.environ.get("threshold")
    if raw is None:
        try:
            raw = json.loads(os.environ.get("DTS_PARAMETERS") or "{}").get("threshold")
        except ValueError:
            raw = None
    if raw is None or str(raw).strip() == "":
        return DEFAULT_THRESHOLD
    return float(raw)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    input_dir = Path(args[0] if args else os.environ.get("DTS_INPUT", "/input"))
    output_dir = Path(args[1] if len(args) > 1 else os.environ.get("DTS_OUTPUT", "/output"))
    try:
        threshold = threshold_from_environment()
    except ValueError:
        print(f"series_statistics: threshold must be a number, got "
              f"{os.environ.get('threshold')!r}", file=sys.stderr)
        return 2
    results, source = measure(input_dir, threshold)
    if source is None or not any(s.voxels for s in results):
        print(f"series_statistics: no measurable image under {input_dir}", file=sys.stderr)
        return 1
    report = build_report(results, source, threshold)
    output_dir.mkdir(parents=True, exist_ok=True)
    report.save_as(output_dir / f"{report.SOPInstanceUID}.dcm", enforce_file_format=True)
    (output_dir / "statistics.json").write_text(json.dumps(
        {"threshold": threshold, "report_sop_instance_uid": str(report.SOPInstanceUID),
         "series": [s.as_dict() for s in results]}, indent=2) + "\n")
    for s in results:
        print(summary(s, threshold))
    return 0


if __name__ == "__main__":
    sys.exit(main())
