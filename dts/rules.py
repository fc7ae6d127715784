"""Owns the classification rules: the predecessor's ``classifyRules.json`` format.

The file is a list of rule entries::

    {"type": "ABCD-T1", "id": "OPTIONAL-ID", "description": "...", "check": "SeriesLevel",
     "rules": [{"tag": ["0x0008", "0x0070"], "value": "^SIEMENS", "operator": "regexp",
                "negate": "yes"}, {"rule": "OTHER-ID"}, ...]}

An entry gives its series the ``type`` when all of its clauses hold for an image of
the series (with ``"check": "SeriesLevel"``: for every image looked at). Semantics,
following what the predecessor station did wherever a rule file depends on it:

- ``tag``: ``[group, element]`` in hex (``"0x0008"``, short forms like ``"0x08"``, or
  ``"0008"``); ``[group, element, index]`` picks one value of a multi-valued element;
  ``[name]`` is a DICOM keyword (``"SeriesDescription"``) or one of the names the
  predecessor derived per series (``DERIVED``: ``NumSlices`` and
  ``PhaseEncodingDirectionPositive`` from the Siemens CSA headers, ``AcquisitionLength``,
  ``SequenceType`` ... from private tags, ``NumFiles``/``NumImages``), or
  ``ClassifyType``: the types earlier entries already gave this series. There is no
  access into sequences (as before).
- ``operator`` (default ``regexp``): ``regexp`` searches the value's text (a multi-valued
  element reads as ``[0, 256, 256, 0]`` or ``['ORIGINAL', 'PRIMARY']``, as before);
  ``contains`` is item membership for a multi-valued element and a substring test for a
  single value; ``==``, ``!=``, ``<``, ``>`` (also ``<=``, ``>=``) compare numbers, and
  ``==``/``!=`` compare text when either side is not a number; ``approx`` compares
  numbers or lists of numbers within ``approxLevel`` (default 1e-4); ``exist`` and
  ``notexist`` test presence.
- A comparison with a tag the image does not have is false, never an error; ``negate``
  (``"yes"``) inverts the comparison, so "does not contain X" holds when the tag is
  missing, as it did before.
- ``value`` may itself name a tag (``["0x0028", "0x0011"]``) to compare two elements.
- ``{"rule": ID}`` inlines the clauses of the entry with that ``id``; ``{"notrule": ID}``
  inlines them negated. Unknown, ambiguous (duplicate) or circular references are
  refused when the configuration loads.

Deliberate differences from the predecessor, each where it crashed or silently
matched: an unparsable number no longer counts as a match; ``exist`` works; ``==`` on
text compares the text; a SeriesLevel entry requires all images looked at to match
(instead of whichever image came last), and it never removes a type that another entry
of the same type gave. Entries are evaluated in file order, series by series, so a
``ClassifyType`` clause sees every type earlier entries gave to any image of the series.

``load_station_rules`` is called when the configuration loads (a bad file is refused
with file, entry and reason); the parsed rules are cached per path, size and mtime so the
classifier does not parse them again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

from .errors import ConfigError

# DICOM keywords and their tags (pydicom's dictionary; see tag_for_keyword)
KEYWORDS_FILE = "dicom-keywords.json"

OPERATORS = ("regexp", "contains", "==", "!=", "<", ">", "<=", ">=", "approx", "exist",
             "notexist")
_OPERATOR_ALIASES = {"exists": "exist", "notexists": "notexist", "regex": "regexp"}
_NUMERIC = ("==", "!=", "<", ">", "<=", ">=")
_ENTRY_KEYS = {"type", "id", "description", "rules", "check", "comment", "note"}
_CLAUSE_KEYS = {"tag", "value", "operator", "negate", "approxLevel", "rule", "notrule",
                "description", "comment", "note"}

# Names the predecessor computed per series (its series JSON was consulted before the
# DICOM keywords): private tags under readable names, tried in order, and values from
# the Siemens CSA headers.
_PRIVATE_ALIASES: dict[str, tuple[int, ...]] = {
    "AcquisitionLength": (0x0051100A,),
    "ActiveCoils": (0x0051100F,),
    "SequenceType": (0x20011020,),
    "Slices": (0x0021104F,),
    "PulseSequenceName": (0x0019109C, 0x00189005),
    "SliceSpacing": (0x00180088,),
    "Private0019_105a": (0x0019105A,),
    "Private0019_10BB": (0x001910BB,),
    "Private0043_1039": (0x00431039,),
}
_CSA_NAMES = ("NumSlices", "PhaseEncodingDirectionPositive")
_COUNT_NAMES = ("NumFiles", "NumImages")
DERIVED = tuple(_PRIVATE_ALIASES) + _CSA_NAMES + _COUNT_NAMES + ("ClassifyType",)

_CSA_IMAGE_TAGS = (0x00291010, 0x00291210, 0x00291110)
_CSA_SERIES_TAGS = (0x00291020, 0x00291220, 0x00291120)
_NSLICES = re.compile(r"sGroupArray\.asGroup\[0\]\.nSize\s*=\s*(\d+)")


@dataclass(frozen=True)
class TagSpec:
    """Where a clause looks: a DICOM tag (and value index), a derived name, or ClassifyType."""

    kind: str  # "tag" | "alias" | "csa" | "count" | "classify"
    text: str  # as written, for messages
    tags: tuple[int, ...] = ()
    index: int | None = None
    name: str = ""


@dataclass(frozen=True)
class Clause:
    tag: TagSpec
    operator: str
    value: Any = None
    value_ref: TagSpec | None = None
    negate: bool = False
    approx_level: float = 1e-4
    pattern: re.Pattern[str] | None = None

    def holds(self, facts: Facts, types: Sequence[str]) -> bool:
        present, v = facts.lookup(self.tag, types)
        op = self.operator
        if op == "exist":
            result = present
        elif op == "notexist":
            result = not present
        elif not present:
            result = False
        else:
            other = self.value
            if self.value_ref is not None:
                found, other = facts.lookup(self.value_ref, types)
                if not found:
                    return self.negate
            result = _compare(op, v, other, self.pattern, self.approx_level)
        return result != self.negate

    def describe(self) -> str:
        neg = "not " if self.negate else ""
        value = self.value_ref.text if self.value_ref else json.dumps(self.value)
        if self.operator in ("exist", "notexist"):
            return f"{neg}{self.operator} {self.tag.text}"
        return f"{self.tag.text} {neg}{self.operator} {value}"


@dataclass(frozen=True)
class RuleEntry:
    index: int  # position in the file
    type: str
    id: str | None
    description: str
    series_level: bool
    clauses: tuple[Clause, ...]

    def matches(self, facts: Facts, types: Sequence[str]) -> bool:
        return all(c.holds(facts, types) for c in self.clauses)


@dataclass(frozen=True)
class RuleSet:
    path: Path
    sha256: str
    entries: tuple[RuleEntry, ...]
    specs: tuple[TagSpec, ...] = field(default=())  # every tag a clause reads

    @property
    def types(self) -> list[str]:
        return list(dict.fromkeys(e.type for e in self.entries))

    def classify(self, images: Sequence[Facts]) -> list[str]:
        """The types of one series, from the facts of the images looked at."""
        types: list[str] = []
        if not images:
            return types
        for entry in self.entries:
            if entry.type in types:
                continue
            results = (entry.matches(f, types) for f in images)
            if all(results) if entry.series_level else any(results):
                types.append(entry.type)
        return types

    def signature(self, facts: Facts) -> tuple[tuple[bool, str], ...]:
        """What the rules can see of one image (ClassifyType aside): images with equal
        signatures classify alike."""
        out = []
        for spec in self.specs:
            present, v = facts.lookup(spec, ())
            out.append((present, text(v)))
        return tuple(out)

    def outcomes(self, facts: Facts) -> tuple[bool, ...]:
        """Every clause's result on one image (clauses on ClassifyType aside)."""
        return tuple(c.holds(facts, ()) for e in self.entries for c in e.clauses
                     if c.tag.kind != "classify" and
                     (c.value_ref is None or c.value_ref.kind != "classify"))

    def distinct(self, images: Sequence[Facts]) -> list[Facts]:
        """One image per class of images the rules cannot tell apart: all that
        ``classify`` needs to look at. Equal signatures first (cheap), then equal clause
        outcomes (so a tag that differs per image but flips no clause, such as a slice
        position a rule only bounds, does not split a series)."""
        by_signature: dict[tuple[tuple[bool, str], ...], Facts] = {}
        for f in images:
            by_signature.setdefault(self.signature(f), f)
        if len(by_signature) == 1:
            return list(by_signature.values())
        by_outcome: dict[tuple[bool, ...], Facts] = {}
        for f in by_signature.values():
            by_outcome.setdefault(self.outcomes(f), f)
        return list(by_outcome.values())


