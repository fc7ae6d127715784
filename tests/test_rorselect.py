"""The ror select language (dts/rorselect.py): ror's documented examples, precedence,
NOT, CHECK, numbers, regular expressions, naming, levels and parse errors; and
``ror_select`` streams through ``dts classify`` (per study and per series).

Each expectation is what ror's own code does (select_group.y, classify_dicom.go
``evalLeaf``/``evalRulesTree``/``evalCheckRule``, ror.go ``findMatchingSets``) or, where
ror misbehaves, what its documentation says (docs/ror-select.md lists those cases).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydicom.datadict import tag_for_keyword
from pydicom.uid import generate_uid

from dts import rorselect
from dts.rorselect import RorSelectError, parse
from dts.spool import Job, Queue, State
from dts.station import Station
from tests.helpers import make_instance, run_dts, station_config


def _series(uid: str, number: int, desc: str, modality: str, types: list[str], n: int,
            **tags: Any) -> dict[str, Any]:
    values = {"Modality": [modality], "SeriesDescription": [desc],
              "SeriesNumber": [str(number)], **tags}
    return {"SeriesInstanceUID": uid, "SeriesNumber": number, "SeriesDescription": desc,
            "Modality": modality, "NumImages": n, "ClassifyType": types,
            "tags": {f"{tag_for_keyword(k):08X}": v for k, v in values.items()}}


# One study: what rules are tested on in the examples below.
S1, S2, S3, S4, S5, S6 = (f"1.2.3.{i}" for i in range(1, 7))
DOC = {"series": [
    _series(S1, 1, "Anat_T1 sag", "MR", ["T1"], 176, PixelSpacing=["0.5", "0.7"]),
    _series(S2, 2, "T2 tse", "MR", ["T2"], 30, SliceThickness=["5.0"]),
    _series(S3, 3, "ep2d_diff", "MR", ["DIFFUSION", "MOSAIC"], 60, SliceLocation=["-50.5"]),
    _series(S4, 4, "rest bold", "MR", ["RESTING"], 150, ContrastBolusAgent=[""]),
    _series(S5, 5, "Bone", "CT", ["CT"], 300, SeriesNumber=["16777217"]),
    _series(S6, 6, "Chest", "CR", [], 1),
]}


def select(text: str, doc: dict[str, Any] = DOC) -> dict[str, list[str]]:
    return rorselect.evaluate(parse(text), doc).selection


# -- every example of ror's documentation ------------------------------------------------

DOC_EXAMPLES = [
    # SELECT_GRAMMAR.md, examples 1-4
    ('SELECT series FROM study WHERE SERIES NAMED "MR" HAS Modality == \'MR\'',
     {"MR": [S1, S2, S3, S4]}),
    (("SELECT series FROM study WHERE series named \"T1\" has \n"
     "    Modality = 'MR' AND SeriesDescription regexp 'T1'\n"
     "ALSO WHERE series named \"T2\" has \n"
     "    Modality == 'MR' AND SeriesDescription regexp 'T2'"),
     {"T1": [S1], "T2": [S2]}),
    # S1 satisfies "Func" too (176 images) but is named by the first clause it satisfies
    (("SELECT patient FROM study\n"
     "WHERE series named \"Anat\" has Modality == 'MR' AND SeriesDescription regexp '^Anat'\n"
     "ALSO WHERE series named \"Func\" has Modality == 'MR' AND NumImages > 100\n"
     "ALSO WHERE series named \"DTI\" has ClassifyType containing DIFFUSION"),
     {"Anat": [S1], "Func": [S4], "DTI": [S3]}),
    ("SELECT series FROM study\nWHERE Modality == 'MR'\nAND NumImages > 50\nAND NumImages < 500",
     {"unnamed_rule_0": [S1, S3, S4]}),
    # README.md: the suggestion, the patient example, the two commented ones
    (('SELECT series\n  FROM study\n    WHERE series NAMED "no-name" HAS\n'
     '       Modality containing CR\n'), {"no-name": [S6]}),
    (("Select patient\n  from study\n    where series named \"T1\" has\n"
     "      ClassifyType containing T1 \n    and \n      SeriesDescription regexp \"^A\" \n"
     "  also\n    where series named \"DIFF\" has\n      ClassifyType containing DIFFUSION\n"
     "  also\n    where series named \"REST\" has \n      ClassifyType containing RESTING \n"
     "    and \n      NumImages > 10  \n    and \n      not(NumImages > 200)\n"),
     {"T1": [S1], "DIFF": [S3], "REST": [S4]}),
    (("\n  Select project       /* export level for all data in the study */\n"
     "    from study         /* not functional */\n"
     "      where series has /* start of a rule set */\n"
     "        Modality = CT  /* selection rule */\n"), {"unnamed_rule_0": [S5]}),
    (("\n  Select series       /* export level for a single image series */\n"
     "    from study        /* not functional */\n"
     "      where series has  /* start of a rule set */\n"
     "        Modality = CT   /* selection rule */\n      and\n"
     "        NumImages > 100 /* numeric rule for number of slices in series */\n"),
     {"unnamed_rule_0": [S5]}),
    # templates/python/select.statement
    ('SELECT series FROM study WHERE series named "T1" has Modality regexp "(MR|CT)"',
     {"T1": [S1, S2, S3, S4, S5]}),
    # ror.go's --select help: at study level every clause must name a series; no
    # series is T1 with a description starting with B
    (('Select study from study where series has ClassifyTypes containing T1\n'
     '\tand SeriesDescription regexp "^B" also where series has ClassifyType\n'
     '\tcontaining DIFFUSION also where series has ClassifyTypes containing RESTING'), {}),
    (('Select study where ClassifyTypes containing T1 and SeriesDescription regexp "^A"\n'
     '\talso where ClassifyType containing DIFFUSION also where ClassifyTypes containing '
     'RESTING'), {"unnamed_rule_0": [S1], "unnamed_rule_1": [S3], "unnamed_rule_2": [S4]}),
    # ror.go's parser self-test ("containing" is equality with one of the values)
    (("select patient from study where series has ClassifyType containing T1 and "
     "SeriesDescription containing axial"), {}),
    ("Select series from series where series has ClassifyType containing CT",
     {"unnamed_rule_0": [S5]}),
    # mcp_server.go's examples; in the last one "Diffusion" takes every MR series first
    ("SELECT series FROM study WHERE Modality = 'MR' AND SeriesDescription regexp 'T1'",
     {"unnamed_rule_0": [S1]}),
    ("SELECT series FROM study WHERE Modality regexp '(MR|CT)'",
     {"unnamed_rule_0": [S1, S2, S3, S4, S5]}),
    ('SELECT series FROM study WHERE series named "Diffusion" has Modality = \'MR\'',
     {"Diffusion": [S1, S2, S3, S4]}),
    (('SELECT series FROM study WHERE series named "Diffusion" has Modality = \'MR\' also '
     'where series named "T1" has SeriesDescription regexp \'^Anat\''),
     {"Diffusion": [S1, S2, S3, S4]}),
]


@pytest.mark.parametrize("text,expected", DOC_EXAMPLES)
def test_examples_of_rors_documentation(text: str, expected: dict[str, list[str]]) -> None:
    result = rorselect.evaluate(parse(text), DOC)
    assert result.selection == expected
    assert result.matched is bool(expected)


def test_the_seed_statement_parses_into_two_named_clauses() -> None:
    stmt = parse(_aicore())
    assert stmt.level == "series"
    assert [c.name for c in stmt.clauses] == ["VIBEDIXON_OLD", "VIBEDIXON_NEW"]
    assert stmt.tags == {0x00181030, 0x00180010}  # ProtocolName, ContrastBolusAgent


# -- precedence, NOT, parentheses, EVERYTHING ----------------------------------------------

@pytest.mark.parametrize("rules,expected", [
    # AND and OR have equal precedence, left to right (select_group.y rule_list):
    # (CT OR MR) AND > 1000 -- no series; with AND first it would be S5
    ("Modality == CT OR Modality == MR AND NumImages > 1000", []),
    ("Modality == CT OR (Modality == MR AND NumImages > 1000)", [S5]),
    # (MR AND > 100) OR CR
    ("Modality == MR AND NumImages > 100 OR Modality == CR", [S1, S4, S6]),
    # MR AND (> 100 OR CR): nothing MR is CR
    ("Modality == MR AND (NumImages > 100 OR Modality == CR)", [S1, S4]),
    # NOT takes one rule: (NOT MR) AND > 100
    ("NOT Modality == MR AND NumImages > 100", [S5]),
    ("NOT (Modality == MR AND NumImages > 100)", [S2, S3, S5, S6]),
    ("not not Modality == CT", [S5]),
    ("((Modality == CT))", [S5]),
    ("EVERYTHING", [S1, S2, S3, S4, S5, S6]),
    ("NOT EVERYTHING", []),
    ("everything AND NumImages < 31", [S2, S6]),
    # a tag the series lacks fails the comparison, so NOT of it holds (evalLeaf)
    ("NOT PixelSpacing > 0", [S2, S3, S4, S5, S6]),
])
def test_precedence_and_not(rules: str, expected: list[str]) -> None:
    got = select(f"SELECT series FROM study WHERE series named x HAS {rules}")
    assert got == ({"x": expected} if expected else {})


# -- the operators ---------------------------------------------------------------------------

@pytest.mark.parametrize("rule,expected", [
    # containing: one of the values equal (not a substring)
    ("ClassifyType containing MOSAIC", [S3]),
    ("ClassifyType containing MOS", []),
    ("SeriesDescription containing 'T2 tse'", [S2]),
    ('PixelSpacing containing "0.7"', [S1]),
    # ==: every value equal, none empty (so a multi-value needs all equal)
    ("PixelSpacing == '0.5'", []),
    ("Modality = MR", [S1, S2, S3, S4]),
    ("ContrastBolusAgent == ''", []),
    # == compares text: the number written as Go's %v writes it
    ("NumImages == 176", [S1]),
    ("NumImages == 176.0", [S1]),
    ("SliceThickness == 5", []),  # "5.0" is not "5"
    ("SliceThickness == '5.0'", [S2]),
    # < > <= >=: numbers (32-bit floats, as ror parses them); any value may satisfy
    ("PixelSpacing > 0.6", [S1]),
    ("PixelSpacing < 0.5", []),
    ("PixelSpacing <= 0.5", [S1]),
    ("NumImages >= 300", [S5]),
    ("NumImages > 1e2", [S1, S4, S5]),
    ("SliceLocation > -51", [S3]),
    ("SliceLocation < -50.5", []),
    # 16777217 and 16777216 are the same 32-bit float
    ("SeriesNumber > 16777216", []),
    ("SeriesNumber >= 16777216", [S5]),
    # a value that is no number never satisfies a comparison (ror stops with an error)
    ("SeriesDescription > 0", []),
    ("NOT SeriesDescription > 0", [S1, S2, S3, S4, S5, S6]),
    # an empty value matches nothing
    ("ContrastBolusAgent < 1", []),
    # regexp: Go's regexp (RE2) found anywhere in any value, case-sensitive
    ("SeriesDescription regexp T1", [S1]),
    ("SeriesDescription regexp '^T'", [S2]),
    ("SeriesDescription regexp 'tse$'", [S2]),
    ("SeriesDescription regexp 'anat'", []),
    ("SeriesDescription regexp '(?i)anat'", [S1]),
    ("ClassifyType regexp 'DIFF|REST'", [S3, S4]),
    ("SeriesDescription regexp 'ep2d_d+iff'", [S3]),  # '+' ends a quoted string in ror
    ("SeriesDescription regexp .*", [S1, S2, S3, S4, S5, S6]),
    ("ContrastBolusAgent regexp '^$'", [S4]),
    ("ClassifyType regexp '.*'", [S1, S2, S3, S4, S5]),  # no types: no value to match
    # ClassifyType == with no types holds (every one of no values is equal)
    ("ClassifyType == CT", [S5, S6]),
    # NumSlices is NumImages; tags by group and element
    ("NumSlices < 2", [S6]),
    ('("0x0008","0x0060") == CR', [S6]),
    ("(0x0008,0x0060) == CR", [S6]),
    ("('0X08','0X103E') regexp bold", [S4]),
])
def test_operators(rule: str, expected: list[str]) -> None:
    got = select(f"SELECT series FROM study WHERE series named x HAS {rule}")
    assert got == ({"x": expected} if expected else {})


def test_go_formatting_of_numbers() -> None:
    assert [rorselect.go_float(x) for x in (100.0, 1e6, 1234567.0, 123456.0, 0.0001, 1e-05,
                                            1.5, -2.5, 0.0, 1.2)] == \
        ["100", "1e+06", "1.234567e+06", "123456", "0.0001", "1e-05", "1.5", "-2.5", "0",
         "1.2"]


# -- naming and levels ------------------------------------------------------------------------

def test_a_series_takes_the_name_of_the_first_clause_it_satisfies() -> None:
    text = ("SELECT series FROM study WHERE series named big HAS NumImages > 100 "
            "ALSO WHERE series named mr HAS Modality == MR")
    result = rorselect.evaluate(parse(text), DOC)
    assert result.selection == {"big": [S1, S4, S5], "mr": [S2, S3]}
    mr = result.clauses[1]
    assert mr.taken == {S1: "big", S4: "big"}
    ok, detail = rorselect.explain_clause(mr, DOC, required=False)
    assert ok and "named big by an earlier clause" in detail


def test_two_clauses_with_one_name_share_it() -> None:
    assert select("SELECT study WHERE series named a HAS Modality == CT ALSO WHERE "
                  "series named a HAS Modality == CR") == {"a": [S5, S6]}


@pytest.mark.parametrize("level", ["study", "patient", "participant", "project"])
def test_above_series_level_every_clause_must_name_a_series(level: str) -> None:
    both = f"SELECT {level} WHERE series named ct HAS Modality == CT ALSO WHERE series " \
           "named cr HAS Modality == CR"
    assert select(both) == {"ct": [S5], "cr": [S6]}
    one = f"SELECT {level} WHERE series named ct HAS Modality == CT ALSO WHERE series " \
          "named us HAS Modality == US"
    result = rorselect.evaluate(parse(one), DOC)
    assert not result.matched and result.selection == {}
    assert "none for us" in result.reason
    # at series level the clause that names nothing does not matter
    assert select(one.replace(f"SELECT {level}", "SELECT series")) == {"ct": [S5]}


def test_where_and_from_levels_do_not_change_what_is_tested() -> None:
    # ror keeps them (Select_level, Select_level_by_rule) but tests every rule per series
    for head in ("WHERE study HAS", "WHERE patient named x HAS", "WHERE HAS", "WHERE named x HAS",
                 "WHERE"):
        got = select(f"SELECT series FROM project {head} Modality == CT")
        assert list(got.values()) == [[S5]], head


# -- CHECK ---------------------------------------------------------------------------------

C1, C2, A1 = "1.2.4.1", "1.2.4.2", "1.2.4.3"
CHECK_DOC = {"series": [
    _series(C1, 1, "cor", "MR", ["coronal"], 20, FrameOfReferenceUID=["1.2.9"]),
    _series(C2, 2, "cor moved", "MR", ["coronal"], 20, FrameOfReferenceUID=["1.2.8"]),
    _series(A1, 3, "ax", "MR", ["axial"], 20, FrameOfReferenceUID=["1.2.9"]),
]}
README_CHECK = """
  Select study
    from project
      where series named COR has
        ClassifyType containing coronal
    also
      where series named AX has
        ClassifyType containing axial
  Check
      COR@FrameOfReferenceUID = AX@FrameOfReferenceUID
    AND
      COR@Modality = AX@Modality
