"""PDFs -> Encapsulated PDF (pydicom: highdicom has no class for it)."""

from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from ..results import DocumentSpec
from .common import BuildError, InputIndex, RunContext, finish

ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
MAX_PDF = 2 ** 31  # EncapsulatedDocumentLength is a UL; far below it in practice

_PATIENT_STUDY = ("SpecificCharacterSet", "PatientName", "PatientID", "IssuerOfPatientID",
                  "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                  "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
                  "StudyDescription")
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
          "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")


def patient_and_study(ds: Dataset, index: InputIndex) -> None:
    src = index.first
    for keyword in _PATIENT_STUDY:
        if keyword in src:
            setattr(ds, keyword, src.data_element(keyword).value)  # type: ignore[union-attr]
    for keyword in _TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, "")


def build_pdf(spec: DocumentSpec, output_dir: Path, file: str, index: InputIndex,
              ctx: RunContext, series: tuple[str, int], instance_number: int) -> Dataset:
    path = output_dir / spec.file
    if not path.is_file() or path.is_symlink():
        raise BuildError(file, spec.where, f"file {spec.file} is missing from the output")
    data = path.read_bytes()
    if not data.startswith(b"%PDF-"):
        raise BuildError(file, spec.where, f"file {spec.file} is not a PDF (no %PDF- header)")
    if len(data) >= MAX_PDF:
        raise BuildError(file, spec.where, f"file {spec.file} is too large")
    ds = Dataset()
    patient_and_study(ds, index)
    ds.SOPClassUID = ENCAPSULATED_PDF
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "DOC"
    ds.SeriesInstanceUID, ds.SeriesNumber = series
    ds.InstanceNumber = instance_number
    ds.ConversionType = "WSD"
    stamp = ctx.run_time.strftime("%Y%m%d%H%M%S")
    ds.AcquisitionDateTime = stamp
    ds.InstanceCreationDate, ds.InstanceCreationTime = stamp[:8], stamp[8:]
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = spec.title
    ds.ConceptNameCodeSequence = Sequence()
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocumentLength = len(data)
    ds.EncapsulatedDocument = data + (b"\0" if len(data) % 2 else b"")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return finish(ds, ctx, "pdf", index)
