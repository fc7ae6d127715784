"""The result builder (dts/builders, docs/results.md "What is built"): a model's plain
output described by results.json becomes SR, SEG, Encapsulated PDF, Secondary Capture
and Key Object Selection in the input's study; each object is read back with highdicom,
checked by dciodvfy (dicom3tools) and stored by a real Orthanc; bad input fails the job
naming the file, the field and the reason, and nothing is sent."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from dts.builders import BUILT_DIR, Built, RunContext, build
from dts.builders.capture import NOT_FOR_DIAGNOSTIC_USE
from dts.results import UCUM_UNITS, InvalidResults, parse_document
from dts.spool import Job, Spool
from tests.helpers import make_study, run_dts, station_config
from tests.plugins.engine import make_run_job
from tests.plugins.peers import Orthanc

DCIODVFY = "/usr/bin/dciodvfy"
SCHEMA = Path(__file__).resolve().parent.parent / "dts" / "data" / "results.schema.json"
SLICES, ROWS, COLS = 4, 8, 6

LIVER = {"value": "10200004", "scheme": "SCT", "meaning": "Liver"}
ORGAN = {"value": "123037004", "scheme": "SCT", "meaning": "Anatomical Structure"}
TUMOR = {"value": "108369006", "scheme": "SCT", "meaning": "Neoplasm"}
ABNORMAL = {"value": "49755003", "scheme": "SCT", "meaning": "Morphologically Abnormal Structure"}
LENGTH = {"value": "410668003", "scheme": "SCT", "meaning": "Length"}
LABELS = [{"value": 3, "label": "Liver", "category": ORGAN, "type": LIVER},
          {"value": 7, "label": "Tumor", "category": ABNORMAL, "type": TUMOR,
           "tracking_id": "lesion 1"}]


def series_study(folder: Path, n_series: int = 1) -> dict[str, Any]:
    """A study whose series have proper geometry (a frame of reference, positions)."""
    return make_study(folder, n_series=n_series, per_series=SLICES, rows=ROWS, cols=COLS,
                      FrameOfReferenceUID=generate_uid(), patient_id="PAT-B1",
                      accession="ACC-B1", PatientSex="F", PatientBirthDate="19700101")


def label_mask() -> np.ndarray:
    mask = np.zeros((SLICES, ROWS, COLS), np.uint8)
    mask[1:3, 2:6, 1:4] = 3
    mask[2, 3:5, 2:3] = 7
    mask[3, 0, 0] = 7
    return mask


def picture(path: Path) -> None:
    from PIL import Image

    Image.fromarray((np.arange(64 * 96).reshape(64, 96) % 200).astype(np.uint8)).save(path)


PDF = b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"


def everything(series_uid: str, sops: list[str]) -> dict[str, Any]:
    return {
        "model": {"name": "liver-ai", "version": "2.1"},
        "measurements": [
            {"name": "tumor_length", "value": 42.5, "unit": "mm", "code": LENGTH,
             "finding": TUMOR, "finding_site": LIVER, "tracking_id": "lesion 1",
             "series_uid": series_uid, "sop_uids": [sops[2]]},
            {"name": "liver_volume", "value": 1520.25, "unit": "ml", "series_uid": series_uid},
            {"name": "lesions", "value": 1, "unit": "{count}"},
            {"name": "malignant", "value": True, "tracking_id": "lesion 1",
             "finding": TUMOR, "series_uid": series_uid},
            {"name": "impression", "value": "one lesion in the liver"}],
        "findings": ["Single hepatic lesion, 42.5 mm."],
        "segmentations": [{"file": "mask.npy", "series_uid": series_uid, "labels": LABELS,
                           "algorithm": {"name": "liver-seg", "version": "2.1"}}],
        "documents": [{"file": "report.pdf", "title": "Liver AI report"}],
        "images": [{"file": "overlay.png", "burn_in": True, "description": "lesion overlay"},
                   {"file": "plain.png"}],
        "key_images": [{"sop_uid": sops[2]}],
    }


def write_output(out: Path, doc: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "mask.npy", label_mask())
    (out / "report.pdf").write_bytes(PDF)
    picture(out / "overlay.png")
    picture(out / "plain.png")
    (out / "results.json").write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("built")
    study = series_study(root / "input")
    [series_uid] = study["series"]
    sops = study["series"][series_uid]
    write_output(root / "output", everything(series_uid, sops))
    doc = parse_document("results.json", json.loads((root / "output" / "results.json")
                                                    .read_text()))
    ctx = RunContext(stream="liver", model_name="liver-ai", model_version="2.1",
                     image_digest="ab" * 32)
    built = build(doc, root / "output", root / "input", ctx)
    return {"root": root, "study": study, "series_uid": series_uid, "sops": sops,
            "built": built, "by_kind": {b.kind: b for b in built}}


def read(made: dict[str, Any], b: Built) -> pydicom.Dataset:
    return pydicom.dcmread(made["root"] / "output" / b.file)


def test_every_kind_is_built_in_the_inputs_study_with_fresh_uids(made: dict[str, Any]) -> None:
    kinds = [b.kind for b in made["built"]]
    assert kinds == ["sr", "text", "seg", "pdf", "sc", "sc", "kos"]
    src = pydicom.dcmread(next((made["root"] / "input").rglob("*.dcm")))
    inputs = set(made["sops"]) | {made["series_uid"]}
    series = {}
    for b in made["built"]:
        ds = read(made, b)
        assert b.file.startswith(f"{BUILT_DIR}/")
        for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "AccessionNumber",
                        "StudyDate", "StudyID"):
            assert ds.data_element(keyword).value == src.data_element(keyword).value, keyword
        assert ds.SOPInstanceUID not in inputs and ds.SeriesInstanceUID not in inputs
        assert ds.Manufacturer == "dts" and ds.ManufacturerModelName == "liver-ai"
        assert list(ds.SoftwareVersions) == ["dts 0.1.0", "2.1", "ab" * 32]
        assert ds.SeriesDescription == {"sr": "liver SR", "text": "liver text SR",
                                        "seg": "liver SEG", "pdf": "liver PDF",
                                        "sc": "liver images", "kos": "liver key images"}[b.kind]
        assert len(ds.ContentDate) == 8 and ds.file_meta.MediaStorageSOPInstanceUID == \
            ds.SOPInstanceUID
        series.setdefault(b.kind, set()).add((ds.SeriesInstanceUID, int(ds.SeriesNumber)))
    # one new series per kind, numbered from 9001 in a fixed order
    assert all(len(v) == 1 for v in series.values())
    assert sorted(n for [(_, n)] in series.values()) == list(range(9001, 9007))


def test_seg_gives_back_the_mask_voxel_for_voxel(made: dict[str, Any]) -> None:
    seg = hd.seg.segread(made["root"] / "output" / made["by_kind"]["seg"].file)
    assert seg.SegmentationType == "BINARY"
    assert [seg.get_segment_description(n).SegmentLabel for n in (1, 2)] == ["Liver", "Tumor"]
    tumor = seg.get_segment_description(2)
    assert tumor.segmented_property_type.value == TUMOR["value"]
    assert tumor.tracking_id == "lesion 1"
    assert tumor.algorithm_identification[0].AlgorithmName == "liver-seg"
    pixels = seg.get_pixels_by_source_instance(made["sops"], combine_segments=True)
    want = label_mask()
    want = np.where(want == 3, 1, np.where(want == 7, 2, 0))  # label values -> segments
    assert np.array_equal(pixels, want)


def test_sr_gives_back_values_units_and_references(made: dict[str, Any]) -> None:
    sr = hd.sr.srread(made["root"] / "output" / made["by_kind"]["sr"].file)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.CompletionFlag == "COMPLETE"
    groups = {g.tracking_identifier: g for g in sr.content.get_image_measurement_groups()}
    assert set(groups) == {"lesion 1", "series 1", "measurements"}
    lesion = groups["lesion 1"]
    [length] = lesion.get_measurements()
    assert (length.name.value, length.value, length.unit.value) == ("410668003", 42.5, "mm")
    assert length.finding_sites[0].value.value == LIVER["value"]
    [ref] = length.referenced_images
    assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == made["sops"][2]
    assert lesion.finding_type.value == TUMOR["value"]
    [malignant] = lesion.get_qualitative_evaluations()
    assert (malignant.name.meaning, malignant.value.meaning) == ("malignant", "Yes")
    assert {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for i in lesion.source_images} == set(made["sops"])
    [volume] = groups["series 1"].get_measurements()
    assert {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for i in groups["series 1"].source_images} == set(made["sops"])
    # no code given: the name in dts's private scheme, described in the header
    assert (volume.name.value, volume.name.scheme_designator) == ("liver_volume", "99DTS")
    assert (volume.value, volume.unit.value) == (1520.25, "ml")
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99DTS"
    [count] = groups["measurements"].get_measurements()
    assert (count.value, count.unit.value) == (1, "{count}")
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert {r.ReferencedSOPInstanceUID for r in evidence.ReferencedSOPSequence} == \
        set(made["sops"])


def test_text_pdf_capture_and_key_objects(made: dict[str, Any]) -> None:
    by = made["by_kind"]
    text = read(made, by["text"])
    assert text.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR
    assert [i.TextValue for i in text.ContentSequence] == [
        "Single hepatic lesion, 42.5 mm.", "impression: one lesion in the liver"]
    pdf = read(made, by["pdf"])
    assert pdf.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert pdf.EncapsulatedDocument[:len(PDF)] == PDF
    assert pdf.EncapsulatedDocumentLength == len(PDF) and pdf.DocumentTitle == "Liver AI report"
    overlay, plain = (pydicom.dcmread(made["root"] / "output" / f"{BUILT_DIR}/sc-{i}.dcm")
                      for i in (1, 2))
    for sc in (overlay, plain):
        assert list(sc.ImageType) == ["DERIVED", "SECONDARY"]
        assert sc.ImageComments.startswith(NOT_FOR_DIAGNOSTIC_USE)
    assert overlay.BurnedInAnnotation == "YES" and plain.BurnedInAnnotation == "NO"
    # the wording was drawn into the top band of the burned-in picture only
    assert not np.array_equal(overlay.pixel_array[:16], plain.pixel_array[:16])
    assert np.array_equal(overlay.pixel_array[32:], plain.pixel_array[32:])
    kos = read(made, by["kos"])
    [ref] = [i for i in kos.ContentSequence if i.ValueType == "IMAGE"]
    assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == made["sops"][2]


@pytest.mark.peers
def test_dciodvfy_finds_no_error_in_any_built_object(made: dict[str, Any]) -> None:
    for b in made["built"]:
        proc = subprocess.run([DCIODVFY, str(made["root"] / "output" / b.file)],
                              capture_output=True, text=True, timeout=60)
        lines = (proc.stdout + proc.stderr).splitlines()
        errors = [line for line in lines if line.startswith("Error")]
        assert not errors, f"{b.kind}: {errors}"


# -- NIfTI and fractional masks -------------------------------------------------------


def nifti(path: Path, mask: np.ndarray, *, flip_rows: bool = True,
          shift: float = 0.0) -> None:
    """``mask`` (slices, rows, columns) as NIfTI of the series of series_study: i along
    the columns, j along the rows (reversed, as dcm2niix writes), k along the slices."""
    import nibabel

    data = np.transpose(mask, (2, 1, 0))  # (columns, rows, slices)
    lps = np.array([[0.5, 0, 0, 0.0], [0, 0.5, 0, 0.0], [0, 0, 1.0, 1.0 + shift],
                    [0, 0, 0, 1]])
    if flip_rows:
        data = data[:, ::-1, :]
        lps[:3, 3] += lps[:3, 1] * (ROWS - 1)
        lps[:3, 1] *= -1
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    nibabel.save(nibabel.Nifti1Image(np.ascontiguousarray(data), ras), str(path))


def _one_seg(tmp_path: Path, spec: dict[str, Any], write: Any) -> tuple[Any, dict[str, Any]]:
    study = series_study(tmp_path / "input")
    [series_uid] = study["series"]
    out = tmp_path / "output"
    out.mkdir()
    write(out)
    doc = parse_document("results.json", {"segmentations": [{**spec, "series_uid": series_uid}]})
    [b] = build(doc, out, tmp_path / "input", RunContext(stream="s", model_name="m"))
    return hd.seg.segread(out / b.file), study["series"][series_uid]


def test_nifti_mask_is_reoriented_by_its_affine(tmp_path: Path) -> None:
    seg, sops = _one_seg(tmp_path, {"file": "mask.nii.gz", "labels": LABELS},
                         lambda out: nifti(out / "mask.nii.gz", label_mask()))
    pixels = seg.get_pixels_by_source_instance(sops, combine_segments=True)
    want = label_mask()
    assert np.array_equal(pixels, np.where(want == 3, 1, np.where(want == 7, 2, 0)))


def test_fractional_mask(tmp_path: Path) -> None:
    prob = np.linspace(0, 1, SLICES * ROWS * COLS, dtype=np.float32).reshape(SLICES, ROWS,
                                                                             COLS)
    seg, sops = _one_seg(tmp_path, {"file": "p.npy", "fractional": True,
                                    "labels": LABELS[:1]},
                         lambda out: np.save(out / "p.npy", prob))
    assert seg.SegmentationType == "FRACTIONAL"
    back = seg.get_pixels_by_source_instance(sops, combine_segments=False)[..., 0]
    assert np.allclose(back, prob, atol=1 / 255)  # 8-bit fractions


# -- the schema -------------------------------------------------------------------------


def test_shipped_json_schema_agrees_with_the_checks(made: dict[str, Any]) -> None:
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    good = everything(made["series_uid"], made["sops"])
    jsonschema.validate(good, schema)
    parse_document("results.json", good)
    units = schema["properties"]["measurements"]["items"]["properties"]["unit"]["anyOf"]
    assert [u["enum"] for u in units if "enum" in u] == [list(UCUM_UNITS)]
    measurement = schema["properties"]["measurements"]["items"]["properties"]
    assert set(measurement) == {"name", "value", "unit", "series_uid", "sop_uids", "code",
                                "value_code", "finding", "finding_site", "tracking_id"}
    assert set(schema["properties"]) == {"model", "measurements", "findings", "segmentations",
                                         "documents", "images", "key_images"}
    bad = [{"measurements": [{"name": "a", "value": 1, "unit": "furlong"}]},
           {"measurements": [{"name": "a", "value": 1, "code": {"value": "x"}}]},
           {"segmentations": [{"file": "m.npy", "series_uid": "1.2", "labels": []}]},
           {"segmentations": [{"file": "m.png", "series_uid": "1.2", "labels": LABELS}]},
           {"segmentations": [{"file": "m.npy", "series_uid": "1.2",
                               "labels": [{"value": 1, "label": "x", "category": ORGAN}]}]},
           {"documents": [{"file": "../x.pdf"}]}, {"images": [{"file": "a.png", "burn_in": 1}]},
           {"key_images": [{"sop_uid": "x"}]}, {"findings": [""]}]
    for doc in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(doc, schema)
        with pytest.raises(InvalidResults):
            parse_document("results.json", doc)


# -- through `dts run`: bad input fails naming file, field, reason ----------------------

COPY = ("import shutil, os, sys; "
        "shutil.copytree(os.environ['FROM'], sys.argv[1], dirs_exist_ok=True)")


def _station(tmp_path: Path, source: Path, **stream: Any) -> Path:
    return station_config(tmp_path, destinations=[{"name": "out", "folder": str(tmp_path /
                                                                                "delivered")}],
                          streams=[{"name": "ai", "command": ["{python}", "-c", COPY,
                                                              "{output}"],
                                    "parameters": {"FROM": str(source)},
                                    "destinations": ["out"], **stream}])


def _bad(series: str, sops: list[str], case: str, out: Path) -> str:
    """Write the model output of one bad case into ``out``; the message expected."""
    good = {"file": "mask.npy", "series_uid": series, "labels": LABELS}
    mask = label_mask()
    doc: dict[str, Any] = {"segmentations": [good]}
    expect = ""
    if case == "schema":
        doc = {"segmentations": [{"file": "mask.npy", "labels": LABELS}]}
        expect = "results.json: segmentations[0]: series_uid is missing"
    elif case == "foreign-series":
        other = generate_uid()
        doc = {"measurements": [{"name": "a", "value": 1, "unit": "mm", "series_uid": other}]}
        expect = f"results.json: measurements[0]: series_uid {other} is not a series of the input"
    elif case == "shape":
        mask = mask[:, :, :-1]
        expect = (f"results.json: segmentations[0]: file mask.npy: shape (4, 8, 5) does not "
                  f"match series {series}")
    elif case == "geometry":
        nifti(out / "mask.nii", mask, shift=2.5)
        doc = {"segmentations": [{**good, "file": "mask.nii"}]}
        expect = ("results.json: segmentations[0]: file mask.nii: the NIfTI affine does not "
                  f"match the position and orientation of series {series}")
    elif case == "undescribed-label":
        mask[0, 0, 0] = 9
        expect = ("results.json: segmentations[0].labels: file mask.npy: label value 9 has no "
                  "segment description")
    elif case == "infinite":
        (out / "results.json").write_text('{"measurements": [{"name": "a", "value": Infinity}]}')
        return "results.json: not valid JSON: Infinity is not a JSON number"
    elif case == "unit":
        doc = {"measurements": [{"name": "a", "value": 1, "unit": "furlong"}]}
        expect = "results.json: measurements[0]: unit 'furlong' is not a UCUM unit dts knows"
    elif case == "missing-file":
        doc = {"documents": [{"file": "report.pdf"}], **doc}
        expect = "results.json: documents[0]: file report.pdf is missing from the output"
    elif case == "foreign-image":
        doc = {"key_images": [{"sop_uid": "1.2.3.4"}]}
        expect = ("results.json: key_images[0].sop_uid: SOP Instance UID 1.2.3.4 is not an "
                  "instance of the input")
    np.save(out / "mask.npy", mask)
    (out / "results.json").write_text(json.dumps(doc))
    return expect


@pytest.mark.parametrize("case", ["schema", "foreign-series", "shape", "geometry",
                                  "undescribed-label", "infinite", "unit", "missing-file",
                                  "foreign-image"])
def test_bad_output_fails_the_job_naming_file_field_reason(tmp_path: Path, case: str) -> None:
    study = series_study(tmp_path / "study")
    [series] = study["series"]
    path, _ = make_run_job(tmp_path / "spool", "ai", study=study)
    source = tmp_path / "model-output"
    source.mkdir()
    expect = _bad(series, study["series"][series], case, source)
    proc = run_dts("run", "--once", config=_station(tmp_path, source))
    assert proc.returncode == 1, proc.stderr
    loc, found = Spool(tmp_path / "spool").find(path.name)
    assert str(loc).startswith("failed")
    data = Job(found).read()
    assert data["failure"]["reason"] == "invalid-results"
    assert expect in data["failure"]["message"], data["failure"]["message"]
    assert "outputs" not in data and "built" not in data
    assert not (Job(found).output_dir / BUILT_DIR).exists()
    # nothing was sent: the send stage has nothing, the folder destination stays empty
    assert run_dts("send", "--once", config=_station(tmp_path, source)).returncode == 0
    assert not (tmp_path / "delivered").exists() or not any((tmp_path / "delivered").iterdir())


# -- revisions ------------------------------------------------------------------------


def test_a_rerun_references_the_sr_it_replaces(tmp_path: Path) -> None:
    study = series_study(tmp_path / "study")
    [series] = study["series"]
    path, _ = make_run_job(tmp_path / "spool", "ai", study=study)
    source = tmp_path / "model-output"
    write_output(source, everything(series, study["series"][series]))
    config = _station(tmp_path, source, series_description="AI {kind} ({model})")
    assert run_dts("run", "--once", config=config).returncode == 0
    first = Job(Spool(tmp_path / "spool").find(path.name)[1]).read()["built"]
    assert run_dts("requeue", path.name, "--to", "run", config=config).returncode == 0
    assert run_dts("run", "--once", config=config).returncode == 0
    job = Job(Spool(tmp_path / "spool").find(path.name)[1])
    second = job.read()["built"]
    old = {b["kind"]: b for b in first}
    new = {b["kind"]: b for b in second}
    assert set(old) == set(new)
    assert min(b["series_number"] for b in second) > max(b["series_number"] for b in first)
    for kind in ("sr", "text"):
        ds = pydicom.dcmread(job.output_dir / new[kind]["file"])
        [study_ref] = ds.PredecessorDocumentsSequence
        [series_ref] = study_ref.ReferencedSeriesSequence
        assert series_ref.SeriesInstanceUID == old[kind]["series_uid"]
        assert series_ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
            old[kind]["sop_uid"]
        assert ds.SeriesDescription == f"AI {'SR' if kind == 'sr' else 'text SR'} (liver-ai)"


# -- `dts results check` ------------------------------------------------------------


def test_results_check_cli(tmp_path: Path) -> None:
    study = series_study(tmp_path / "input")
    [series] = study["series"]
    out = tmp_path / "out"
    write_output(out, everything(series, study["series"][series]))
    proc = run_dts("results", "check", str(out))
    assert proc.returncode == 0 and "builds sr, text, seg, pdf, sc, kos" in proc.stdout
    proc = run_dts("results", "check", str(out), "--input", str(tmp_path / "input"))
    assert proc.returncode == 0, proc.stderr
    assert "seg: SOP Class 1.2.840.10008.5.1.4.1.1.66.4" in proc.stdout
    assert not (out / BUILT_DIR).exists()  # the folder checked is left as it was
    np.save(out / "mask.npy", label_mask()[:2])
    proc = run_dts("results", "check", str(out), "--input", str(tmp_path / "input"))
    assert proc.returncode == 1 and "file mask.npy: shape (2, 8, 6)" in proc.stderr
    (out / "report.pdf").unlink()
    proc = run_dts("results", "check", str(out))
    assert proc.returncode == 1 and "documents[0]: file report.pdf is missing" in proc.stderr
    assert run_dts("results", "check", str(tmp_path / "nowhere")).returncode == 2


# -- delivered to a real PACS ------------------------------------------------------------


@pytest.mark.slow
def test_built_objects_are_stored_by_orthanc_and_read_back(tmp_path: Path,
                                                           orthanc: Orthanc) -> None:
    study = series_study(tmp_path / "study")
    [series] = study["series"]
    path, _ = make_run_job(tmp_path / "spool", "ai", study=study)
    source = tmp_path / "model-output"
    write_output(source, everything(series, study["series"][series]))
    config = station_config(
        tmp_path, station={"ae_title": "DTS"},
        destinations=[{"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1",
                       "port": orthanc.port}],
        streams=[{"name": "ai", "command": ["{python}", "-c", COPY, "{output}"],
                  "parameters": {"FROM": str(source)}, "destinations": ["pacs"]}])
    assert run_dts("run", "--once", config=config).returncode == 0
    proc = run_dts("send", "--once", config=config)
    assert proc.returncode == 0, proc.stderr
    job = Job(Spool(tmp_path / "spool").find(path.name)[1])
    built = job.read()["built"]
    assert orthanc.sop_uids() == {b["sop_uid"] for b in built}
    tags = orthanc.instances()
    assert {t["StudyInstanceUID"] for t in tags.values()} == {study["study_uid"]}
    [seg_entry] = [b for b in built if b["kind"] == "seg"]
    req = urllib.request.Request(f"{orthanc.url}/tools/lookup", method="POST",
                                 data=seg_entry["sop_uid"].encode())
    with urllib.request.urlopen(req, timeout=10) as r:
        [found] = json.loads(r.read())
    with urllib.request.urlopen(f"{orthanc.url}/instances/{found['ID']}/file",
                                timeout=10) as r:
        (tmp_path / "back.dcm").write_bytes(r.read())
    seg = hd.seg.segread(tmp_path / "back.dcm")
    pixels = seg.get_pixels_by_source_instance(study["series"][series], combine_segments=True)
    want = label_mask()
    assert np.array_equal(pixels, np.where(want == 3, 1, np.where(want == 7, 2, 0)))
    shutil.rmtree(source)


# -- configuration ------------------------------------------------------------------


@pytest.mark.parametrize("key,value,reason", [
    ("build", '"yes"', "build"),
    ("series_description", '"{stream} {nope}"', "unknown placeholder {nope}"),
    ("series_description", '""', "expected a non-empty text"),
])
def test_stream_build_keys_are_checked(tmp_path: Path, key: str, value: str,
                                       reason: str) -> None:
    config = station_config(tmp_path, streams=[{"name": "ai", "command": ["true"]}],
                            stream_text=f"{key} = {value}")
    proc = run_dts("config", "check", str(config))
    assert proc.returncode == 2, proc.stderr
    assert f"dts.toml: stream.ai.{key}: " in proc.stderr and reason in proc.stderr
