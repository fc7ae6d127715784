"""Per-series intensity statistics and a threshold segmentation, for dts to report.

The example processing of the default configuration, and a template for a
model that dts runs. It follows the run contract: it reads the input view
(``/input`` in a container, the first argument as a command: the selected
series as ``<selection>/<SeriesInstanceUID>/*.dcm`` and ``task.json``), takes its
parameter ``threshold`` from the environment, and writes into the output folder:

- ``results.json`` (docs/results.md): per series the mean, standard deviation,
  minimum and maximum of the modality values (Hounsfield units for CT) and the
  volume of the voxels at or above ``threshold`` in ml (PixelSpacing x slice
  thickness), each a coded measurement of its series; and, for every series that is
  one volume (a frame of reference, positions, orientation), its thresholded voxels
  as a segmentation;
- ``mask-<n>.npy``: those volumes, (slices, rows, columns) along the slice normal;
- ``statistics.json``, the same figures for a folder destination.

It writes no DICOM itself: dts builds a Comprehensive 3D SR (TID 1500) of the
measurements and a Segmentation of each mask in the input's study (dts.builders).

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
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

SOFTWARE = "dts.examples.series_statistics"
VERSION = "1.0"
DEFAULT_THRESHOLD = 300.0

# Concepts (SNOMED CT) and units (UCUM).
MEAN = ("373098007", "SCT", "Mean")
STDDEV = ("386136009", "SCT", "Standard Deviation")
MINIMUM = ("255605001", "SCT", "Minimum")
MAXIMUM = ("56851009", "SCT", "Maximum")
VOLUME = ("118565006", "SCT", "Volume")
HU = ("[hnsf'U]", "UCUM", "Hounsfield unit")
NO_UNIT = ("1", "UCUM", "no units")
ML = ("ml", "UCUM", "milliliter")
TISSUE = ("85756007", "SCT", "Tissue")


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
    # the thresholded slices, by position along the slice normal, while the series has the
    # geometry a segmentation needs (None once a slice lacks it)
    mask: list[tuple[tuple[float, int], np.ndarray]] | None = field(default_factory=list)
    frame_of_reference: str = ""

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


def _add_slice(stats: SeriesStats, ds: Dataset, above: np.ndarray) -> None:
    """Keep a slice of the thresholded volume, or give up the mask of a series whose
    images are not one volume (no frame of reference, position or orientation)."""
    if stats.mask is None:
        return
    try:
        iop = [float(x) for x in ds.ImageOrientationPatient]
        ipp = np.array([float(x) for x in ds.ImagePositionPatient])
        frame = str(ds.FrameOfReferenceUID)
    except (AttributeError, TypeError, ValueError):
        stats.mask = None
        return
    if stats.frame_of_reference not in ("", frame) or above.ndim != 2 or (
            stats.mask and stats.mask[0][1].shape != above.shape):
        stats.mask = None
        return
    stats.frame_of_reference = frame
    normal = np.cross(iop[:3], iop[3:])
    stats.mask.append(((float(ipp @ normal), int(ds.get("InstanceNumber") or 0)), above))


def write_masks(results: list[SeriesStats], output_dir: Path) -> dict[str, str]:
    """``mask-<n>.npy`` per series: (slices, rows, columns), slices sorted along the normal
    (the order dts expects), 1 at or above the threshold."""
    out: dict[str, str] = {}
    for n, s in enumerate(results, start=1):
        if not s.mask or not s.voxels or len(s.mask) != len(s.instances):
            continue
        ordered = [m for _, m in sorted(s.mask, key=lambda item: item[0])]
        name = f"mask-{n}.npy"
        np.save(output_dir / name, np.stack(ordered).astype(np.uint8))
        out[s.series_uid] = name
    return out


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
            _add_slice(stats, ds, values >= threshold)
        results.append(stats)
    return results, first


# -- what dts builds the SR and the SEG from (docs/results.md) -----------------------


def _code(value: tuple[str, str, str]) -> dict[str, str]:
    return {"value": value[0], "scheme": value[1], "meaning": value[2]}


def summary(stats: SeriesStats, threshold: float) -> str:
    name = f"Series {stats.series_uid} ({stats.selection}, {stats.modality or '?'})"
    if not stats.voxels:
        return f"{name}: no image could be measured ({stats.skipped} skipped)."
    vol = "unknown (no pixel spacing)" if stats.volume_ml is None else f"{stats.volume_ml:.2f} ml"
    return (f"{name}: {stats.images} images, mean {stats.mean:.1f}, sd {stats.std:.1f}, "
            f"range {stats.minimum:g} to {stats.maximum:g}; volume at or above {threshold:g}: "
            f"{vol}.")


def results_document(results: list[SeriesStats], threshold: float,
                     masks: dict[str, str]) -> dict[str, Any]:
    """``results.json``: the figures of every measured series as measurements, and each
    thresholded volume (``masks``: series -> .npy file) as a segmentation."""
    measurements: list[dict[str, Any]] = []
    for s in results:
        if not s.voxels:
            continue
        unit = HU[0] if s.modality == "CT" else NO_UNIT[0]
        figures = [(MEAN, s.mean, unit), (STDDEV, s.std, unit), (MINIMUM, s.minimum, unit),
                   (MAXIMUM, s.maximum, unit)]
        if s.volume_ml is not None:
            figures.append((VOLUME, s.volume_ml, ML[0]))
        for concept, value, u in figures:
            measurements.append({"name": f"{concept[2].lower().replace(' ', '_')}",
                                 "value": round(float(value), 6), "unit": u,
                                 "code": _code(concept), "series_uid": s.series_uid})
    label = {"value": 1, "label": f"at or above {threshold:g}"[:64], "category": _code(TISSUE),
             "type": _code(TISSUE)}
    return {
        "model": {"name": SOFTWARE, "version": VERSION},
        "measurements": measurements,
        "segmentations": [{"file": f, "series_uid": uid, "labels": [label],
                           "algorithm": {"name": "threshold", "version": VERSION}}
                          for uid, f in masks.items()],
    }


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
    output_dir.mkdir(parents=True, exist_ok=True)
    masks = write_masks(results, output_dir)
    (output_dir / "results.json").write_text(json.dumps(
        results_document(results, threshold, masks), indent=2) + "\n")
    (output_dir / "statistics.json").write_text(json.dumps(
        {"threshold": threshold, "series": [s.as_dict() for s in results]}, indent=2) + "\n")
    for s in results:
        print(summary(s, threshold))
    return 0


if __name__ == "__main__":
    sys.exit(main())
