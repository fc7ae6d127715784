"""Classification rules: the predecessor's classifyRules.json format and its semantics."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dts.errors import ConfigError
from dts.rules import Facts, RuleSet, load_rules, parse_csa, parse_rules
from tests.helpers import make_instance, run_dts, station_config

REPO = Path(__file__).resolve().parent.parent
SEED_RULES = REPO / "configuration" / "classifyRules.json"


def ct() -> Dataset:
    return pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)


def mr() -> Dataset:
    return pydicom.dcmread(get_testdata_file("MR_small.dcm"), stop_before_pixels=True)


def rules_of(*entries: dict[str, Any]) -> RuleSet:
    return parse_rules(Path("test-rules.json"), list(entries))


def one(clause: dict[str, Any], **entry: Any) -> RuleSet:
    return rules_of({"type": "T", "rules": [clause], **entry})


def types_of(rules: RuleSet, *datasets: Dataset) -> list[str]:
    return rules.classify([Facts(ds, len(datasets)) for ds in datasets])


def csa2(elements: dict[str, list[str]]) -> bytes:
    """A Siemens CSA2 header blob, as scanners write it into (0029,1010)/(0029,1020)."""
    out = b"SV10\x04\x03\x02\x01" + struct.pack("<II", len(elements), 77)
    for name, values in elements.items():
        out += name.encode().ljust(64, b"\0")
        out += struct.pack("<i4siii", len(values), b"IS\0\0", 6, len(values), 77)
        for v in values:
            data = v.encode() + b"\0"
            n = len(data)
            out += struct.pack("<4i", n, n, 77, n) + data + b"\0" * (-n % 4)
    return out


# -- operators against pydicom's bundled files ---------------------------------------
# CT_small.dcm: GE MEDICAL SYSTEMS, ImageType ORIGINAL\PRIMARY\AXIAL, 128x128,
# SliceThickness 5.000000. MR_small.dcm: TOSHIBA_MEC, DERIVED\SECONDARY\OTHER, 64x64.

OPERATOR_CASES = [
    ({"tag": ["0x08", "0x70"], "value": "^GE MEDICAL"}, True, False),
    ({"tag": ["0x0008", "0x0070"], "value": "^GE MEDICAL", "operator": "regexp"}, True, False),
    ({"tag": ["Manufacturer"], "value": "TOSHIBA"}, False, True),
    ({"tag": ["ImageType"], "value": "'PRIMARY', 'AXIAL'"}, True, False),  # list text
    ({"tag": ["0x08", "0x08"], "value": "AXIAL", "operator": "contains"}, True, False),
    ({"tag": ["0x08", "0x08"], "value": "AXI", "operator": "contains"}, False, False),  # item
    ({"tag": ["0x08", "0x70"], "value": "MEDICAL", "operator": "contains"}, True, False),
    ({"tag": ["0x28", "0x10"], "value": "128", "operator": "=="}, True, False),
    ({"tag": ["Rows"], "value": 64, "operator": "=="}, False, True),
    ({"tag": ["Rows"], "value": "64", "operator": "!="}, True, False),
    ({"tag": ["Rows"], "value": "100", "operator": "<"}, False, True),
    ({"tag": ["Rows"], "value": "100", "operator": ">"}, True, False),
    ({"tag": ["SliceThickness"], "value": "5", "operator": "=="}, True, False),
    ({"tag": ["Modality"], "value": "MR", "operator": "=="}, False, True),  # text equality
    ({"tag": ["Modality"], "value": "CT", "operator": ">"}, False, False),  # not numbers
    ({"tag": ["SliceThickness"], "value": 5.00001, "operator": "approx"}, True, False),
    ({"tag": ["SliceThickness"], "value": 5.1, "operator": "approx", "approxLevel": "0.2"},
     True, False),
    ({"tag": ["PixelSpacing"], "value": [0.661468, 0.661468], "operator": "approx",
      "approxLevel": 0.001}, True, False),
    ({"tag": ["PixelSpacing"], "value": [0.66, 0.66, 1], "operator": "approx"}, False, False),
    ({"tag": ["0x08", "0x08", "2"], "value": "^AXIAL$"}, True, False),
    ({"tag": ["0x08", "0x08", "0"], "value": "DERIVED"}, False, True),
    ({"tag": ["Rows"], "value": ["0x0028", "0x0011"], "operator": "=="}, True, True),  # ref
    ({"tag": ["Rows"], "value": ["Columns"], "operator": "<"}, False, False),
    ({"tag": ["0x0019", "0x100F"], "operator": "exist"}, True, False),  # GE private tag
    ({"tag": ["0x0019", "0x100F"], "operator": "exists"}, True, False),
    ({"tag": ["0x0019", "0x100F"], "operator": "notexist"}, False, True),
    ({"tag": ["00080070"], "value": "GE"}, True, False),
]


@pytest.mark.parametrize("clause,on_ct,on_mr", OPERATOR_CASES,
                         ids=[json.dumps(c[0]) for c in OPERATOR_CASES])
def test_operator(clause: dict[str, Any], on_ct: bool, on_mr: bool) -> None:
    rules = one(clause)
    assert types_of(rules, ct()) == (["T"] if on_ct else [])
    assert types_of(rules, mr()) == (["T"] if on_mr else [])
    negated = one({**clause, "negate": "yes"})
    assert types_of(negated, ct()) == ([] if on_ct else ["T"])
    assert types_of(negated, mr()) == ([] if on_mr else ["T"])


@pytest.mark.parametrize("operator,value", [
    ("regexp", ".*"), ("contains", ""), ("==", "1"), ("!=", "1"), ("<", "1"), (">", "1"),
    ("approx", 1), ("exist", None),
])
def test_missing_tag_is_false_and_never_crashes(operator: str, value: Any) -> None:
    clause: dict[str, Any] = {"tag": ["0x0051", "0x100F"], "operator": operator}
    if value is not None:
        clause["value"] = value
    for ds in (ct(), mr()):
        assert types_of(one(clause), ds) == []
        # negate inverts the comparison, so a negated one holds (as in the predecessor)
        assert types_of(one({**clause, "negate": "yes"}), ds) == ["T"]
    assert types_of(one({"tag": ["0x0051", "0x100F"], "operator": "notexist"}), ct()) == ["T"]
    # an index past the end of a value is a missing value too
    assert types_of(one({"tag": ["0x08", "0x08", "7"], "value": ".*"}), ct()) == []


def test_all_clauses_must_hold_and_references_inline_other_entries() -> None:
    rules = rules_of(
        {"type": "GE", "id": "GEBYMANUFACTURER", "rules": [
            {"tag": ["0x08", "0x70"], "value": "^GE MEDICAL"}]},
        {"type": "big", "id": "BIG", "rules": [
            {"tag": ["Rows"], "operator": ">", "value": "100"},
            {"tag": ["Columns"], "operator": ">", "value": "100"}]},
        {"type": "GE-big", "rules": [{"rule": "GEBYMANUFACTURER"}, {"rule": "BIG"}]},
        {"type": "GE-small", "rules": [{"rule": "GEBYMANUFACTURER"}, {"notrule": "BIG"}]},
        {"type": "GE-axial", "rules": [{"rule": "GEBYMANUFACTURER"},
                                       {"tag": ["ImageType"], "operator": "contains",
                                        "value": "AXIAL"}]},
        {"type": "GE-derived", "rules": [{"rule": "GEBYMANUFACTURER"},
                                         {"tag": ["ImageType"], "operator": "contains",
                                          "value": "DERIVED"}]},
    )
    assert types_of(rules, ct()) == ["GE", "big", "GE-big", "GE-axial"]
    assert types_of(rules, mr()) == []


def test_classify_type_sees_earlier_entries_of_the_whole_series() -> None:
    rules = rules_of(
        {"type": "axial", "rules": [{"tag": ["ImageOrientationPatient"], "operator": "approx",
                                     "value": [1, 0, 0, 0, 1, 0], "approxLevel": "0.0004"}]},
        {"type": "coronal", "rules": [{"tag": ["ImageOrientationPatient"], "operator": "approx",
                                       "value": [1, 0, 0, 0, 0, -1]}]},
        {"type": "sagittal", "rules": [{"tag": ["0x20", "0x37"], "operator": "approx",
                                        "value": [0, 1, 0, 0, 0, -1]}]},
        {"type": "localizer", "rules": [
            {"tag": ["ClassifyType"], "value": "axial", "operator": "contains"},
            {"tag": ["ClassifyType"], "value": "coronal", "operator": "contains"},
            {"tag": ["ClassifyType"], "value": "sagittal", "operator": "contains"}]},
        {"type": "oblique", "check": "SeriesLevel", "rules": [
            {"tag": ["ClassifyType"], "value": t, "operator": "contains", "negate": "yes"}
            for t in ("axial", "coronal", "sagittal")]},
    )
    images = []
    for iop in ([1, 0, 0, 0, 1, 0], [1, 0, 0, 0, 0, -1], [0, 1, 0, 0, 0, -1]):
        ds = Dataset()
        ds.ImageOrientationPatient = iop
        images.append(ds)
    assert types_of(rules, *images) == ["axial", "coronal", "sagittal", "localizer"]
    assert types_of(rules, images[0]) == ["axial"]
    tilted = Dataset()
    tilted.ImageOrientationPatient = [0.9, 0.1, 0, 0, 1, 0]
    assert types_of(rules, tilted) == ["oblique"]


def test_series_level_needs_every_image_plain_needs_one() -> None:
    rules = rules_of(
        {"type": "some-mosaic", "rules": [
            {"tag": ["0x08", "0x08"], "value": "MOSAIC", "operator": "contains"}]},
        {"type": "all-mosaic", "check": "SeriesLevel", "rules": [
            {"tag": ["0x08", "0x08"], "value": "MOSAIC", "operator": "contains"}]},
    )
    mosaic, plain = Dataset(), Dataset()
    mosaic.ImageType = ["ORIGINAL", "PRIMARY", "MOSAIC"]
    plain.ImageType = ["ORIGINAL", "PRIMARY"]
    assert types_of(rules, mosaic, plain) == ["some-mosaic"]
    assert types_of(rules, mosaic, mosaic) == ["some-mosaic", "all-mosaic"]
    assert types_of(rules, plain) == []


@pytest.mark.parametrize("data,where,reason", [
    ({"type": "x"}, "[0].rules", "non-empty list"),
    ({"rules": [{"tag": ["Rows"], "value": "1"}]}, "[0].type", "needs a type"),
    ({"type": "x", "rules": [{"tag": ["Rows"], "value": "(", "operator": "regexp"}]},
     "[0] (x).rules[0].value", "invalid regular expression"),
    ({"type": "x", "rules": [{"tag": ["Rows"], "value": "1", "operator": "like"}]},
     "[0] (x).rules[0].operator", "unknown operator 'like'"),
    ({"type": "x", "rules": [{"tag": ["NoSuchKeyword"], "value": "1"}]},
     "[0] (x).rules[0].tag", "unknown keyword 'NoSuchKeyword'"),
    ({"type": "x", "rules": [{"tag": ["0xZZ", "0x10"], "value": "1"}]},
     "[0] (x).rules[0].tag", "not a hex"),
    ({"type": "x", "rules": [{"rule": "NOPE"}]}, "[0] (x).rules[0].rule", "no entry has id"),
    ({"type": "x", "rules": [{"tag": ["Rows"], "operator": "=="}]},
     "[0] (x).rules[0].value", "needs a value"),
    ({"type": "x", "rules": [{"tag": ["Rows"], "value": "1", "negate": "maybe"}]},
     "[0] (x).rules[0].negate", "yes"),
    ({"type": "x", "check": "StudyLevel", "rules": [{"tag": ["Rows"], "value": "1"}]},
     "[0].check", "SeriesLevel"),
    ({"type": "x", "rules": [{"tag": ["Rows"], "valeu": "1"}]},
     "[0] (x).rules[0].valeu", "unknown key"),
])
def test_bad_rules_are_refused_naming_entry_and_reason(data: dict[str, Any], where: str,
                                                       reason: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_rules(Path("r.json"), [data])
    assert exc.value.key == where and reason in exc.value.reason, str(exc.value)


def test_circular_and_ambiguous_references_are_refused() -> None:
    with pytest.raises(ConfigError, match="circular reference: A -> B -> A"):
        rules_of({"type": "a", "id": "A", "rules": [{"rule": "B"}]},
                 {"type": "b", "id": "B", "rules": [{"rule": "A"}]})
    with pytest.raises(ConfigError, match="ambiguous"):
        rules_of({"type": "a", "id": "A", "rules": [{"tag": ["Rows"], "value": "1"}]},
                 {"type": "b", "id": "A", "rules": [{"tag": ["Rows"], "value": "2"}]},
                 {"type": "c", "rules": [{"rule": "A"}]})
    # duplicate ids nobody references are fine (the seed file has one)
    rules_of({"type": "a", "id": "A", "rules": [{"tag": ["Rows"], "value": "1"}]},
             {"type": "b", "id": "A", "rules": [{"tag": ["Rows"], "value": "2"}]})


def test_load_rules_caches_per_mtime(tmp_path: Path) -> None:
    path = tmp_path / "rules.json"
    path.write_text(json.dumps([{"type": "a", "rules": [{"tag": ["Rows"], "value": "1"}]}]))
    first = load_rules(path)
    assert load_rules(path) is first
    path.write_text(json.dumps([{"type": "b", "rules": [{"tag": ["Rows"], "value": "12"}]}]))
    second = load_rules(path)
    assert second is not first and second.types == ["b"]
    path.write_text("[{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_rules(path)


def test_bad_rule_file_refused_by_dts_command(tmp_path: Path) -> None:
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([
        {"type": "ok", "rules": [{"tag": ["Rows"], "value": "1"}]},
        {"type": "broken", "id": "BROKEN", "rules": [{"tag": ["Rows"], "value": "[a-"}]}]))
    config = station_config(tmp_path, station={"classify_rules": str(rules)})
    proc = run_dts("classify", "--once", config=config)
    assert proc.returncode == 2, proc.stderr
    assert str(rules) in proc.stderr and "[1] (BROKEN).rules[0].value" in proc.stderr
    assert "invalid regular expression" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- the seed rule file ------------------------------------------------------------

def test_seed_rule_file_loads_unchanged() -> None:
    seed = Path("/work/shared/seed-config/classifyRules.json")
    ours = json.loads(SEED_RULES.read_text())
    if seed.exists():
        assert json.loads(seed.read_text()) == ours
    rules = load_rules(SEED_RULES)
    assert len(rules.entries) == 62 == len(ours)
    assert {"ABCD-T1", "ABCD-DTI", "mosaic", "localizer", "Coil Error"} <= set(rules.types)
    mosaic = next(e for e in rules.entries if e.id == "MOSAIC")
    assert [c.describe() for c in mosaic.clauses] == [
        '["0x08", "0x08"] contains "MOSAIC"', '["0x08", "0x70"] regexp "^SIEMENS"']


def _instance(tmp_path: Path, private: dict[tuple[int, int], tuple[str, Any]] | None = None,
              **attrs: Any) -> Dataset:
    path = make_instance(tmp_path / f"{generate_uid()}.dcm", study_uid=generate_uid(),
                         series_uid=generate_uid(), modality="MR", **attrs)
    ds = pydicom.dcmread(path)
    creators: set[int] = set()
    for (group, elem), (vr, value) in (private or {}).items():
        if group not in creators:
            ds.add_new((group, 0x0010), "LO", "TEST CREATOR")
            creators.add(group)
        ds.add_new((group, elem), vr, value)
    ds.save_as(path)
    return pydicom.dcmread(path, stop_before_pixels=True)


SIEMENS = {"Manufacturer": "SIEMENS", "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"]}
COILS = {(0x0051, 0x100F): ("LO", "HEA;HEP")}


def test_seed_rules_classify_vendor_series(tmp_path: Path) -> None:
    rules = load_rules(SEED_RULES)
    siemens_t1 = _instance(tmp_path, COILS, rows=256, cols=256, NumberOfPhaseEncodingSteps=255,
                           SequenceName="*tfl3d1_16ns", **SIEMENS)
    assert types_of(rules, siemens_t1) == ["SIEMENS", "original", "ABCD-T1"]
    siemens_t1_norm = _instance(tmp_path, COILS, rows=256, cols=256,
                                NumberOfPhaseEncodingSteps=255, SequenceName="*tfl3d1_16ns",
                                Manufacturer="SIEMENS",
                                ImageType=["ORIGINAL", "PRIMARY", "M", "ND", "NORM"])
    assert types_of(rules, siemens_t1_norm) == ["SIEMENS", "original", "ABCD-T1-NORM"]
    # no coil element: the predecessor's "Coil Error" (its clauses are negated contains)
    no_coils = _instance(tmp_path, None, **SIEMENS)
    assert types_of(rules, no_coils) == ["SIEMENS", "original", "Coil Error"]

    protocol = "ulVersion = 1\nsGroupArray.asGroup[0].nSize = 81\nsGroupArray.sPSet[0] = 1\n"
    siemens_dti = _instance(
        tmp_path, {**COILS, (0x0029, 0x1020): ("OB", csa2({"MrPhoenixProtocol": [protocol]}))},
        rows=1260, cols=1260, NumberOfPhaseEncodingSteps=105, SequenceName="*ep_b1000#12",
        SeriesDescription="ABCD_dMRI", Manufacturer="SIEMENS",
        ImageType=["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE", "ND", "MOSAIC"])
    assert types_of(rules, siemens_dti) == ["SIEMENS", "mosaic", "original", "ABCD-DTI"]
    qa = _instance(
        tmp_path, {**COILS, (0x0029, 0x1020): ("OB", csa2({"MrPhoenixProtocol": [protocol]}))},
        rows=1260, cols=1260, NumberOfPhaseEncodingSteps=105, SequenceName="*ep_b1000#12",
        SeriesDescription="ABCD_QA_dMRI", Manufacturer="SIEMENS",
        ImageType=["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE", "ND", "MOSAIC"])
    assert "ABCD-DTI" not in types_of(rules, qa)

    fieldmap = {(0x0029, 0x1020): ("OB", csa2({"MrPhoenixProtocol": [
        "sGroupArray.asGroup[0].nSize\t = \t60\n"]}))}
    for direction, expected in (("0", "ABCD-fMRI-FM-PA"), ("1", "ABCD-fMRI-FM-AP")):
        fm = _instance(tmp_path, {**COILS, **fieldmap, (0x0029, 0x1010): (
            "OB", csa2({"PhaseEncodingDirectionPositive": [direction]}))},
            rows=90, cols=90, NumberOfPhaseEncodingSteps=90, SequenceName="*epse2d1_90",
            **SIEMENS)
        assert types_of(rules, fm) == ["SIEMENS", "original", expected]

    ge_t1 = _instance(tmp_path, {(0x0019, 0x109C): ("LO", "research/ABCD/mprage_promo")},
                      Manufacturer="GE MEDICAL SYSTEMS", AcquisitionMatrix=[0, 256, 256, 0],
                      ImageType=["ORIGINAL", "PRIMARY", "OTHER"])
    assert types_of(rules, ge_t1) == ["GE", "original", "ABCD-T1"]
    ge_fm = _instance(tmp_path, {(0x0019, 0x109C): ("LO", "research/ABCD/epi_pepolar"),
                                 (0x0019, 0x10B3): ("DS", "2.000000"),
                                 (0x0021, 0x104F): ("SS", 60)},
                      Manufacturer="GE MEDICAL SYSTEMS", AcquisitionMatrix=[90, 0, 0, 90],
                      NumberOfTemporalPositions=2, ImageType=["ORIGINAL", "PRIMARY"])
    assert types_of(rules, ge_fm) == ["GE", "original", "ABCD-fMRI-FM"]

    philips_rs = _instance(tmp_path, {(0x2001, 0x1020): ("LO", "FEEPI")},
                           Manufacturer="Philips Medical Systems",
                           AcquisitionMatrix=[92, 0, 0, 89], NumberOfTemporalPositions=383,
                           ImageType=["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"])
    assert types_of(rules, philips_rs) == ["PHILIPS", "original", "ABCD-rsfMRI"]
    philips_t2 = _instance(tmp_path, None, Manufacturer="Philips Medical Systems",
                           AcquisitionMatrix=[0, 256, 256, 0], ScanningSequence="SE",
                           SequenceVariant="SK", ImageType=["ORIGINAL", "PRIMARY", "T2"])
    assert types_of(rules, philips_t2) == ["PHILIPS", "original", "ABCD-T2"]
    projection = _instance(tmp_path, None, Manufacturer="Philips Medical Systems",
                           AcquisitionMatrix=[0, 256, 256, 0], ScanningSequence="SE",
                           SequenceVariant="SK",
                           ImageType=["ORIGINAL", "PRIMARY", "PROJECTION IMAGE"])
    assert types_of(rules, projection) == ["PHILIPS", "original"]

    sc = _instance(tmp_path, None, sop_class="1.2.840.10008.5.1.4.1.1.7",
                   Manufacturer="ACME")
    assert types_of(rules, sc) == ["CHECKBURNEDINFO"]
    assert types_of(rules, ct()) == ["GE", "original"]
    assert types_of(rules, mr()) == []


def test_csa_parser_reads_what_the_test_writer_wrote() -> None:
    blob = csa2({"A": ["1"], "Empty": [], "Text": ["hello world", "x"]})
    assert parse_csa(blob) == {"A": ["1"], "Empty": [], "Text": ["hello world", "x"]}
    with pytest.raises((ValueError, struct.error)):
        parse_csa(b"SV10\x04\x03\x02\x01" + struct.pack("<II", 5, 77) + b"short")
