"""Owns the ``ror`` select language: ``ror_select`` statements parsed and evaluated.

A stream's ``ror_select`` is a statement of the predecessor's ``ror`` tool
(Research-Information-System, ``components/Workflow-Image-AI/src``), for example::

    SELECT series FROM study
      WHERE series NAMED "T1" HAS ClassifyType containing T1 AND NumImages > 100
      ALSO WHERE series NAMED "T2" HAS SeriesDescription regexp "t2"
    CHECK T1@FrameOfReferenceUID = T2@FrameOfReferenceUID

``parse`` turns the text into a typed ``Statement`` (a lark LALR grammar; a statement
that does not parse raises ``RorSelectError`` with its line and column), and
``evaluate`` tests it on a study document (``study.json``), returning the selected
series grouped by name (``{name: [SeriesInstanceUID, ...]}``, the shape of a
jmespath ``select``) and an explanation clause by clause.

The semantics are ror's, derived from its grammar (``select_group.y``), lexer
(``exprLex`` in the same file), evaluator (``classify_dicom.go``: ``evalRulesTree``,
``evalLeaf``, ``evalCheckRule``) and selection (``ror.go``: ``findMatchingSets``,
``dataSets``); comments below cite the function each rule comes from. Where ror
misbehaves dts does what ror's documentation says; ``docs/ror-select.md`` lists each
deliberate difference.

The values a statement compares are the series' values in ror's text form, which
``study.json`` holds per series under ``tags`` (``values_of`` makes them; the classifier
asks ``studydoc.build_study`` for the tags its statements name), plus the derived
``ClassifyType`` and ``NumImages`` of every series.
"""

from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import lark
import re2
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from .errors import DtsError

LEVELS = ("series", "study", "patient", "project")
# Names ror's evalLeaf answers from its own series fields rather than from a DICOM tag
# (classify_dicom.go, evalLeaf: the single-entry Tag branch).
DERIVED = {"ClassifyType": "ClassifyType", "ClassifyTypes": "ClassifyType",
           "NumImages": "NumImages", "NumSlices": "NumImages"}
# Value representations that carry no comparable value (ror's dataSets leaves binary
# elements and sequences out of a series' tags; dts never stores person names).
_NOT_COMPARABLE = {"SQ": "a sequence", "OB": "binary", "OW": "binary", "OF": "binary",
                   "OD": "binary", "OL": "binary", "OV": "binary", "UN": "binary",
                   "AT": "a tag list", "PN": "a person name (names never go into study.json)"}
_NAME_CHARS = "letters, digits, '_.-', starting with a letter or digit"

GRAMMAR = r"""
start: select check*

select: SELECT level from_? clause (ALSO clause)*
from_: FROM level
level: SERIES | STUDY | PATIENT | PARTICIPANT | PROJECT | IMAGE

clause: WHERE level? named? HAS rules
      | WHERE rules
named: NAMED name
name: DQ | SQ | WORD | HEX

?rules: rule
      | rules AND rule -> and_
      | rules OR rule -> or_
?rule: LPAR rules RPAR
     | NOT rule -> not_
     | EVERYTHING -> everything
     | compare
compare: tag EQ (string | NUMBER)
       | tag (CONTAINING | CONTAINS) string
       | tag CMP NUMBER
       | tag REGEXP string

tag: string -> tag_name
   | LPAR string COMMA string RPAR -> tag_pair
string: DQ | SQ | WORD | HEX

check: CHECK checks
?checks: check_rule
       | checks AND check_rule -> check_and
?check_rule: LPAR checks RPAR
           | NOT check_rule -> check_not
           | string AT tag EQ string AT tag -> check_compare

SELECT: "select"i
FROM: "from"i
SERIES: "series"i
STUDY: "study"i
PATIENT: "patient"i
PARTICIPANT: "participant"i
PROJECT: "project"i
IMAGE: "image"i
WHERE: "where"i
NAMED: "named"i
HAS: "has"i
ALSO: "also"i
AND: "and"i
OR: "or"i
NOT: "not"i
EVERYTHING: "everything"i
CONTAINING: "containing"i
CONTAINS: "contains"i
REGEXP: "regexp"i
CHECK: "check"i
EQ: "==" | "="
CMP: "<=" | ">=" | "<" | ">"
LPAR: "("
RPAR: ")"
COMMA: ","
AT: "@"
DQ: /"[^"]*"/
SQ: /'[^']*'/
HEX.2: /0[xX][0-9a-fA-F]+/
NUMBER: /-?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?/
WORD: /(?i:(?:[^\W\d]|[\^$\[\].|])(?:[\w\^$.*\[\]\/\\|]|\([\w\^$.*\[\]\/\\|]*\))*)/
COMMENT: /\/\*(.|\n)*?\*\//
%import common.WS
%ignore WS
%ignore COMMENT
"""