# -- values ------------------------------------------------------------------

def text(value: Any) -> str:
    """A value as the rules' regular expressions see it (the predecessor's ``str()``)."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("latin-1").strip("\x00 ")
    if isinstance(value, str):
        return value
    multi, sequence = _dicom_types()
    if isinstance(value, sequence):
        return ""
    if isinstance(value, (list, tuple, multi)):
        items = (repr(text(x)) if isinstance(x, (str, bytes)) else text(x) for x in value)
        return "[" + ", ".join(items) + "]"
    return str(value)


def _is_multi(value: Any) -> bool:
    multi, sequence = _dicom_types()
    return isinstance(value, (list, tuple, multi)) and not isinstance(value, sequence)


@functools.cache
def _dicom_types() -> tuple[type[Any], type[Any]]:
    """pydicom's MultiValue and Sequence. pydicom is imported here, when values are read
    (it is loaded by then), not when the rule file is: commands that only load the
    configuration (dts status, show, log ...) start without it (issue 16)."""
    from pydicom.multival import MultiValue
    from pydicom.sequence import Sequence

    return MultiValue, Sequence


def tag_for_keyword(name: str) -> int | None:
    """The tag of a DICOM keyword, from pydicom's dictionary as shipped in
    ``dts/data/dicom-keywords.json`` (reading it takes milliseconds, importing pydicom
    a third of a second; tests/test_rules.py keeps the two equal)."""
    return _keywords().get(name)


@functools.cache
def _keywords() -> dict[str, int]:
    data = json.loads(resources.files("dts.data").joinpath(KEYWORDS_FILE).read_bytes())
    return {str(k): int(v) for k, v in data["keywords"].items()}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or _is_multi(value):
        return None
    try:
        return float(text(value) if isinstance(value, bytes) else value)
    except (TypeError, ValueError):
        return None


def _numbers(value: Any) -> list[float] | None:
    if _is_multi(value):
        items = list(value)
    elif isinstance(value, (str, bytes)):
        items = text(value).split("\\")
    else:
        items = [value]
    out = [_number(x) for x in items]
    if not out or any(x is None for x in out):
        return None
    return [x for x in out if x is not None]


_PATTERNS: dict[str, re.Pattern[str] | None] = {}


def _pattern(source: str) -> re.Pattern[str] | None:
    if source not in _PATTERNS:
        try:
            _PATTERNS[source] = re.compile(source)
        except re.error:
            _PATTERNS[source] = None
    return _PATTERNS[source]


def _compare(op: str, v: Any, other: Any, pattern: re.Pattern[str] | None,
             level: float) -> bool:
    if op == "regexp":
        pat = pattern or _pattern(text(other))
        return pat is not None and pat.search(text(v)) is not None
    if op == "contains":
        needle = text(other)
        if _is_multi(v):
            return any(text(item) == needle for item in v)
        return needle in text(v)
    if op in _NUMERIC:
        a, b = _number(v), _number(other)
        if a is None or b is None:
            if op == "==":
                return not _is_multi(v) and text(v).strip() == text(other).strip()
            if op == "!=":
                return not _is_multi(v) and text(v).strip() != text(other).strip()
            return False
        return {"==": a == b, "!=": a != b, "<": a < b, ">": a > b, "<=": a <= b,
                ">=": a >= b}[op]
    if op == "approx":
        xs, ys = _numbers(v), _numbers(other)
        if xs is None or ys is None or len(xs) != len(ys):
            return False
        return all(abs(x - y) <= level for x, y in zip(xs, ys))
    return False


# -- what the rules read from an image ----------------------------------------

class Facts:
    """One image's header as the rules see it (lookups cached)."""

    def __init__(self, ds: Dataset, num_images: int = 1) -> None:
        self.ds = ds
        self.num_images = num_images
        self._csa: dict[int, dict[str, list[str]] | None] = {}
        self._elements: dict[int, tuple[bool, Any]] = {}
        self._keys = ds.keys()  # a dict view: membership without pydicom's KeyError path

    def element(self, tag: int) -> tuple[bool, Any]:
        found = self._elements.get(tag)
        if found is not None:
            return found
        try:
            elem = self.ds[tag] if tag in self._keys else None
            value = elem.value if elem is not None else None
        except (ValueError, TypeError, KeyError, OverflowError, UnicodeError):
            elem = None  # a value pydicom cannot convert counts as missing, never a crash
        if elem is None:
            found = (False, None)
        else:
            if isinstance(value, bytes):
                value = value.decode("latin-1").strip("\x00 ")
            found = (True, value)
        self._elements[tag] = found
        return found

    def lookup(self, spec: TagSpec, types: Sequence[str]) -> tuple[bool, Any]:
        kind = spec.kind
        if kind == "tag":
            present, value = self.element(spec.tags[0])
            if present and spec.index is not None:
                if _is_multi(value):
                    if not -len(value) <= spec.index < len(value):
                        return False, None
                    return True, value[spec.index]
                return (True, value) if spec.index == 0 else (False, None)
            return present, value
        if kind == "alias":
            for tag in spec.tags:
                present, value = self.element(tag)
                if present:
                    return True, value
            return False, None
        if kind == "classify":
            return True, list(types)
        if kind == "count":
            return True, self.num_images
        if kind == "csa":
            return self._csa_value(spec.name)
        return False, None

    def _csa_header(self, tags: tuple[int, ...]) -> dict[str, list[str]] | None:
        for tag in tags:
            if tag not in self._csa:
                elem = self.ds.get(tag)
                parsed = None
                if elem is not None and isinstance(elem.value, bytes):
                    try:
                        parsed = parse_csa(elem.value)
                    except (ValueError, struct.error):
                        parsed = None
                self._csa[tag] = parsed
            if self._csa[tag]:
                return self._csa[tag]
        return None

    def _csa_value(self, name: str) -> tuple[bool, Any]:
        if name == "NumSlices":
            series = self._csa_header(_CSA_SERIES_TAGS)
            protocol = (series or {}).get("MrPhoenixProtocol") or []
            m = _NSLICES.search(protocol[0]) if protocol else None
            return (True, m.group(1)) if m else (False, None)
        image = self._csa_header(_CSA_IMAGE_TAGS)
        values = (image or {}).get(name) or []
        return (True, values[0]) if values else (False, None)