"""


def test_check_keeps_the_series_that_agree() -> None:
    result = rorselect.evaluate(parse(README_CHECK), CHECK_DOC)
    assert result.matched and result.selection == {"COR": [C1], "AX": [A1]}
    assert result.checks[0].ok and result.checks[0].dropped == [C2]
    assert "left out: series 2 'cor moved'" in result.checks[0].detail


def test_check_that_no_pair_satisfies_selects_nothing() -> None:
    doc = json.loads(json.dumps(CHECK_DOC))
    doc["series"][2]["tags"]["00200052"] = ["7.7.7"]
    result = rorselect.evaluate(parse(README_CHECK), doc)
    assert not result.matched and result.selection == {}
    assert not result.checks[0].ok and "does not hold" in result.reason
    # a tag one of them lacks: no pair agrees either (evalCheckRule)
    del doc["series"][2]["tags"]["00200052"]
    assert not rorselect.evaluate(parse(README_CHECK), doc).matched


def test_check_with_not_and_tag_pairs() -> None:
    base = README_CHECK.split("Check")[0]
    same = base + 'CHECK COR@("0x0020","0x0052") = AX@("0x0020","0x0052")'
    assert select(same, CHECK_DOC) == {"COR": [C1], "AX": [A1]}
    # NOT: a condition only (ror parses NOT but ignores it)
    assert select(base + "CHECK NOT COR@Modality = AX@Modality", CHECK_DOC) == {}
    assert select(base + "CHECK NOT (COR@SeriesDescription = AX@SeriesDescription)",
                  CHECK_DOC) == {"COR": [C1, C2], "AX": [A1]}
    # two CHECK commands both apply
    assert select(base + "CHECK COR@Modality = AX@Modality CHECK NOT COR@Modality = "
                  "AX@Modality", CHECK_DOC) == {}


def test_check_compares_values_position_by_position_over_the_shorter() -> None:
    doc = {"series": [_series("1.1", 1, "a", "MR", ["a"], 1, ImageType=["ORIGINAL", "PRIMARY"]),
                      _series("1.2", 2, "b", "MR", ["b"], 1, ImageType=["ORIGINAL"])]}
    text = ("SELECT study WHERE series named A HAS ClassifyType containing a ALSO WHERE series "
            "named B HAS ClassifyType containing b CHECK A@ImageType = B@ImageType")
    assert select(text, doc) == {"A": ["1.1"], "B": ["1.2"]}


# -- what is refused, and where ------------------------------------------------------------------

@pytest.mark.parametrize("text,line,column,words", [
    ("SELECT images FROM study WHERE Modality == MR", 1, 8, "expected a level"),
    ("SELECT image FROM study WHERE Modality == MR", 1, 8, "unknown output level"),
    ("SELECT FROM study WHERE Modality == MR", 1, 8, "expected a level"),
    ("SELECT series FROM study WHERE Modality like MR", 1, 41, "unexpected 'like'"),
    ("SELECT series FROM study WHERE Modality approx 1", 1, 41, "unexpected 'approx'"),
    ("SELECT series FROM study WHERE Modality ~ MR", 1, 41, "unexpected character '~'"),
    ("SELECT series\nFROM study\n  WHERE series named X Modality == MR", 3, 24,
     "expected HAS"),
    ("SELECT series WHERE NumImages > many", 1, 33, "expected a number"),
    ("SELECT series WHERE ClassifyType containing 5", 1, 45, "unexpected '5'"),
    ("SELECT series WHERE Modality == MR AND", 1, 39, "ends early"),
    ("SELECT series WHERE (Modality == MR", 1, 36, "ends early"),
    ("SELECT series FROM study", 1, 25, "ends early"),
    ("SELECT series WHERE Modality == MR ALSO", 1, 40, "ends early"),
    ("SELECT series WHERE Modality == series", 1, 33, "unexpected 'series'"),
    ("SELECT series WHERE Modalty == MR", 1, 21, "unknown tag name 'Modalty'"),
    ("SELECT series WHERE PatientName == x", 1, 21, "person name"),
    ("SELECT series WHERE ReferencedImageSequence == x", 1, 21, "a sequence"),
    ("SELECT series WHERE (\"0xZZ\",\"0x10\") == x", 1, 22, "not a tag group"),
    ("SELECT series WHERE (\"0x00180\",\"0x10\") == x", 1, 22, "not a tag group"),
    ("SELECT series WHERE SeriesDescription regexp '(?=T1)'", 1, 46,
     "invalid regular expression"),
    ("SELECT series WHERE SeriesDescription regexp '(T1'", 1, 46,
     "invalid regular expression"),
    ('SELECT series WHERE series named "my name" HAS EVERYTHING', 1, 34, "series name"),
    ("SELECT series WHERE NumImages > 1e39", 1, 33, "out of range"),
    ("SELECT series WHERE series named A HAS EVERYTHING CHECK A@Modality = B@Modality",
     1, 70, "CHECK names series 'B', which no WHERE clause names (named: A)"),
    ("SELECT series WHERE series named A HAS EVERYTHING CHECK A@NumImages = A@NumImages",
     1, 57, "CHECK compares DICOM tags"),
    ("SELECT series WHERE series named A HAS EVERYTHING CHECK A@Modality < A@Modality",
     1, 68, "unexpected '<'"),
    ("CHECK A@Modality = B@Modality", 1, 1, "expected SELECT"),
    ("SELECT series WHERE Modality == CT SELECT study WHERE Modality == MR", 1, 36,
     "unexpected 'SELECT'"),
    ("", 0, 0, "expected a select statement"),
])
def test_refused_with_the_position(text: str, line: int, column: int, words: str) -> None:
    with pytest.raises(RorSelectError) as info:
        parse(text)
    err = info.value
    assert words in str(err)
    assert (err.line, err.column) == (line, column), str(err)


def test_keywords_are_any_case_quotes_are_always_strings() -> None:
    # ror's lexer: level words only in lower case, keywords also inside quotes
    assert select("select SERIES from STUDY where Series Named x Has Modality == 'series'") == {}
    assert select('SeLeCt series WHERE SeriesDescription == "T2 tse"'
                  .replace("SeLeCt", "SELECT")) == {"unnamed_rule_0": [S2]}
    assert select("SELECT series WHERE SeriesDescription regexp \"and|or\"") == {}
    assert select("SELECT series WHERE (Modality == CT)") == {"unnamed_rule_0": [S5]}


# -- through dts classify --------------------------------------------------------------------------

AICORE = ('SELECT series FROM study WHERE series named "VIBEDIXON_OLD" has ProtocolName regexp '
          '"fl3d_vibe_tra_ 2mm_2min" and ("0x0018","0x0010") regexp ".*Dotarem.*" ALSO where '
          'series named "VIBEDIXON_NEW" has ProtocolName regexp "t1_vibe_dixon_tra_p2 FOV 250 '
          '_2min" and ("0x0018","0x0010") regexp ".*Dotarem.*"')
SEED = Path("/work/shared/seed-config/select_statements.json")


def _aicore() -> str:
    if SEED.exists():  # the statement as the predecessor's site has it
        text: str = json.loads(SEED.read_text())["AIcore"]["select"]
        assert text == AICORE
        return text
    return AICORE


def _config(tmp_path: Path, per: str = "study", statement: str | None = None) -> Path:
    return station_config(tmp_path, streams=[{
        "name": "AIcore", "called_ae": "^AICORE1$", "ror_select": statement or _aicore(),
        "per": per, "command": ["true"]}])


VIBE_STUDY = (
    ("localizer", "Dotarem", 3),
    ("fl3d_vibe_tra_ 2mm_2min", "10 ml Dotarem", 2),
    ("t1_vibe_dixon_tra_p2 FOV 250 _2min", "Dotarem 0.5 mmol/ml", 2),
    ("fl3d_vibe_tra_ 2mm_2min", None, 2),  # before contrast: no agent
    ("t2_tse_tra", "Dotarem", 1),
)


def _queue(station: Station, series: tuple[tuple[str, str | None, int], ...],
           agent: str | None = None) -> tuple[str, dict[int, str]]:
    spool = station.spool
    job = spool.create_tmp_job()
    study_uid = generate_uid()
    uids: dict[int, str] = {}
    for number, (protocol, contrast, images) in enumerate(series, start=1):
        uid = uids[number] = generate_uid()
        extra = {"ContrastBolusAgent": agent or contrast} if contrast else {}
        for i in range(images):
            sop = generate_uid()
            make_instance(job.input_dir / uid / f"{sop}.dcm", study_uid=study_uid,
                          series_uid=uid, sop_uid=sop, series_number=number,
                          instance_number=i + 1, modality="MR", Manufacturer="SIEMENS",
                          ProtocolName=protocol, SeriesDescription=protocol, **extra)
    job.write({"study_uid": study_uid, "calling_ae": "PACS", "called_ae": "AICORE1",
               "peer": "127.0.0.1:4242", "attempts": 0})
    spool.publish(job, Queue.CLASSIFY)
    return job.id, uids


def test_seed_statement_selects_both_vibe_series(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    station = Station.open(cfg)
    spool = station.spool
    jid, uids = _queue(station, VIBE_STUDY)
    proc = run_dts("classify", "--once", config=cfg)
    assert proc.returncode == 0, proc.stderr
    assert spool.list(Queue.RUN, State.NEW) == [f"{jid}.AIcore"]
    child = Job(spool.dir(Queue.RUN, State.NEW) / f"{jid}.AIcore")
    data = child.read()
    assert data["selection"] == {"VIBEDIXON_OLD": [uids[2]], "VIBEDIXON_NEW": [uids[3]]}
    assert sorted(p.name for p in child.input_dir.iterdir()) == sorted([uids[2], uids[3]])
    parent = Job(spool.dir(Queue.DONE) / jid).read()
    assert parent["children"] == [f"{jid}.AIcore"]
    # study.json keeps its keys and adds the values the statement reads
    doc = json.loads((child.path / "study.json").read_text())
    s2 = next(s for s in doc["series"] if s["SeriesInstanceUID"] == uids[2])
    assert s2["ContrastBolusAgent"] == "10 ml Dotarem" and s2["ProtocolName"].startswith("fl3d")
    assert s2["tags"] == {"00180010": ["10 ml Dotarem"], "00181030": ["fl3d_vibe_tra_ 2mm_2min"]}
    s4 = next(s for s in doc["series"] if s["SeriesInstanceUID"] == uids[4])
    assert s4["tags"] == {"00181030": ["fl3d_vibe_tra_ 2mm_2min"]}


def test_a_study_without_the_contrast_agent_does_not_match(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    station = Station.open(cfg)
    jid, _uids = _queue(station, VIBE_STUDY, agent="Gadovist")
    proc = run_dts("classify", "--once", config=cfg)
    assert proc.returncode == 0, proc.stderr
    spool = station.spool
    assert spool.list(Queue.RUN, State.NEW) == [] and spool.list(Queue.UNMATCHED) == [jid]
    reasons = Job(spool.dir(Queue.UNMATCHED) / jid).read()["unmatched"]["AIcore"]
    assert reasons == ["ror_select (SELECT series): no series satisfies any clause"]
    proc = run_dts("classify", "--explain", jid, config=cfg)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "AIcore: not matched" in out
    assert "clause 1 (VIBEDIXON_OLD) `WHERE series named \"VIBEDIXON_OLD\" has ProtocolName" \
        in out
    assert "clause 2 (VIBEDIXON_NEW)" in out
    assert "series 2 'fl3d_vibe_tra_ 2mm_2min': ContrastBolusAgent is 'Gadovist' " \
           "(ContrastBolusAgent regexp '.*Dotarem.*' is false)" in out
    assert "series 4 'fl3d_vibe_tra_ 2mm_2min': no ContrastBolusAgent in this series" in out
    assert "FAIL ror_select (SELECT series): no series satisfies any clause" in out


def test_explain_names_the_series_each_clause_takes(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    station = Station.open(cfg)
    jid, uids = _queue(station, VIBE_STUDY)
    proc = run_dts("classify", "--explain", "--json", jid, config=cfg)
    assert proc.returncode == 0, proc.stderr
    (stream,) = json.loads(proc.stdout)["streams"]
    assert stream["matched"] and stream["per"] == "study" and stream["run_jobs"] == 1
    checks = {c["check"]: c for c in stream["checks"]}
    assert checks["ror_select.VIBEDIXON_OLD"]["ok"]
    assert f"series 2 'fl3d_vibe_tra_ 2mm_2min' ({uids[2]})" in \
        checks["ror_select.VIBEDIXON_OLD"]["detail"]
    assert checks["ror_select"]["detail"] == "ror_select (SELECT series) selected 2 series"
    assert stream["selection"] == {"VIBEDIXON_OLD": [uids[2]], "VIBEDIXON_NEW": [uids[3]]}
    assert station.spool.list(Queue.CLASSIFY, State.NEW) == [jid]  # moved nothing


def test_per_series_makes_one_run_job_per_selected_series(tmp_path: Path) -> None:
    cfg = _config(tmp_path, per="series")
    station = Station.open(cfg)
    spool = station.spool
    jid, uids = _queue(station, VIBE_STUDY)
    proc = run_dts("classify", "--explain", jid, config=cfg)
    assert "per series: 2 run jobs, one per selected series" in proc.stdout
    proc = run_dts("classify", "--once", config=cfg)
    assert proc.returncode == 0, proc.stderr
    kids = [f"{jid}.AIcore.s1", f"{jid}.AIcore.s2"]
    assert spool.list(Queue.RUN, State.NEW) == kids
    parent = Job(spool.dir(Queue.DONE) / jid).read()
    assert parent["children"] == kids and parent["streams"] == ["AIcore"]
    assert "fanout_pending" not in parent
    for kid, (name, uid) in zip(kids, (("VIBEDIXON_OLD", uids[2]), ("VIBEDIXON_NEW", uids[3]))):
        child = Job(spool.dir(Queue.RUN, State.NEW) / kid)
        data = child.read()
        assert data["selection"] == {name: [uid]} and data["parent"] == jid
        assert data["stream"] == "AIcore" and data["instances"] == 2
        assert [p.name for p in child.input_dir.iterdir()] == [uid]
    # each one is a job of its own: shown, run, requeued
    proc = run_dts("show", kids[1], config=cfg)
    assert proc.returncode == 0 and uids[3] in proc.stdout, proc.stderr
    proc = run_dts("run", "--once", kids[0], config=cfg)  # "true" writes nothing: failed
    assert spool.list(Queue.FAILED) == [kids[0]], proc.stdout + proc.stderr
    proc = run_dts("requeue", kids[0], "--to", "run", config=cfg)
    assert proc.returncode == 0, proc.stderr
    assert spool.list(Queue.RUN, State.NEW) == kids
    assert Job(spool.dir(Queue.RUN, State.NEW) / kids[0]).read()["selection"] == \
        {"VIBEDIXON_OLD": [uids[2]]}
    proc = run_dts("requeue", kids[0], "--to", "classify", config=cfg)
    assert proc.returncode == 2 and jid in proc.stderr
    # classified again by hand: new children beside the old ones
    proc = run_dts("classify", jid, config=cfg)
    assert proc.returncode == 0, proc.stderr
    assert spool.list(Queue.RUN, State.NEW) == [kids[0], f"{kids[0]}.2", kids[1],
                                                f"{kids[1]}.2"]


def test_per_series_crash_mid_fan_out_adopts_what_was_published(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dts import classifier

    station = Station.open(_config(tmp_path, per="series"))
    spool = station.spool
    jid, _uids = _queue(station, VIBE_STUDY)
    real = classifier._create_child
    calls: list[str] = []

    def dies_on_second(*args: Any) -> None:
        calls.append(args[5])
        if len(calls) == 2:
            raise OSError("simulated crash after the first run job was published")
        real(*args)

    monkeypatch.setattr(classifier, "_create_child", dies_on_second)
    assert classifier.serve(station, once=True).retry == [jid]
    assert spool.list(Queue.RUN, State.NEW) == [f"{jid}.AIcore.s1"]
    pending = Job(spool.dir(Queue.CLASSIFY, State.NEW) / jid).read()["fanout_pending"]
    assert sorted(pending.values()) == [f"{jid}.AIcore.s1", f"{jid}.AIcore.s2"]
    monkeypatch.setattr(classifier, "_create_child", real)
    assert classifier.serve(station, once=True).done == [jid]
    assert spool.list(Queue.RUN, State.NEW) == [f"{jid}.AIcore.s1", f"{jid}.AIcore.s2"]
    assert Job(spool.dir(Queue.DONE) / jid).read()["children"] == \
        [f"{jid}.AIcore.s1", f"{jid}.AIcore.s2"]


def test_per_series_with_jmespath_select_too(tmp_path: Path) -> None:
    cfg = station_config(tmp_path, streams=[{
        "name": "each", "per": "series", "command": ["true"],
        "select": {"vibe": "series[?starts_with(ProtocolName, 'fl3d')]"}}])
    station = Station.open(cfg)
    jid, uids = _queue(station, VIBE_STUDY)
    assert run_dts("classify", "--once", config=cfg).returncode == 0
    kids = station.spool.list(Queue.RUN, State.NEW)
    assert kids == [f"{jid}.each.s1", f"{jid}.each.s2"]
    assert [Job(station.spool.dir(Queue.RUN, State.NEW) / k).read()["selection"]
            for k in kids] == [{"vibe": [uids[2]]}, {"vibe": [uids[4]]}]


@pytest.mark.parametrize("stream,key,words", [
    ({"ror_select": "SELECT everything FROM study WHERE Modality == MR"},
     "stream.s.ror_select", ("not a ror select statement: line 1, column 8: unexpected "
                            "'everything'; expected a level")),
    ({"ror_select": "SELECT series WHERE Modality >> 3"},
     "stream.s.ror_select", "line 1, column 31: unexpected '>'"),
    ({"ror_select": "SELECT series WHERE Modality == MR", "select": {"a": "series"}},
     "stream.s.ror_select", "give either ror_select or select.<name>, not both"),
    ({"ror_select": 3}, "stream.s.ror_select", "expected a string"),
    ({"per": "patient"}, "stream.s.per", 'expected "study"'),
])
def test_bad_stream_keys_are_refused_at_load(tmp_path: Path, stream: dict[str, Any], key: str,
                                             words: str) -> None:
    cfg = station_config(tmp_path, streams=[{"name": "s", "command": ["true"], **stream}])
    proc = run_dts("config", "check", config=cfg)
    assert proc.returncode == 2
    assert f"{cfg}: {key}: " in proc.stderr and words in proc.stderr, proc.stderr


def test_effective_configuration_shows_the_statement_as_written(tmp_path: Path) -> None:
    from dts import config as config_mod

    cfg = _config(tmp_path, per="series")
    eff = config_mod.effective(config_mod.load(cfg))
    (stream,) = eff["stream"]
    assert stream["ror_select"] == _aicore() and stream["per"] == "series"
    assert "ror_select_text" not in stream