# the basic lexer: a keyword is a whole word (lark turns a WORD equal to one into it),
# never the start of a longer word as a contextual lexer would take it
@functools.cache
def _parser() -> lark.Lark:
    """Built on first use (about 0.1 s): a station without ror_select never pays it."""
    return lark.Lark(GRAMMAR, parser="lalr", lexer="basic", propagate_positions=True,
                     maybe_placeholders=False)


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False

_TERMINALS = {"SELECT": "SELECT", "FROM": "FROM", "SERIES": "a level", "STUDY": "a level",
              "PATIENT": "a level", "PARTICIPANT": "a level", "PROJECT": "a level", "IMAGE": "a level",
              "WHERE": "WHERE", "NAMED": "NAMED", "HAS": "HAS", "ALSO": "ALSO",
              "AND": "AND", "OR": "OR", "NOT": "NOT", "EVERYTHING": "EVERYTHING",
              "CONTAINING": "containing", "CONTAINS": "containing", "REGEXP": "regexp", "CHECK": "CHECK",
              "EQ": "==", "CMP": "< > <= >=", "LPAR": "'('", "RPAR": "')'",
              "COMMA": "','", "AT": "'@'", "DQ": "a string", "SQ": "a string", "WORD": "a word",
              "HEX": "a word", "NUMBER": "a number", "$END": "the end"}


class RorSelectError(DtsError, ValueError):
    """A ``ror_select`` statement that cannot be used: where (line, column) and why."""

    def __init__(self, reason: str, line: int = 0, column: int = 0) -> None:
        self.reason, self.line, self.column = reason, line, column
        where = f"line {line}, column {column}: " if line else ""
        super().__init__(f"{where}{reason}")


# -- the statement ---------------------------------------------------------------------

@dataclass(frozen=True)
class Tag:
    """What a rule compares: a DICOM tag (``tag``) or a derived name (``derived``)."""
    text: str
    tag: int | None = None
    derived: str | None = None

    @property
    def key(self) -> str:
        """The key of its values in a series of study.json: ``tags["GGGGEEEE"]`` or the
        derived key itself."""
        return self.derived if self.derived else f"{self.tag:08X}"

    @property
    def label(self) -> str:
        if self.derived:
            return self.text
        tag = self.tag or 0
        return keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


@dataclass(frozen=True)
class Compare:
    tag: Tag
    op: str  # ==, containing, <, >, <=, >=, regexp
    value: str | float
    text: str  # the value as written (a string's text, a number's digits)
    pattern: Any = field(default=None, compare=False, repr=False)  # re2 for regexp


@dataclass(frozen=True)
class Everything:
    pass


@dataclass(frozen=True)
class Not:
    rule: Rule


@dataclass(frozen=True)
class And:
    left: Rule
    right: Rule


@dataclass(frozen=True)
class Or:
    left: Rule
    right: Rule


Rule = Compare | Everything | Not | And | Or