def parse_csa(blob: bytes) -> dict[str, list[str]]:
    """The elements of a Siemens CSA header (formats 1 and 2) as lists of strings."""
    csa2 = blob[:4] == b"SV10"
    pos = 8 if csa2 else 0
    n_tags, _unused = struct.unpack_from("<II", blob, pos)
    pos += 8
    if not 0 < n_tags <= 1000:
        raise ValueError(f"implausible CSA tag count {n_tags}")
    out: dict[str, list[str]] = {}
    for _ in range(n_tags):
        name = blob[pos:pos + 64].split(b"\x00", 1)[0].decode("latin-1")
        pos += 64
        _vm, _vr, _syngodt, n_items, _xx = struct.unpack_from("<i4siii", blob, pos)
        pos += 20
        if not 0 <= n_items <= 1000:
            raise ValueError(f"implausible CSA item count {n_items}")
        values: list[str] = []
        for _ in range(n_items):
            x0, x1, _x2, _x3 = struct.unpack_from("<4i", blob, pos)
            pos += 16
            length = x1 if csa2 else x0 - n_tags
            if length < 0 or pos + length > len(blob):
                raise ValueError("CSA item runs past the end")
            item = blob[pos:pos + length].split(b"\x00", 1)[0].decode("latin-1").strip()
            if item:
                values.append(item)
            pos += length + (-length % 4)
        out[name] = values
    return out


