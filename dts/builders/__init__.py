"""Owns the result builder: a model's plain output described by ``results.json`` becomes
DICOM in the input's study and patient (docs/results.md, "What is built").

The runner calls ``build`` after a ``dts``-contract run and before the output check: the
objects are written to ``output/dts-built/`` and then validated, registered and sent like
any DICOM the model wrote; the files they were made from stay ``other_files``. One module
per kind: ``sr`` (measurements: TID 1500 in a Comprehensive 3D SR; text findings: an
Enhanced SR), ``seg`` (masks: Segmentation), ``document`` (PDF: Encapsulated PDF),
``capture`` (PNG/JPEG: Secondary Capture), ``keyobjects`` (flagged images: Key Object
Selection). Each kind gets its own new series; ``RunContext.previous`` (the last run's
``built``) makes a re-run's SR name the one it replaces and its series numbers follow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from ..results import ResultsDocument
from .capture import build_capture
from .common import BUILT_DIR, BuildError, InputIndex, RunContext, save
from .document import build_pdf
from .keyobjects import build_key_objects
from .seg import build_segmentation
from .sr import build_measurement_report, build_text_report

__all__ = ["BUILT_DIR", "BuildError", "Built", "RunContext", "build", "kinds_wanted"]


@dataclass(frozen=True)
class Built:
    """One object the builder wrote (job.json ``built``)."""

    kind: str            # sr, text, seg, pdf, sc, kos
    file: str            # relative to output/
    sop_uid: str
    sop_class: str
    study_uid: str
    series_uid: str
    series_number: int

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "file": self.file, "sop_uid": self.sop_uid,
                "sop_class": self.sop_class, "study_uid": self.study_uid,
                "series_uid": self.series_uid, "series_number": self.series_number}


def kinds_wanted(doc: ResultsDocument) -> list[str]:
    from .sr import text_lines

    kinds = []
    if any(not (isinstance(m.entry["value"], str) and m.value_code is None)
           for m in doc.measurements):
        kinds.append("sr")
    if text_lines(doc):
        kinds.append("text")
    for kind, items in (("seg", doc.segmentations), ("pdf", doc.documents),
                        ("sc", doc.images), ("kos", doc.key_images)):
        if items:
            kinds.append(kind)
    return kinds


def check_files(doc: ResultsDocument, output_dir: Path) -> None:
    """Every file the document names is in the output (checked before anything is built)."""
    for where, name in doc.files():
        path = output_dir / name
        if not path.is_file() or path.is_symlink():
            raise BuildError(doc.file, where, f"file {name} is missing from the output")


def build(doc: ResultsDocument, output_dir: Path, input_dir: Path,
          ctx: RunContext, dest: Path | None = None) -> list[Built]:
    """Write every object ``doc`` asks for under ``output_dir/dts-built/`` (or ``dest``);
    BuildError (naming the file, the field and the reason) when one cannot be made."""
    check_files(doc, output_dir)
    kinds = kinds_wanted(doc)
    if not kinds:
        return []
    out = dest or output_dir / BUILT_DIR
    if dest is None and out.exists():
        raise BuildError(doc.file, "", f"the output already has a {BUILT_DIR}/ folder: the "
                         "name is reserved for what dts builds")
    index = InputIndex(input_dir)
    numbers = ctx.series_numbers(kinds)
    series = {kind: (generate_uid(), numbers[kind]) for kind in kinds}
    made: list[tuple[str, Dataset]] = []
    file = doc.file
    if "sr" in series:
        sr = build_measurement_report(doc, index, ctx, series["sr"])
        if sr is not None:
            made.append(("sr", sr))
    if "text" in series:
        text = build_text_report(doc, index, ctx, series["text"])
        if text is not None:
            made.append(("text", text))
    for i, spec in enumerate(doc.segmentations, start=1):
        made.append(("seg", build_segmentation(spec, output_dir, file, index, ctx,
                                               series["seg"], i)))
    for i, pdf in enumerate(doc.documents, start=1):
        made.append(("pdf", build_pdf(pdf, output_dir, file, index, ctx, series["pdf"], i)))
    for i, image in enumerate(doc.images, start=1):
        made.append(("sc", build_capture(image, output_dir, file, index, ctx,
                                         series["sc"], i)))
    if "kos" in series:
        kos = build_key_objects(doc, index, ctx, series["kos"])
        if kos is not None:
            made.append(("kos", kos))
    built = []
    counts: dict[str, int] = {}
    for kind, ds in made:
        counts[kind] = counts.get(kind, 0) + 1
        name = f"{kind}-{counts[kind]}.dcm"
        save(ds, out, name)
        built.append(Built(kind=kind, file=str((out / name).relative_to(out.parent)), sop_uid=str(ds.SOPInstanceUID),
                           sop_class=str(ds.SOPClassUID), study_uid=str(ds.StudyInstanceUID),
                           series_uid=str(ds.SeriesInstanceUID),
                           series_number=int(ds.SeriesNumber)))
    return built


@dataclass
class FolderCheck:
    """What ``dts results check`` found: the results document and, with an input, what
    would be built from it."""

    measurements: int
    kinds: list[str]
    built: list[Built]


def check_folder(output_dir: Path, input_dir: Path | None = None) -> FolderCheck:
    """Check a folder a model wrote, offline: results.json field by field and the files it
    names; with the model's input, build everything into a scratch folder and check it as
    the station would (InvalidResults or InvalidOutput on the first problem)."""
    import tempfile

    from ..results import RESULTS_FILE, read_document
    from ..validate import InputFacts, check_output

    doc = read_document(output_dir)
    if doc is None:
        raise BuildError(RESULTS_FILE, "", f"no {RESULTS_FILE} in {output_dir}")
    check_files(doc, output_dir)
    result = FolderCheck(measurements=len(doc.measurements), kinds=kinds_wanted(doc),
                         built=[])
    if input_dir is None:
        return result
    index = InputIndex(input_dir)
    ctx = RunContext(stream="check", model_name=doc.model_name or "model",
                     model_version=doc.model_version or "unknown")
    with tempfile.TemporaryDirectory(prefix="dts-results-check-") as scratch:
        dest = Path(scratch) / BUILT_DIR
        result.built = build(doc, output_dir, input_dir, ctx, dest=dest)
        facts = InputFacts(
            study_uids={str(h.StudyInstanceUID) for h in index.all_headers()},
            patient_ids={str(h.get("PatientID", "") or "").strip()
                         for h in index.all_headers()},
            sop_uids=set(index.by_sop))
        check_output(Path(scratch), facts)
    return result
