"""Benchmark: the result builder (``dts.builders.build``) against calling highdicom
directly on the same data: the SEG of a 512x512x300 binary mask with two labels and the
SR of 50 measurements (one series of 300 CT images as the source).

Each try runs in its own process (peak memory is that process's maximum resident set),
alternating the two, and reports medians; the builder's overhead is its extra time and
memory over the direct calls, which read the same files and write the same objects.

    .venv/bin/python -m tests.bench.bench_builders [--runs 3] [--slices 300] [--size 512]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tests.helpers import REPO

LIVER = {"value": "10200004", "scheme": "SCT", "meaning": "Liver"}
TUMOR = {"value": "108369006", "scheme": "SCT", "meaning": "Neoplasm"}
ORGAN = {"value": "123037004", "scheme": "SCT", "meaning": "Anatomical Structure"}
ABNORMAL = {"value": "49755003", "scheme": "SCT", "meaning": "Morphologically Abnormal Structure"}
LENGTH = {"value": "410668003", "scheme": "SCT", "meaning": "Length"}


def make_data(root: Path, slices: int, size: int) -> Path:
    """The source series, mask.npy and results.json under ``root`` (made once)."""
    from pydicom.uid import generate_uid

    from tests.helpers import make_instance

    done = root / "ready"
    if done.exists():
        return root
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for i in range(slices):
        make_instance(root / "input" / series / f"{i:04d}.dcm", study_uid=study,
                      series_uid=series, instance_number=i + 1, rows=size, cols=size,
                      FrameOfReferenceUID=frame, PatientSex="F", PatientBirthDate="19700101",
                      ReferringPhysicianName="")
    out = root / "output"
    out.mkdir(parents=True, exist_ok=True)
    z, y, x = np.ogrid[:slices, :size, :size]
    mask = np.zeros((slices, size, size), np.uint8)
    mask[((z - slices / 2) / (slices / 3)) ** 2 + ((y - size / 2) / (size / 3)) ** 2
         + ((x - size / 2) / (size / 3)) ** 2 <= 1] = 1
    mask[slices // 3: slices // 2, size // 4: size // 3, size // 4: size // 3] = 2
    np.save(out / "mask.npy", mask)
    doc = {"model": {"name": "bench", "version": "1"},
           "measurements": [{"name": f"m{i}", "value": i * 1.5, "unit": "mm", "code": LENGTH,
                             "series_uid": series} for i in range(50)],
           "segmentations": [{"file": "mask.npy", "series_uid": series, "labels": [
               {"value": 1, "label": "Liver", "category": ORGAN, "type": LIVER},
               {"value": 2, "label": "Tumor", "category": ABNORMAL, "type": TUMOR}]}]}
    (out / "results.json").write_text(json.dumps(doc))
    done.touch()
    return root


def run_dts(root: Path, dest: Path) -> None:
    from dts.builders import RunContext, build
    from dts.results import read_document

    doc = read_document(root / "output")
    assert doc is not None
    build(doc, root / "output", root / "input", RunContext(stream="bench", model_name="bench",
                                                           model_version="1"), dest=dest)


def run_direct(root: Path, dest: Path) -> None:
    """What a model author would write with highdicom: the same objects, by hand."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    doc = json.loads((root / "output" / "results.json").read_text())
    headers = [pydicom.dcmread(f, stop_before_pixels=True)
               for f in sorted((root / "input").rglob("*.dcm"))]
    headers.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    mask = np.load(root / "output" / "mask.npy")

    def code(c: dict[str, str]) -> Any:
        return hd.sr.CodedConcept(c["value"], c["scheme"], c["meaning"])

    algorithm = hd.AlgorithmIdentificationSequence(
        name="bench", family=codes.cid7162.ArtificialIntelligence, version="1")
    labels = doc["segmentations"][0]["labels"]
    descriptions = [hd.seg.SegmentDescription(
        segment_number=i, segment_label=lab["label"],
        segmented_property_category=code(lab["category"]),
        segmented_property_type=code(lab["type"]),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm) for i, lab in enumerate(labels, start=1)]
    seg = hd.seg.Segmentation(
        source_images=headers, pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=generate_uid(),
        series_number=1, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer="dts", manufacturer_model_name="bench", software_versions="1",
        device_serial_number="1", omit_empty_frames=False)
    dest.mkdir(parents=True, exist_ok=True)
    seg.save_as(dest / "seg.dcm")
    measurements = [hd.sr.Measurement(name=code(m["code"]), value=m["value"],
                                      unit=hd.sr.CodedConcept("mm", "UCUM", "millimeter"))
                    for m in doc["measurements"]]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="series 1"),
        measurements=measurements,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(h)
                       for h in headers])
    device = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name="bench"))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=hd.sr.CodedConcept("363679005", "SCT", "Imaging procedure"),
        imaging_measurements=[group])
    sr = hd.sr.Comprehensive3DSR(evidence=headers, content=report[0],
                                 series_instance_uid=generate_uid(), series_number=2,
                                 sop_instance_uid=generate_uid(), instance_number=1,
                                 manufacturer="dts", is_complete=True)
    sr.save_as(dest / "sr.dcm")


def one(kind: str, root: Path) -> None:
    import highdicom  # noqa: F401  (imports are not what is measured)

    import dts.builders  # noqa: F401
    with tempfile.TemporaryDirectory(prefix="bench-builders-") as tmp:
        start = time.perf_counter()
        (run_dts if kind == "dts" else run_direct)(root, Path(tmp) / "out")
        seconds = time.perf_counter() - start
        size = sum(f.stat().st_size for f in (Path(tmp) / "out").iterdir())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    print(json.dumps({"kind": kind, "seconds": seconds, "peak_mb": peak, "bytes": size}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--one", choices=("dts", "direct"), help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(args.one, args.data)
        return 0
    root = make_data(Path(tempfile.gettempdir()) / f"dts-bench-builders-{args.slices}-"
                     f"{args.size}", args.slices, args.size)
    figures: dict[str, list[dict[str, float]]] = {"direct": [], "dts": []}
    for _ in range(args.runs):
        for kind in ("direct", "dts"):
            proc = subprocess.run([sys.executable, "-m", "tests.bench.bench_builders", "--one",
                                   kind, "--data", str(root)], cwd=REPO, capture_output=True,
                                  text=True, timeout=3600, check=True)
            figures[kind].append(json.loads(proc.stdout.splitlines()[-1]))
    med = {k: {f: statistics.median(r[f] for r in v) for f in ("seconds", "peak_mb", "bytes")}
           for k, v in figures.items()}
    print(f"SEG {args.size}x{args.size}x{args.slices}, 2 labels + SR of 50 measurements, "
          f"median of {args.runs}:")
    for kind in ("direct", "dts"):
        m = med[kind]
        print(f"  {kind:<7} {m['seconds']:7.2f} s  peak {m['peak_mb']:7.1f} MiB  "
              f"output {m['bytes'] / 1e6:6.1f} MB")
    print(f"  dts / highdicom direct: time {med['dts']['seconds'] / med['direct']['seconds']:.3f}"
          f", peak memory {med['dts']['peak_mb'] / med['direct']['peak_mb']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
