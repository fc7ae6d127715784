"""The example processing (dts.examples.series_statistics) end to end: the default
configuration's stream run by `dts run`; the SR and SEG dts builds from its results.json
and masks checked against figures computed here from the input pixels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from dts import config as config_mod
from dts.examples import series_statistics as example
from dts.results import parse_document
from dts.spool import Job
from tests.helpers import make_instance, run_dts
from tests.plugins.engine import make_run_job

DSRDUMP = "/usr/bin/dsrdump"  # dcmtk, by full path
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def expected_figures(files: list[Path], threshold: float) -> dict[str, float]:
    values, voxel = [], []
    for f in files:
        ds = pydicom.dcmread(f)
        v = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + \
            float(ds.get("RescaleIntercept", 0))
        values.append(v.ravel())
        voxel.append(float(ds.PixelSpacing[0]) * float(ds.PixelSpacing[1]) *
                     float(ds.SliceThickness))
    allv = np.concatenate(values)
    volume = sum(int(np.count_nonzero(v >= threshold)) * vx for v, vx in zip(values, voxel))
    return {"mean": allv.mean(), "std": allv.std(), "min": allv.min(), "max": allv.max(),
            "volume_ml": volume / 1000.0}


def measurement(group: Any, meaning: str) -> tuple[float, str]:
    for m in group.get_measurements():
        if m.name.meaning == meaning:
            return m.value, m.unit.value
    raise AssertionError(f"no {meaning} in the measurement group")


@pytest.mark.peers
def test_default_stream_produces_a_valid_sr_and_seg(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    default = config_mod.load(None).stream("series-statistics")
    assert default is not None and default.command is not None
    threshold = float(default.parameters["threshold"])
    job_path, study = make_run_job(spool, "series-statistics", n_series=2, per_series=3,
                                   patient_id="PAT042", accession="ACC042",
                                   RescaleSlope=1, RescaleIntercept=-24,
                                   FrameOfReferenceUID=generate_uid())
    job_id = job_path.name

    # the embedded configuration, only the spool is the test's
    proc = run_dts("--spool", str(spool), "run", "--once")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    job = Job(spool / "send" / "new" / job_id)
    data = job.read()
    # the example writes plain files; dts built an SR and one SEG per series of them
    assert sorted(data["other_files"]) == ["mask-1.npy", "mask-2.npy", "results.json",
                                           "statistics.json"]
    assert sorted(b["kind"] for b in data["built"]) == ["seg", "seg", "sr"]
    assert {o["sop_uid"] for o in data["outputs"]} == {b["sop_uid"] for b in data["built"]}
    [sr_entry] = [b for b in data["built"] if b["kind"] == "sr"]
    sr_file = job.output_dir / sr_entry["file"]
    sr = hd.sr.srread(sr_file)
    src = pydicom.dcmread(next((job.input_dir).rglob("*.dcm")))

    # the input's patient and study, a new series and instance, dts as the maker
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR == sr_entry["sop_class"]
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "AccessionNumber",
                    "StudyDate", "StudyID"):
        assert sr.data_element(keyword).value == src.data_element(keyword).value, keyword
    assert sr.PatientID == "PAT042"
    inputs = {sop for sops in study["series"].values() for sop in sops}
    assert sr.SOPInstanceUID not in inputs and sr.SeriesInstanceUID not in study["series"]
    assert sr.file_meta.MediaStorageSOPInstanceUID == sr.SOPInstanceUID
    assert sr.Modality == "SR" and sr.Manufacturer == "dts" and sr.SoftwareVersions
    assert sr.ManufacturerModelName == example.SOFTWARE
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    # dcmtk's SR parser, strict (no relaxing options), has nothing to complain about
    dump = subprocess.run([DSRDUMP, "-ll", "warn", str(sr_file)],
                          capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0 and dump.stderr == "", dump.stderr
    assert "Comprehensive 3D SR Document" in dump.stdout and '"Volume"' in dump.stdout

    # every source instance referenced, grouped by series
    [evidence] = sr.CurrentRequestedProcedureEvidenceSequence
    assert evidence.StudyInstanceUID == study["study_uid"]
    referenced = {s.SeriesInstanceUID: sorted(r.ReferencedSOPInstanceUID
                                              for r in s.ReferencedSOPSequence)
                  for s in evidence.ReferencedSeriesSequence}
    assert referenced == {s: sorted(v) for s, v in study["series"].items()}

    # one measurement group per series, with figures computed here independently
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == 2
    for group in groups:
        sops = {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in group.source_images}
        [series] = [s for s, v in study["series"].items() if set(v) == sops]
        files = [job.input_dir / series / f"{sop}.dcm" for sop in study["series"][series]]
        want = expected_figures(files, threshold)
        mean, unit = measurement(group, "Mean")
        assert unit == "[hnsf'U]"
        assert mean == pytest.approx(want["mean"], rel=1e-5)
        assert measurement(group, "Standard Deviation")[0] == pytest.approx(want["std"], rel=1e-5)
        assert measurement(group, "Minimum")[0] == want["min"]
        assert measurement(group, "Maximum")[0] == want["max"]
        volume, unit = measurement(group, "Volume")
        assert unit == "ml" and want["volume_ml"] > 0
        assert volume == pytest.approx(want["volume_ml"], rel=1e-5)

    # each SEG: the thresholded volume of its series, voxel for voxel
    for entry in (b for b in data["built"] if b["kind"] == "seg"):
        seg = hd.seg.segread(job.output_dir / entry["file"])
        assert seg.StudyInstanceUID == study["study_uid"] and seg.PatientID == "PAT042"
        [series] = {r.SeriesInstanceUID for r in seg.ReferencedSeriesSequence}
        sops = study["series"][series]  # made in slice order
        pixels = seg.get_pixels_by_source_instance(sops, combine_segments=True)
        want = np.stack([
            pydicom.dcmread(job.input_dir / series / f"{sop}.dcm").pixel_array - 24 >= threshold
            for sop in sops])
        assert pixels.any() and np.array_equal(pixels.astype(bool), want)
    assert len(data["results"]) == 10  # 5 figures of 2 series, also job.json results
    stats = json.loads((job.output_dir / "statistics.json").read_text())
    assert stats["threshold"] == threshold and len(stats["series"]) == 2


def test_threshold_parameter_and_plain_folder(tmp_path: Path) -> None:
    """Run as a plain program on a folder without task.json; threshold from the env."""
    study = generate_uid()
    series = generate_uid()
    files = [make_instance(tmp_path / "in" / "x" / f"{i}.dcm", study_uid=study,
                           series_uid=series, instance_number=i + 1) for i in range(2)]
    volumes = {}
    for threshold in ("0", "1000"):
        out = tmp_path / f"out-{threshold}"
        env = {**os.environ, "threshold": threshold}
        proc = subprocess.run([sys.executable, "-m", "dts.examples.series_statistics",
                               str(tmp_path / "in"), str(out)], env=env, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert not list(out.glob("*.dcm")) and not list(out.glob("*.npy"))  # no frame of ref.
        doc = json.loads((out / "results.json").read_text())
        parse_document("results.json", doc)  # what dts accepts
        [volume] = [m for m in doc["measurements"] if m["name"] == "volume"]
        assert volume["unit"] == "ml" and volume["series_uid"] == series
        volumes[threshold] = volume["value"]
        assert volumes[threshold] == pytest.approx(
            expected_figures(files, float(threshold))["volume_ml"], rel=1e-5)
    assert volumes["0"] > volumes["1000"] > 0


def test_nothing_measurable_exits_non_zero(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    assert example.main([str(tmp_path / "in"), str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out").exists()