# -- loading -------------------------------------------------------------------

class _Reader:
    def __init__(self, path: Path) -> None:
        self.file = str(path)

    def fail(self, where: str, reason: str) -> ConfigError:
        return ConfigError(self.file, where, reason)


def _hex(item: Any) -> int:
    if not isinstance(item, str):
        raise ValueError(f"expected a hex string like '0x0008', got {item!r}")
    s = item.strip().lower()
    s = s.removeprefix("0x")
    if not s or len(s) > 4 or not all(c in "0123456789abcdef" for c in s):
        raise ValueError(f"not a hex group/element: {item!r}")
    return int(s, 16)


def _index(item: Any) -> int:
    if isinstance(item, int) and not isinstance(item, bool):
        return item
    if isinstance(item, str):
        try:
            return int(item.strip(), 0)
        except ValueError:
            pass
    raise ValueError(f"not a value index: {item!r}")


def parse_tag(raw: Any) -> TagSpec:
    """A clause's ``tag`` (or a ``value`` naming a tag); ValueError if it is not one."""
    if not isinstance(raw, list) or not 1 <= len(raw) <= 3:
        raise ValueError(f"expected [name], [group, element] or [group, element, index], "
                         f"got {raw!r}")
    written = json.dumps(raw)
    if len(raw) == 1:
        name = raw[0]
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"expected a keyword, got {name!r}")
        name = name.strip()
        if name == "ClassifyType":
            return TagSpec("classify", written, name=name)
        if name in _COUNT_NAMES:
            return TagSpec("count", written, name=name)
        if name in _CSA_NAMES:
            return TagSpec("csa", written, name=name)
        if name in _PRIVATE_ALIASES:
            return TagSpec("alias", written, _PRIVATE_ALIASES[name], name=name)
        tag = tag_for_keyword(name)
        if tag is None:
            if len(name) == 8 or (len(name) == 10 and name.lower().startswith("0x")):
                hexpart = name[-8:]
                try:
                    return TagSpec("tag", written, (int(hexpart, 16),))
                except ValueError:
                    pass
            raise ValueError(f"unknown keyword {name!r} (neither a DICOM keyword nor one "
                             f"of {', '.join(DERIVED)})")
        return TagSpec("tag", written, (tag,), name=name)
    group, elem = _hex(raw[0]), _hex(raw[1])
    index = _index(raw[2]) if len(raw) == 3 else None
    return TagSpec("tag", written, ((group << 16) | elem,), index=index)