@dataclass(frozen=True)
class Clause:
    index: int  # 0-based position in the statement
    name: str
    named: bool  # False: the default name unnamed_rule_<index>
    rule: Rule
    text: str


@dataclass(frozen=True)
class CheckCompare:
    name1: str
    tag1: Tag
    name2: str
    tag2: Tag
    text: str


@dataclass(frozen=True)
class CheckNot:
    rule: CheckRule


@dataclass(frozen=True)
class CheckAnd:
    left: CheckRule
    right: CheckRule


CheckRule = CheckCompare | CheckNot | CheckAnd


@dataclass(frozen=True)
class Check:
    rule: CheckRule
    text: str


@dataclass(frozen=True)
class Statement:
    text: str
    level: str  # series | study | patient | project
    clauses: tuple[Clause, ...]
    checks: tuple[Check, ...] = ()

    @property
    def tags(self) -> frozenset[int]:
        """Every DICOM tag the statement reads (what study.json must hold per series)."""
        found: set[int] = set()

        def walk(r: Any) -> None:
            if isinstance(r, Compare) and r.tag.tag is not None:
                found.add(r.tag.tag)
            elif isinstance(r, CheckCompare):
                for t in (r.tag1, r.tag2):
                    if t.tag is not None:
                        found.add(t.tag)
            elif isinstance(r, (Not, CheckNot)):
                walk(r.rule)
            elif isinstance(r, (And, Or, CheckAnd)):
                walk(r.left)
                walk(r.right)
        for c in self.clauses:
            walk(c.rule)
        for ch in self.checks:
            walk(ch.rule)
        return frozenset(found)


# -- parsing ---------------------------------------------------------------------------

def _fail(reason: str, item: Any) -> RorSelectError:
    line = getattr(item, "line", None) or getattr(getattr(item, "meta", None), "line", 0) or 0
    column = getattr(item, "column", None) or getattr(getattr(item, "meta", None),
                                                       "column", 0) or 0
    return RorSelectError(reason, line, column)


def _string(tree: lark.Tree) -> lark.Token:
    tok = tree.children[0]
    assert isinstance(tok, lark.Token)
    if tok.type in ("DQ", "SQ"):
        return tok.update(value=tok[1:-1])  # ror has no escapes inside quotes
    return tok


def _float32(x: float) -> float | None:
    """``x`` as ror holds it: ``strconv.ParseFloat(s, 32)`` (select_group.y ``num``,
    classify_dicom.go ``evalLeaf``); None when out of float32's range."""
    if math.isnan(x) or math.isinf(x):
        return x
    try:
        return float(struct.unpack("<f", struct.pack("<f", x))[0])
    except OverflowError:
        return None


