"""Masks (NumPy ``.npy``, NIfTI ``.nii``/``.nii.gz``) -> DICOM Segmentation, binary or
fractional, aligned to a named source series of the input (docs/results.md).

A ``.npy`` mask is ``(slices, rows, columns)`` in the order of the source series sorted
along its slice normal (the first slice is the lowest ImagePositionPatient along it);
a fractional mask may add a last axis, one per label in the order listed. A NIfTI mask
is reoriented by its affine: every axis must run along an axis of the series (either
way) and its first voxel must sit on the series' first or last voxel, else it fails.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from ..results import SegmentationSpec
from .common import BuildError, InputIndex, InputSeries, RunContext, coded, finish

_TOLERANCE_MM = 0.01


def load_mask(output_dir: Path, spec: SegmentationSpec, file: str) -> tuple[np.ndarray,
                                                                           np.ndarray | None]:
    """The mask array and, for NIfTI, its affine."""
    path = output_dir / spec.file
    if not path.is_file() or path.is_symlink():
        raise BuildError(file, spec.where, f"file {spec.file} is missing from the output")
    try:
        if spec.file.lower().endswith(".npy"):
            return np.load(path, allow_pickle=False), None
        import nibabel

        img: Any = nibabel.load(str(path))
        return np.asanyarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # numpy and nibabel raise many kinds on a broken file
        raise BuildError(file, spec.where, f"file {spec.file} cannot be read as a mask: "
                         f"{exc}") from None


def series_affine(series: InputSeries) -> tuple[np.ndarray, np.ndarray]:
    """(3x3 axes in mm for (column, row, slice) index steps, origin) in LPS."""
    first = series.headers[0]
    iop = np.array([float(x) for x in first.ImageOrientationPatient])
    dr, dc = (float(x) for x in first.PixelSpacing)
    origin = np.array([float(x) for x in first.ImagePositionPatient])
    if len(series.headers) > 1:
        last = np.array([float(x) for x in series.headers[-1].ImagePositionPatient])
        step = (last - origin) / (len(series.headers) - 1)
    else:
        step = np.cross(iop[:3], iop[3:]) * float(first.get("SliceThickness") or 1.0)
    return np.column_stack([iop[:3] * dc, iop[3:] * dr, step]), origin


def reorient_nifti(data: np.ndarray, affine: np.ndarray, series: InputSeries, file: str,
                   spec: SegmentationSpec) -> np.ndarray:
    """A NIfTI array (i, j, k[, labels]) as (slices, rows, columns[, labels])."""
    def mismatch(why: str) -> BuildError:
        return BuildError(file, spec.where, f"file {spec.file}: the NIfTI affine does not "
                          f"match the position and orientation of series {spec.series_uid} "
                          f"({why})")
    try:
        axes, origin = series_affine(series)
    except (AttributeError, TypeError, ValueError):
        raise BuildError(file, spec.where, f"series {spec.series_uid} has no image position "
                         "and orientation to check the mask against") from None
    lps = np.diag([-1.0, -1.0, 1.0])
    m, t = lps @ affine[:3, :3], lps @ affine[:3, 3]
    if data.ndim not in (3, 4):
        raise mismatch(f"{data.ndim} dimensions, 3 expected")
    order, flips = [0, 0, 0], [False, False, False]
    used: set[int] = set()
    for a in range(3):
        match: tuple[int, float] | None = None
        for b in (b for b in range(3) if b not in used):
            tol = _TOLERANCE_MM + 1e-3 * float(np.linalg.norm(axes[:, b]))
            for sign in (1.0, -1.0):
                if np.allclose(m[:, a], sign * axes[:, b], atol=tol):
                    match = (b, sign)
                    break
            if match:
                break
        if match is None:
            raise mismatch(f"voxel axis {a} does not run along an axis of the series with "
                           "its spacing")
        b, sign = match
        order[b], flips[b] = a, sign < 0
        used.add(b)
    arr = np.transpose(data, order + ([3] if data.ndim == 4 else []))
    start = t.copy()
    for b in range(3):
        if flips[b]:
            arr = np.flip(arr, axis=b)
            start = start + m[:, order[b]] * (data.shape[order[b]] - 1)
    rows, cols = int(series.headers[0].Rows), int(series.headers[0].Columns)
    want = (cols, rows, len(series.headers))
    if arr.shape[:3] != want:
        raise BuildError(file, spec.where, f"file {spec.file}: shape {data.shape[:3]} does "
                         f"not match series {spec.series_uid} ({want[2]} slices of "
                         f"{rows}x{cols})")
    if not np.allclose(start, origin, atol=_TOLERANCE_MM * 10):
        raise mismatch(f"first voxel at {np.round(start, 3).tolist()} mm, the series starts "
                       f"at {np.round(origin, 3).tolist()} mm")
    return np.transpose(arr, (2, 1, 0) + ((3,) if arr.ndim == 4 else ()))


def check_shape(arr: np.ndarray, series: InputSeries, file: str,
                spec: SegmentationSpec) -> None:
    rows, cols = int(series.headers[0].Rows), int(series.headers[0].Columns)
    want = (len(series.headers), rows, cols)
    extra = (len(spec.labels),) if spec.fractional and arr.ndim == 4 else ()
    if arr.shape != want + extra:
        raise BuildError(file, spec.where, f"file {spec.file}: shape {tuple(arr.shape)} does "
                         f"not match series {spec.series_uid} ({want[0]} slices of "
                         f"{rows}x{cols}: {want + extra} expected)")


def segment_array(arr: np.ndarray, file: str, spec: SegmentationSpec) -> np.ndarray:
    """The array highdicom takes: segment numbers 1..N (binary) or fractions in [0, 1]."""
    if spec.fractional:
        if not np.issubdtype(arr.dtype, np.floating):
            raise BuildError(file, spec.where, f"file {spec.file}: a fractional mask must be "
                             f"of floating point values, got {arr.dtype}")
        if arr.ndim == 3 and len(spec.labels) != 1:
            raise BuildError(file, spec.where, f"file {spec.file}: a 3-dimensional "
                             "fractional mask has one label; give a last axis per label")
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise BuildError(file, spec.where, f"file {spec.file}: fractional values must be "
                             "finite and from 0 to 1")
        return np.asarray(arr, dtype=np.float32)
    if arr.dtype == np.bool_:
        arr = arr.view(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise BuildError(file, spec.where, f"file {spec.file}: a binary mask holds integer "
                         f"label values, got {arr.dtype} (set fractional = true for "
                         "probabilities)")
    if arr.dtype.itemsize > 2 or np.issubdtype(arr.dtype, np.signedinteger):
        low, high = int(arr.min()), int(arr.max())
        if low < 0 or high > 65535:
            raise BuildError(file, spec.where, f"file {spec.file}: label values must be from "
                             f"0 to 65535, found {low if low < 0 else high}")
        arr = arr.astype(np.uint16)
    high = int(arr.max()) if arr.size else 0
    numbers = [label.value for label in spec.labels]
    described = set(numbers)
    if not set(range(1, high + 1)) <= described:
        # some value up to the highest has no description: is it in the mask? (slice by
        # slice: a whole-volume temporary would double the memory)
        unknown_lut = np.ones(high + 1, dtype=bool)
        unknown_lut[0] = False
        unknown_lut[[v for v in numbers if v <= high]] = False
        for plane in arr:
            found = plane[unknown_lut[plane]]
            if found.size:
                raise BuildError(file, f"{spec.where}.labels", f"file {spec.file}: label "
                                 f"value {int(found[0])} has no segment description")
    if numbers[:high] == list(range(1, min(high, len(numbers)) + 1)):
        return np.asarray(arr)  # the values are the segment numbers already
    lut = np.zeros(high + 1, dtype=np.uint8 if len(numbers) < 256 else np.uint16)
    for i, value in enumerate(numbers, start=1):
        if value <= high:
            lut[value] = i
    return lut[arr]


def build_segmentation(spec: SegmentationSpec, output_dir: Path, file: str,
                       index: InputIndex, ctx: RunContext, series: tuple[str, int],
                       instance_number: int) -> Dataset:
    series_uid, series_number = series
    source = index.get_series(file, f"{spec.where}.series_uid", spec.series_uid)
    data, affine = load_mask(output_dir, spec, file)
    if affine is not None:
        data = reorient_nifti(data, affine, source, file, spec)
    check_shape(data, source, file, spec)
    pixels = segment_array(data, file, spec)
    descriptions = []
    for number, label in enumerate(spec.labels, start=1):
        algorithm = hd.AlgorithmIdentificationSequence(
            name=(label.algorithm_name or ctx.model_name)[:64],
            family=codes.cid7162.ArtificialIntelligence,
            version=(label.algorithm_version or ctx.model_version)[:64])
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=label.label,
            segmented_property_category=coded(label.category),
            segmented_property_type=coded(label.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=generate_uid() if label.tracking_id else None,
            tracking_id=label.tracking_id))
    try:
        seg = hd.seg.Segmentation(
            source_images=source.headers, pixel_array=pixels,
            segmentation_type=(hd.seg.SegmentationTypeValues.FRACTIONAL if spec.fractional
                               else hd.seg.SegmentationTypeValues.BINARY),
            segment_descriptions=descriptions, series_instance_uid=series_uid,
            series_number=series_number, sop_instance_uid=generate_uid(),
            instance_number=instance_number, manufacturer="dts",
            manufacturer_model_name=ctx.model_name[:64],
            software_versions=ctx.software_versions(),  # type: ignore[arg-type]
            device_serial_number=(ctx.image_digest or "none")[-16:],
            omit_empty_frames=False)
    except (ValueError, TypeError, AttributeError) as exc:
        raise BuildError(file, spec.where, f"file {spec.file}: no valid segmentation of "
                         f"series {spec.series_uid} could be built: {exc}") from None
    return finish(seg, ctx, "seg", index)