def _looks_like_tag_ref(value: Any) -> bool:
    if not isinstance(value, list) or not 1 <= len(value) <= 3:
        return False
    if len(value) == 1:
        return isinstance(value[0], str) and (value[0] in DERIVED
                                              or tag_for_keyword(value[0]) is not None)
    return all(isinstance(v, str) and v.strip().lower().startswith("0x") for v in value[:2])


def _negate(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in ("yes", "true", "no", "false", ""):
        return raw.strip().lower() in ("yes", "true")
    raise ValueError(f'expected "yes" or "no", got {raw!r}')


def _clause(r: _Reader, where: str, raw: dict[str, Any]) -> Clause:
    try:
        tag = parse_tag(raw.get("tag"))
    except ValueError as exc:
        raise r.fail(f"{where}.tag", str(exc)) from None
    op = raw.get("operator", "regexp")
    if isinstance(op, str):
        op = op.strip().lower()
        op = _OPERATOR_ALIASES.get(op, op)
    if op not in OPERATORS:
        raise r.fail(f"{where}.operator",
                     f"unknown operator {raw.get('operator')!r} (one of {', '.join(OPERATORS)})")
    try:
        negate = _negate(raw.get("negate", "no"))
    except ValueError as exc:
        raise r.fail(f"{where}.negate", str(exc)) from None
    level = 1e-4
    if "approxLevel" in raw:
        try:
            level = float(raw["approxLevel"])
        except (TypeError, ValueError):
            raise r.fail(f"{where}.approxLevel",
                         f"expected a number, got {raw['approxLevel']!r}") from None
    value = raw.get("value")
    value_ref = None
    pattern = None
    if op not in ("exist", "notexist"):
        if "value" not in raw or value is None:
            raise r.fail(f"{where}.value", f"operator {op!r} needs a value")
        if _looks_like_tag_ref(value):
            try:
                value_ref = parse_tag(value)
            except ValueError as exc:
                raise r.fail(f"{where}.value", str(exc)) from None
        elif isinstance(value, (dict, bool)) or (isinstance(value, list) and op != "approx"):
            raise r.fail(f"{where}.value", f"unusable value {value!r} for operator {op!r}")
        elif op == "regexp":
            try:
                pattern = re.compile(text(value))
            except re.error as exc:
                raise r.fail(f"{where}.value",
                             f"invalid regular expression {value!r}: {exc}") from None
        elif op == "approx" and _numbers(value) is None:
            raise r.fail(f"{where}.value", f"approx needs a number or a list of numbers, "
                         f"got {value!r}")
    return Clause(tag=tag, operator=op, value=value, value_ref=value_ref, negate=negate,
                  approx_level=level, pattern=pattern)


def parse_rules(path: Path, data: Any) -> RuleSet:
    """Check and resolve a parsed rule file; ConfigError naming the entry otherwise."""
    r = _Reader(path)
    if not isinstance(data, list):
        raise r.fail("", "expected a list of rule entries")
    by_id: dict[str, list[int]] = {}
    for i, entry in enumerate(data):
        where = f"[{i}]"
        if not isinstance(entry, dict):
            raise r.fail(where, "expected an object with type and rules")
        unknown = sorted(set(entry) - _ENTRY_KEYS)
        if unknown:
            raise r.fail(f"{where}.{unknown[0]}", "unknown key")
        if not isinstance(entry.get("type"), str) or not entry["type"].strip():
            raise r.fail(f"{where}.type", "every entry needs a type (a non-empty string)")
        if "id" in entry:
            if not isinstance(entry["id"], str) or not entry["id"]:
                raise r.fail(f"{where}.id", f"expected a string, got {entry['id']!r}")
            by_id.setdefault(entry["id"], []).append(i)
        check = entry.get("check")
        if check is not None and check != "SeriesLevel":
            raise r.fail(f"{where}.check", f'only "SeriesLevel" is known, got {check!r}')
        rules = entry.get("rules")
        if not isinstance(rules, list) or not rules:
            raise r.fail(f"{where}.rules", "expected a non-empty list of rules")

    def name(i: int) -> str:
        entry = data[i]
        return f"[{i}] ({entry.get('id') or entry['type']})"

    resolved: dict[int, list[Clause]] = {}

    def resolve(i: int, stack: tuple[int, ...]) -> list[Clause]:
        if i in resolved:
            return resolved[i]
        out: list[Clause] = []
        for j, raw in enumerate(data[i]["rules"]):
            where = f"{name(i)}.rules[{j}]"
            if not isinstance(raw, dict):
                raise r.fail(where, "expected an object")
            unknown = sorted(set(raw) - _CLAUSE_KEYS)
            if unknown:
                raise r.fail(f"{where}.{unknown[0]}", "unknown key")
            ref_key = "rule" if "rule" in raw else "notrule" if "notrule" in raw else None
            if ref_key is None:
                out.append(_clause(r, where, raw))
                continue
            if "tag" in raw:
                raise r.fail(where, f"give either tag or {ref_key}, not both")
            ref = raw[ref_key]
            targets = by_id.get(ref, []) if isinstance(ref, str) else []
            if not targets:
                raise r.fail(f"{where}.{ref_key}", f"no entry has id {ref!r}")
            if len(targets) > 1:
                raise r.fail(f"{where}.{ref_key}", f"id {ref!r} is ambiguous: entries "
                             f"{', '.join(str(t) for t in targets)} share it")
            k = targets[0]
            if k in stack:
                chain = " -> ".join(str(data[x].get("id") or x) for x in stack + (k,))
                raise r.fail(f"{where}.{ref_key}", f"circular reference: {chain}")
            inner = resolve(k, stack + (k,))
            if ref_key == "notrule":
                inner = [Clause(c.tag, c.operator, c.value, c.value_ref, not c.negate,
                                c.approx_level, c.pattern) for c in inner]
            out.extend(inner)
        resolved[i] = out
        return out

    entries = []
    for i, entry in enumerate(data):
        entries.append(RuleEntry(index=i, type=entry["type"].strip(), id=entry.get("id"),
                                 description=str(entry.get("description") or ""),
                                 series_level=entry.get("check") == "SeriesLevel",
                                 clauses=tuple(resolve(i, (i,)))))
    specs: dict[TagSpec, None] = {}
    for e in entries:
        for c in e.clauses:
            for s in (c.tag, c.value_ref):
                if s is not None and s.kind not in ("classify", "count"):
                    specs[s] = None
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    return RuleSet(path=path, sha256=digest, entries=tuple(entries), specs=tuple(specs))


_CACHE: dict[Path, tuple[tuple[int, int, int], RuleSet]] = {}


def load_rules(path: str | os.PathLike[str]) -> RuleSet:
    """Read, check and resolve a rule file (cached per path, mtime, size and inode)."""
    p = Path(path).resolve()
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ConfigError(str(p), "", "no such rule file") from None
    stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
    cached = _CACHE.get(p)
    if cached and cached[0] == stamp:
        return cached[1]
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ConfigError(str(p), "", f"not valid JSON: {exc}") from None
    except OSError as exc:
        raise ConfigError(str(p), "", exc.strerror or str(exc)) from None
    rules = parse_rules(p, data)
    _CACHE[p] = (stamp, rules)
    return rules


def load_station_rules(path: Path, config_file: Path | str) -> RuleSet:
    """The station's rules (``[station] classify_rules`` of ``config_file``); refused with
    file, entry and reason when bad."""
    if not path.exists():
        raise ConfigError(str(config_file), "station.classify_rules", f"no such file: {path}")
    return load_rules(path)


def iter_clauses(rules: RuleSet) -> Iterable[tuple[RuleEntry, Clause]]:
    for e in rules.entries:
        for c in e.clauses:
            yield e, c