def go_float(x: float) -> str:
    """``fmt.Sprintf("%v", x)`` of Go: how ror turns a number of a statement into the
    text ``==`` compares (classify_dicom.go ``evalLeaf``): shortest digits, ``%e`` form
    for exponents below -4 or from 6 on (``1e+06``), no trailing ``.0``."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    sign, digits, exp = Decimal(repr(x)).as_tuple()
    assert isinstance(exp, int)
    ds = list(digits)
    while len(ds) > 1 and ds[-1] == 0:
        ds.pop()
        exp += 1
    neg = "-" if sign else ""
    if ds == [0]:
        return neg + "0"
    nd = len(ds)
    dp = nd + exp
    s = "".join(map(str, ds))
    e = dp - 1
    if e < -4 or e >= 6:
        mant = s[0] + ("." + s[1:] if nd > 1 else "")
        return f"{neg}{mant}e{'-' if e < 0 else '+'}{abs(e):02d}"
    if dp <= 0:
        return f"{neg}0.{'0' * -dp}{s}"
    if dp >= nd:
        return neg + s + "0" * (dp - nd)
    return f"{neg}{s[:dp]}.{s[dp:]}"


def _tag_by_name(tok: lark.Token) -> Tag:
    name = str(tok)
    if name in DERIVED:
        return Tag(name, derived=DERIVED[name])
    tag = tag_for_keyword(name)
    if tag is None:
        raise _fail(f"unknown tag name {name!r}: expected a DICOM keyword (ProtocolName), "
                    "ClassifyType, NumImages, NumSlices or a (\"0xGGGG\",\"0xEEEE\") pair", tok)
    return _comparable(Tag(name, tag=int(tag)), tok)


def _comparable(tag: Tag, tok: Any) -> Tag:
    assert tag.tag is not None
    try:
        vr = dictionary_VR(tag.tag)
    except KeyError:
        return tag  # private or unknown: its value representation decides at evaluation
    for part in vr.split(" or "):
        if part in _NOT_COMPARABLE:
            raise _fail(f"{tag.text} is {_NOT_COMPARABLE[part]} ({part}): it has no value "
                        "a select statement can compare", tok)
    return tag


def _hex(tok: lark.Token) -> int:
    # select_group.y group_tag_pair: "0x"/"0X" removed, the rest read as hexadecimal
    text = str(tok).replace("0x", "").replace("0X", "")
    if not text or len(text) > 4 or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise _fail(f"{str(tok)!r} is not a tag group or element (up to four hexadecimal "
                    "digits, e.g. \"0x0018\")", tok)
    return int(text, 16)


class _Build(lark.Transformer[lark.Token, Any]):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.source = text
        self.clauses = 0
        self.names: set[str] = set()  # the clauses come before the checks in the tree

    def _text(self, meta: Any) -> str:
        return " ".join(self.source[meta.start_pos:meta.end_pos].split())

    def string(self, children: list[lark.Token]) -> lark.Token:
        return _string(lark.Tree("string", list(children)))

    def name(self, children: list[lark.Token]) -> lark.Token:
        return _string(lark.Tree("name", list(children)))

    def tag_name(self, children: list[lark.Token]) -> Tag:
        return _tag_by_name(children[0])

    def tag_pair(self, children: list[lark.Token]) -> Tag:
        group, elem = _hex(children[1]), _hex(children[3])
        text = f'("{children[1]}","{children[3]}")'
        return _comparable(Tag(text, tag=(group << 16) | elem), children[1])

    @lark.v_args(meta=True)
    def compare(self, meta: Any, children: list[Any]) -> Compare:
        tag, op_tok, val = children
        op = {"EQ": "==", "CONTAINING": "containing", "CONTAINS": "containing", "REGEXP": "regexp"}.get(
            op_tok.type, str(op_tok))
        if val.type == "NUMBER":
            f = _float32(float(val))
            if f is None:
                raise _fail(f"number {val!s} is out of range (ror reads numbers as "
                            "32-bit floats)", val)
            # == compares text: Go's %v of the number (of the number as written, not of
            # its float32 rounding, see docs/ror-select.md); < > <= >= compare float32s
            if op == "==":
                return Compare(tag, op, go_float(float(val)), str(val))
            return Compare(tag, op, f, str(val))
        text = str(val)
        if op == "regexp":
            try:
                pattern = re2.compile(text, options=_RE2_OPTIONS)
            except re2.error as exc:
                msg = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) \
                    else str(exc)
                raise _fail(f"invalid regular expression {text!r}: {msg}", val) from None
            return Compare(tag, op, text, text, pattern)
        return Compare(tag, op, text, text)

    def everything(self, children: list[Any]) -> Everything:
        return Everything()

    def not_(self, children: list[Any]) -> Not:
        return Not(children[1])

    def and_(self, children: list[Any]) -> And:
        return And(children[0], children[2])

    def or_(self, children: list[Any]) -> Or:
        return Or(children[0], children[2])

    def rule(self, children: list[Any]) -> Any:  # ( rules )
        return children[1]

    def check_rule(self, children: list[Any]) -> Any:  # ( checks )
        return children[1]

    def level(self, children: list[lark.Token]) -> lark.Token:
        return children[0]

    def named(self, children: list[Any]) -> lark.Token:
        name: lark.Token = children[1]
        if not name or not (name[0].isascii() and name[0].isalnum()) or any(
                not (c.isascii() and (c.isalnum() or c in "_.-")) for c in name):
            raise _fail(f"series name {str(name)!r}: names are {_NAME_CHARS} (a name is a "
                        "folder of the container's /input)", name)
        return name

    @lark.v_args(meta=True)
    def clause(self, meta: Any, children: list[Any]) -> tuple[str | None, Rule, str]:
        name = next((c for c in children if isinstance(c, lark.Token) and c.type in
                     ("DQ", "SQ", "WORD", "HEX")), None)
        self.names.add(str(name) if name is not None else f"unnamed_rule_{self.clauses}")
        self.clauses += 1
        return (str(name) if name is not None else None, children[-1], self._text(meta))

    @lark.v_args(meta=True)
    def check_compare(self, meta: Any, children: list[Any]) -> CheckCompare:
        n1, _at, t1, _eq, n2, _at2, t2 = children
        for tag, tok in ((t1, n1), (t2, n2)):
            if str(tok) not in self.names:
                raise _fail(f"CHECK names series {str(tok)!r}, which no WHERE clause names "
                            f"(named: {', '.join(sorted(self.names))})", tok)
            if tag.derived:
                raise _fail(f"CHECK compares DICOM tags of two series, not {tag.text}", tok)
        return CheckCompare(str(n1), t1, str(n2), t2, self._text(meta))

    def check_not(self, children: list[Any]) -> CheckNot:
        return CheckNot(children[1])

    def check_and(self, children: list[Any]) -> CheckAnd:
        return CheckAnd(children[0], children[2])

    @lark.v_args(meta=True)
    def check(self, meta: Any, children: list[Any]) -> Check:
        return Check(children[1], self._text(meta))

    def select(self, children: list[Any]) -> tuple[lark.Token, list[Any]]:
        level = children[1]
        clauses = [c for c in children[2:] if isinstance(c, tuple)]
        return level, clauses

    def start(self, children: list[Any]) -> Statement:
        (level, raw), checks = children[0], children[1:]
        lv = str(level).lower()
        lv = "patient" if lv == "participant" else lv
        clauses = tuple(
            Clause(i, name if name is not None else f"unnamed_rule_{i}", name is not None,
                   rule, text) for i, (name, rule, text) in enumerate(raw))
        return Statement(self.source, lv, clauses, tuple(checks))


def _expected(names: Any) -> str:
    shown = sorted({_TERMINALS.get(n, n) for n in names})
    return ", ".join(shown)


def parse(text: str) -> Statement:
    """The statement of ``text``; RorSelectError (with line and column) if it is not one."""
    if not isinstance(text, str) or not text.strip():
        raise RorSelectError("expected a select statement (SELECT series FROM study WHERE ...)")
    try:
        tree = _parser().parse(text)
    except lark.UnexpectedCharacters as exc:
        raise RorSelectError(f"unexpected character {text[exc.pos_in_stream or 0]!r}; expected "
                             f"{_expected(exc.allowed)}", exc.line, exc.column) from None
    except lark.UnexpectedEOF as exc:
        raise RorSelectError(f"the statement ends early; expected {_expected(exc.expected)}",
                             *_end(text)) from None
    except lark.UnexpectedToken as exc:
        tok = exc.token
        if tok.type == "$END":
            raise RorSelectError(f"the statement ends early; expected "
                                 f"{_expected(exc.expected)}", *_end(text)) from None
        raise RorSelectError(f"unexpected {str(tok)!r}; expected {_expected(exc.expected)}",
                             exc.line, exc.column) from None
    select = tree.children[0]
    assert isinstance(select, lark.Tree) and isinstance(select.children[1], lark.Tree)
    level = select.children[1].children[0]  # start -> select -> level -> token
    if str(level).lower() not in LEVELS + ("participant",):
        # ror's findMatchingSets: any other output level is "unknown"
        raise _fail(f"SELECT {level}: unknown output level (expected series, study, "
                    "patient or project)", level)
    try:
        stmt = _Build(text).transform(tree)
    except lark.exceptions.VisitError as exc:
        if isinstance(exc.orig_exc, RorSelectError):
            raise exc.orig_exc from None
        raise
    assert isinstance(stmt, Statement)
    return stmt


def _end(text: str) -> tuple[int, int]:
    lines = text.rstrip().split("\n")
    return len(lines), len(lines[-1]) + 1


# -- values ----------------------------------------------------------------------------

def values_of(ds: Dataset, tag: int) -> list[str] | None:
    """A tag's values in one instance as ror's text (ror.go ``dataSets``: one string per
    value; integers in decimal, FL/FD with six decimals as Go's ``%f``), or None when
    the instance has no comparable value (absent, binary, a sequence, a name)."""
    try:
        elem = ds.get(tag)
    except (ValueError, TypeError, KeyError, OverflowError, UnicodeError):
        return None
    if elem is None or elem.VR in _NOT_COMPARABLE or elem.VR.startswith("O"):
        return None
    value = elem.value
    if value is None or value == "":
        return None if elem.VR in ("SS", "SL", "US", "UL", "SV", "UV", "FL", "FD") else [""]
    items = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    out: list[str] = []
    for v in items:
        if isinstance(v, bytes):
            return None
        if elem.VR in ("FL", "FD"):
            out.append(f"{float(v):.6f}")
        elif elem.VR in ("SS", "SL", "US", "UL", "SV", "UV"):
            out.append(str(int(v)))
        else:
            original = getattr(v, "original_string", None)  # DS/IS as written
            out.append((original if isinstance(original, str) else str(v)).strip())
    return out


def _series_values(series: dict[str, Any], tag: Tag) -> list[str] | None:
    """classify_dicom.go ``evalLeaf``/``getData``: the values a rule sees in a series."""
    if tag.derived == "ClassifyType":
        types = series.get("ClassifyType")
        return [str(t) for t in types] if isinstance(types, list) else []
    if tag.derived == "NumImages":
        return [str(series.get("NumImages", 0))]
    tags = series.get("tags")
    found = tags.get(tag.key) if isinstance(tags, dict) else None
    return [str(v) for v in found] if isinstance(found, list) else None


def _number(text: str) -> float | None:
    """``strconv.ParseFloat(text, 32)`` of Go for the values ror compares (None: ror
    stops with an error; dts counts the value as not satisfying the comparison)."""
    if text.lower().lstrip("+-") in ("inf", "infinity", "nan"):
        return float(text.lower().replace("infinity", "inf"))
    if not text or any(c not in "0123456789.eE+-" for c in text):
        return None  # Python's float() also takes spaces and '_', Go's does not
    try:
        return _float32(float(text))
    except ValueError:
        return None


# -- evaluation ------------------------------------------------------------------------

def _show(values: list[str]) -> str:
    if len(values) == 1:
        return repr(values[0])
    return "[" + ", ".join(repr(v) for v in values[:6]) + (", ...]" if len(values) > 6 else "]")


def _leaf(series: dict[str, Any], rule: Compare) -> tuple[bool, str]:
    """classify_dicom.go ``evalLeaf``: one comparison on one series, and why it failed."""
    values = _series_values(series, rule.tag)
    name = rule.tag.label
    what = f"{name} {rule.op} {rule.text!r}"
    if values is None:  # getData: a tag the series does not have matches nothing
        return False, f"no {name} in this series ({what})"
    op = rule.op
    if op == "containing":  # any value equal
        ok = any(v == rule.value for v in values)
    elif op == "==":  # every value equal and none empty (vacuously true for no values)
        ok = all(v != "" and v == rule.value for v in values)
    elif op == "regexp":  # Go regexp MatchString: found anywhere in any value
        ok = any(rule.pattern.search(v) is not None for v in values)
    else:
        assert isinstance(rule.value, float)
        limit = rule.value
        ok = False
        bad: list[str] = []
        for v in values:
            if v == "":  # "no value matches nothing"
                continue
            n = _number(v)
            if n is None:
                bad.append(v)
                continue
            if ((op == "<" and n < limit) or (op == ">" and n > limit)
                    or (op == "<=" and n <= limit) or (op == ">=" and n >= limit)):
                ok = True
        if not ok and bad:
            return False, f"{name} {_show(values)} is not a number ({what})"
    return ok, "" if ok else f"{name} is {_show(values)} ({what} is false)"


def _eval(series: dict[str, Any], rule: Rule) -> tuple[bool, str]:
    """classify_dicom.go ``evalRulesTree``: AND, OR and NOT over the comparisons."""
    if isinstance(rule, Compare):
        return _leaf(series, rule)
    if isinstance(rule, Everything):
        return True, ""
    if isinstance(rule, Not):
        ok, _why = _eval(series, rule.rule)
        return (not ok), "" if not ok else "NOT: the negated rule holds"
    left, why_l = _eval(series, rule.left)
    right, why_r = _eval(series, rule.right)
    if isinstance(rule, And):
        return left and right, "; ".join(w for w in (why_l, why_r) if w)
    return left or right, "" if left or right else f"{why_l} and {why_r}"


def _series_label(s: dict[str, Any]) -> str:
    desc = s.get("SeriesDescription") or ""
    return f"series {s.get('SeriesNumber')}" + (f" {desc!r}" if desc else "")


@dataclass
class ClauseResult:
    clause: Clause
    series: list[str] = field(default_factory=list)  # SeriesInstanceUIDs it names
    failed: dict[str, str] = field(default_factory=dict)  # uid -> why it did not hold
    taken: dict[str, str] = field(default_factory=dict)  # uid -> earlier clause's name


@dataclass
class CheckResult:
    check: Check
    ok: bool
    detail: str
    dropped: list[str] = field(default_factory=list)


@dataclass
class Result:
    """What a statement selects in a study, and why."""
    statement: Statement
    selection: dict[str, list[str]]
    matched: bool
    reason: str
    clauses: list[ClauseResult]
    checks: list[CheckResult]


def _pairs_ok(doc_series: dict[str, dict[str, Any]], named: dict[str, list[str]],
              cmp: CheckCompare) -> tuple[bool, set[str]]:
    """classify_dicom.go ``evalCheckRule``: a series named name1 and one named name2
    whose values are equal position by position (over the shorter list); both must have
    the tag. True if some pair is; the series that are in such a pair."""
    keep: set[str] = set()
    for a in named.get(cmp.name1, []):
        va = _series_values(doc_series[a], cmp.tag1)
        for b in named.get(cmp.name2, []):
            vb = _series_values(doc_series[b], cmp.tag2)
            if va is not None and vb is not None and all(x == y for x, y in zip(va, vb)):
                keep.update((a, b))
    return bool(keep), keep


def _check_holds(doc_series: dict[str, dict[str, Any]], named: dict[str, list[str]],
                 rule: CheckRule) -> bool:
    if isinstance(rule, CheckCompare):
        return _pairs_ok(doc_series, named, rule)[0]
    if isinstance(rule, CheckNot):
        return not _check_holds(doc_series, named, rule.rule)
    return _check_holds(doc_series, named, rule.left) and \
        _check_holds(doc_series, named, rule.right)


def _positive_terms(rule: CheckRule) -> list[CheckCompare]:
    if isinstance(rule, CheckCompare):
        return [rule]
    if isinstance(rule, CheckAnd):
        return _positive_terms(rule.left) + _positive_terms(rule.right)
    return []


def evaluate(stmt: Statement, doc: dict[str, Any]) -> Result:
    """What ``stmt`` selects in the study document ``doc`` (ror.go ``findMatchingSets``
    for one study): each series takes the name of the first clause it satisfies; at
    series level any named series is a match, at study, patient and project level every
    clause must name at least one series; CHECK then keeps the pairs that agree."""
    series = [s for s in doc.get("series", []) if isinstance(s, dict)]
    by_uid = {str(s.get("SeriesInstanceUID")): s for s in series}
    results = [ClauseResult(c) for c in stmt.clauses]
    for uid, s in by_uid.items():
        first: ClauseResult | None = None
        for r in results:
            ok, why = _eval(s, r.clause.rule)
            if not ok:
                r.failed[uid] = why
            elif first is None:
                first = r
                r.series.append(uid)
            else:
                # ror stops with "More than one rule matches a series"; dts keeps the
                # first name (see docs/ror-select.md)
                r.taken[uid] = first.clause.name
    named: dict[str, list[str]] = {}
    for r in results:
        if r.series:
            named.setdefault(r.clause.name, []).extend(r.series)
    matched, reason = True, ""
    if stmt.level == "series":
        if not named:
            matched, reason = False, "no series satisfies any clause"
    else:
        missing = [r.clause.name for r in results if not r.series]
        if missing:
            matched = False
            reason = (f"SELECT {stmt.level}: every clause must name a series; none for "
                      f"{', '.join(missing)}")
    checks: list[CheckResult] = []
    if matched:
        for ch in stmt.checks:
            if not _check_holds(by_uid, named, ch.rule):
                checks.append(CheckResult(ch, False, f"CHECK {ch.text}: no selected series "
                                                     "agree"))
                matched, reason = False, f"CHECK {ch.text} does not hold"
                break
            dropped: list[str] = []
            for term in _positive_terms(ch.rule):
                _ok, keep = _pairs_ok(by_uid, named, term)
                for n in (term.name1, term.name2):
                    gone = [u for u in named.get(n, []) if u not in keep]
                    dropped += gone
                    named[n] = [u for u in named.get(n, []) if u in keep]
            if not _check_holds(by_uid, named, ch.rule):
                checks.append(CheckResult(ch, False, f"CHECK {ch.text}: does not hold once "
                                                     "the series that disagree are left out",
                                          dropped))
                matched, reason = False, f"CHECK {ch.text} does not hold"
                break
            detail = f"CHECK {ch.text}: holds"
            if dropped:
                detail += "; left out: " + ", ".join(
                    _series_label(by_uid[u]) for u in dropped)
            checks.append(CheckResult(ch, True, detail, dropped))
    selection = {n: [u for u in by_uid if u in uids] for n, uids in named.items() if uids}
    return Result(stmt, selection if matched else {}, matched, reason, results, checks)


def explain_clause(r: ClauseResult, doc: dict[str, Any], required: bool) -> tuple[bool, str]:
    """One clause's line for ``dts classify --explain``: ok and the detail."""
    by_uid = {str(s.get("SeriesInstanceUID")): s for s in doc.get("series", [])
              if isinstance(s, dict)}
    head = f"clause {r.clause.index + 1} ({r.clause.name}) `{r.clause.text}`"
    if r.series:
        detail = f"{head}: " + ", ".join(f"{_series_label(by_uid[u])} ({u})" for u in r.series)
    else:
        why = "; ".join(f"{_series_label(by_uid[u])}: {w}" for u, w in r.failed.items())
        detail = f"{head}: no series" + (f" ({why})" if why else "")
        if not required:
            detail += " (not required at series level)"
    for uid, first in r.taken.items():
        detail += (f"; {_series_label(by_uid[uid])} satisfies it too but is named {first} "
                   "by an earlier clause")
    return bool(r.series) or not required, detail
