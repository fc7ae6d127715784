"""The benchmark study: ``images`` CT images of ``size``×``size`` pixels, 16 bit, one series.

``make_study(folder, images=1000, size=512)`` writes them as
``folder/<SOPInstanceUID>.dcm`` (Explicit VR Little Endian, ≈0.5 MB each at 512²) and
returns ``folder``; a folder that already holds this exact study (``<folder>.study.txt``
beside it says so; nothing but DICOM files is inside, for ``storescu +sd``) is
reused, so repeated benchmark runs do not pay for generating it again. Every image has
its own pixel data (a shifted noise pattern), so nothing downstream can cache one image.

    .venv/bin/python -m tests.bench.data /tmp/study --images 1000 --size 512
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def make_study(folder: Path, *, images: int = 1000, size: int = 512,
               study_uid: str | None = None) -> Path:
    folder = Path(folder)
    stamp = folder.with_name(folder.name + ".study.txt")
    key = f"images={images} size={size}"
    if stamp.exists() and stamp.read_text().splitlines()[0] == key and \
            sum(1 for _ in folder.glob("*.dcm")) == images:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    stamp.unlink(missing_ok=True)
    folder.mkdir(parents=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    rng = np.random.default_rng(512)
    base = rng.integers(-1000, 2000, size=(size, size), dtype=np.int16)
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = generate_uid()
    ds.PatientID = "BENCH001"
    ds.PatientName = "Bench^Mark"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.AccessionNumber = "BENCH1"
    ds.StudyDate, ds.StudyTime, ds.StudyID = "20261126", "101500", "1"
    ds.Modality = "CT"
    ds.SeriesNumber = 1
    ds.SeriesDescription = "Benchmark CT"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelSpacing = [0.7, 0.7]
    ds.SliceThickness = 1.0
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    for i in range(images):
        sop = generate_uid()
        ds.SOPInstanceUID = sop
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(i)]
        ds.SliceLocation = float(i)
        ds.PixelData = np.roll(base, i, axis=1).tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        ds.save_as(folder / f"{sop}.dcm", enforce_file_format=True)
    stamp.write_text(f"{key}\nstudy={study_uid}\n")
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()
    print(make_study(args.folder, images=args.images, size=args.size))


if __name__ == "__main__":
    main()
