"""PNG/JPEG pictures -> Secondary Capture images flagged as derived, with the "not for
diagnostic use" wording in the header and, with ``burn_in``, in the pixels."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from ..results import ImageSpec
from .common import NOT_FOR_DIAGNOSTIC_USE, BuildError, InputIndex, RunContext, finish
from .document import patient_and_study

MAX_PIXELS = 8192 * 8192


def read_picture(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        if img.width * img.height > MAX_PIXELS:
            raise ValueError(f"{img.width}x{img.height} pixels is too large")
        mode = "L" if img.mode in ("1", "L", "I;16", "I", "F", "LA") else "RGB"
        pic = img.convert(mode)
    return np.asarray(pic)


def burn_in(pixels: np.ndarray, text: str) -> np.ndarray:
    """The wording in white on a black band across the top of the picture."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(pixels)
    draw = ImageDraw.Draw(img)
    box = draw.textbbox((4, 4), text)
    white = 255 if img.mode == "L" else (255, 255, 255)
    draw.rectangle((0, 0, img.width, box[3] + 4), fill=0 if img.mode == "L" else (0, 0, 0))
    draw.text((4, 4), text, fill=white)
    return np.asarray(img)


def build_capture(spec: ImageSpec, output_dir: Path, file: str, index: InputIndex,
                  ctx: RunContext, series: tuple[str, int], instance_number: int) -> Dataset:
    path = output_dir / spec.file
    if not path.is_file() or path.is_symlink():
        raise BuildError(file, spec.where, f"file {spec.file} is missing from the output")
    try:
        pixels = read_picture(path)
    except Exception as exc:  # Pillow raises many kinds on a broken picture
        raise BuildError(file, spec.where, f"file {spec.file} is not a readable PNG or "
                         f"JPEG picture: {exc}") from None
    if spec.burn_in:
        pixels = burn_in(pixels, NOT_FOR_DIAGNOSTIC_USE)
    src = index.first
    sc = hd.sc.SCImage(
        pixel_array=pixels,
        photometric_interpretation="MONOCHROME2" if pixels.ndim == 2 else "RGB",
        bits_allocated=8, coordinate_system="PATIENT",
        study_instance_uid=str(src.StudyInstanceUID), series_instance_uid=series[0],
        series_number=series[1], sop_instance_uid=generate_uid(),
        instance_number=instance_number, manufacturer="dts",
        patient_id=str(src.get("PatientID", "")), patient_name=src.get("PatientName"),
        patient_birth_date=str(src.get("PatientBirthDate", "") or "") or None,
        patient_sex=str(src.get("PatientSex", "") or "") or None,
        accession_number=str(src.get("AccessionNumber", "") or "") or None,
        study_id=str(src.get("StudyID", "") or "") or None,
        study_date=str(src.get("StudyDate", "") or "") or None,
        study_time=str(src.get("StudyTime", "") or "") or None,
        referring_physician_name=src.get("ReferringPhysicianName") or None,
        patient_orientation=("L", "F"))
    # a picture's orientation is not known: PatientOrientation (type 2C) stays empty
    # rather than claiming one (highdicom insists on a value for the PATIENT system)
    sc.PatientOrientation = ""  # type: ignore[assignment]
    # type 2C: the source's when it has one, else unknown (empty)
    sc.Laterality = str(src.get("Laterality", "") or "")
    patient_and_study(sc, index)
    sc.ImageType = ["DERIVED", "SECONDARY"]  # type: ignore[assignment]
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES" if spec.burn_in else "NO"
    sc.ImageComments = NOT_FOR_DIAGNOSTIC_USE
    sc.DerivationDescription = f"{NOT_FOR_DIAGNOSTIC_USE} ({ctx.model_name})"[:1024]
    if spec.description:
        sc.ImageComments = f"{NOT_FOR_DIAGNOSTIC_USE}: {spec.description}"[:10240]
    return finish(sc, ctx, "sc", index)
