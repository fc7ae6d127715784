"""Owns the structured results a model reports beside its DICOM objects (docs/results.md).

A model in the ``dts`` contract may write ``/output/results.json``::

    {"measurements": [{"name": "tumor_size", "value": 42.5, "unit": "mm",
                       "series_uid": "1.2.3..."}]}

and one in the ``ror`` contract ``/output/output.json``, the predecessor's records (an
object of named records, or a list of them)::

    {"tumor": {"record_id": "P1", "event_name": "baseline", "field_name": "tumor_size",
               "value": "42.5"}}

Both become the same ``ResultEntry`` list: job.json ``results``, one journal ``result``
event each, and rows of the journal database's ``dts_results``. A file that is present
but not of this shape fails the job (``InvalidResults`` names the file and the record);
nothing of that job is sent. The files themselves are not DICOM: they stay in
``other_files`` and reach folder destinations only.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .dicom.uid import valid_uid
from .errors import JobFailed
from .jobrecord import ResultEntry

RESULTS_FILE = "results.json"      # contract "dts"
ROR_OUTPUT_JSON = "output.json"    # contract "ror"
ROR_FIELDS = ("record_id", "event_name", "field_name", "value")
MAX_NAME = 256
MAX_VALUE = 4096
MAX_RESULTS = 10000


class InvalidResults(JobFailed):
    """A results file that is not of the documented shape."""

    def __init__(self, file: str, where: str, reason: str) -> None:
        self.file, self.where, self.reason = file, where, reason
        super().__init__(f"{file}: {where + ': ' if where else ''}{reason} (see docs/results.md)")


def results_file(contract: str) -> str:
    return ROR_OUTPUT_JSON if contract == "ror" else RESULTS_FILE


def read_results(output_dir: Path, contract: str) -> list[ResultEntry]:
    """The results the run reported (none when the file is absent)."""
    name = results_file(contract)
    path = output_dir / name
    if not path.is_file() or path.is_symlink():
        return []
    try:
        data = json.loads(path.read_bytes(), parse_constant=_no_constant)
    except ValueError as exc:
        raise InvalidResults(name, "", f"not valid JSON: {exc}") from None
    entries = _ror_records(name, data) if contract == "ror" else _measurements(name, data)
    if len(entries) > MAX_RESULTS:
        raise InvalidResults(name, "", f"{len(entries)} results, at most {MAX_RESULTS}")
    return entries


def _no_constant(text: str) -> Any:
    raise ValueError(f"{text} is not a JSON number")


def _value(file: str, where: str, value: Any) -> str | int | float | bool:
    if isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidResults(file, where, f"value {value!r} is not a finite number")
        return value
    if isinstance(value, str):
        if len(value) > MAX_VALUE:
            raise InvalidResults(file, where, f"value longer than {MAX_VALUE} characters")
        return value
    raise InvalidResults(file, where, f"value must be a number, a string or true/false, "
                         f"got {json.dumps(value)[:80]}")


def _text(file: str, where: str, key: str, value: Any, *, numbers: bool = False) -> str:
    if numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # ror formats every field with %v
    if not isinstance(value, str) or not value.strip():
        raise InvalidResults(file, where, f"{key} must be a non-empty string, got "
                             f"{json.dumps(value)[:80]}")
    if len(value) > MAX_NAME:
        raise InvalidResults(file, where, f"{key} longer than {MAX_NAME} characters")
    return value


def _measurements(file: str, data: Any) -> list[ResultEntry]:
    return [m.entry for m in parse_document(file, data).measurements]


# -- the whole results.json: what the result builder makes DICOM of (dts.builders) ------

# UCUM units a measurement may give (docs/results.md), with the meaning written into the
# SR; any UCUM annotation ``{...}`` (``{count}``, ``{score}``) is accepted as well.
UCUM_UNITS: dict[str, str] = {
    "1": "no units", "%": "percent", "{ratio}": "ratio",
    "um": "micrometer", "mm": "millimeter", "cm": "centimeter", "m": "meter",
    "mm2": "square millimeter", "cm2": "square centimeter", "m2": "square meter",
    "mm3": "cubic millimeter", "cm3": "cubic centimeter", "ml": "milliliter",
    "mL": "milliliter", "l": "liter", "L": "liter",
    "ms": "millisecond", "s": "second", "min": "minute", "h": "hour", "d": "day",
    "a": "year", "wk": "week", "mo": "month",
    "mg": "milligram", "g": "gram", "kg": "kilogram",
    "g/ml": "gram per milliliter", "g/cm3": "gram per cubic centimeter",
    "mg/ml": "milligram per milliliter", "kg/m2": "kilogram per square meter",
    "[hnsf'U]": "Hounsfield unit", "deg": "degree", "rad": "radian",
    "Hz": "hertz", "/min": "per minute", "mm/s": "millimeter per second",
    "cm/s": "centimeter per second", "ml/s": "milliliter per second",
    "ml/min": "milliliter per minute", "mm2/s": "square millimeter per second",
    "Gy": "gray", "mGy": "milligray", "Sv": "sievert", "mSv": "millisievert",
    "Bq": "becquerel", "MBq": "megabecquerel", "Bq/ml": "becquerel per milliliter",
    "{SUVbw}g/ml": "Standardized Uptake Value body weight", "mmHg": "millimeter of mercury",
}
_ANNOTATION = re.compile(r"^\{[A-Za-z0-9 _.:/()-]{1,40}\}$")
MAX_CODE_VALUE = 64        # CodeValue (SH, 16) or LongCodeValue (UC, 64)
MAX_MEANING = 64           # CodeMeaning (LO)
MAX_TITLE = 64
MAX_FINDING_TEXT = 10000


def unit_meaning(unit: str) -> str | None:
    """The meaning of a known UCUM unit, None when it is not one dts knows."""
    if unit in UCUM_UNITS:
        return UCUM_UNITS[unit]
    return unit[1:-1] if _ANNOTATION.match(unit) else None


@dataclass(frozen=True)
class Code:
    """A coded concept: ``{"value": "...", "scheme": "SCT", "meaning": "..."}``."""

    value: str
    scheme: str
    meaning: str


@dataclass
class Measurement:
    entry: ResultEntry
    code: Code | None = None            # the concept measured (default: name, scheme 99DTS)
    value_code: Code | None = None      # a qualitative finding's coded value
    finding: Code | None = None         # the finding the measurement is of
    finding_site: Code | None = None    # the anatomy
    tracking_id: str | None = None      # groups measurements of one finding
    sop_uids: tuple[str, ...] = ()      # the source images measured on
    where: str = ""


@dataclass
class Label:
    value: int                          # the voxel value in the mask (label map)
    label: str                          # SegmentLabel
    category: Code                      # SegmentedPropertyCategoryCodeSequence
    type: Code                          # SegmentedPropertyTypeCodeSequence
    algorithm_name: str | None = None   # defaults to the model's name
    algorithm_version: str | None = None
    tracking_id: str | None = None
    where: str = ""


@dataclass
class SegmentationSpec:
    file: str                           # relative to output/: .npy, .nii or .nii.gz
    series_uid: str                     # the input series the mask is aligned to
    labels: list[Label]
    fractional: bool = False
    where: str = ""


@dataclass
class DocumentSpec:
    file: str                           # a PDF, relative to output/
    title: str
    where: str = ""


@dataclass
class ImageSpec:
    file: str                           # a PNG or JPEG, relative to output/
    burn_in: bool = False               # write the not-for-diagnostic-use text into pixels
    description: str | None = None
    where: str = ""


@dataclass
class KeyImageSpec:
    sop_uid: str                        # an input instance to flag
    where: str = ""


@dataclass
class ResultsDocument:
    """A checked results.json (docs/results.md)."""

    file: str = RESULTS_FILE
    measurements: list[Measurement] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    segmentations: list[SegmentationSpec] = field(default_factory=list)
    documents: list[DocumentSpec] = field(default_factory=list)
    images: list[ImageSpec] = field(default_factory=list)
    key_images: list[KeyImageSpec] = field(default_factory=list)
    model_name: str | None = None
    model_version: str | None = None

    @property
    def wants_objects(self) -> bool:
        return bool(self.measurements or self.findings or self.segmentations
                    or self.documents or self.images or self.key_images)

    def files(self) -> list[tuple[str, str]]:
        """(where, file) of every file the document names."""
        out = [(s.where, s.file) for s in self.segmentations]
        out += [(d.where, d.file) for d in self.documents]
        out += [(i.where, i.file) for i in self.images]
        return out


def read_document(output_dir: Path) -> ResultsDocument | None:
    """The whole results.json of a ``dts``-contract run, checked field by field (None
    when there is none)."""
    path = output_dir / RESULTS_FILE
    if not path.is_file() or path.is_symlink():
        return None
    return parse_document(RESULTS_FILE, _load(RESULTS_FILE, path))


def _load(name: str, path: Path) -> Any:
    try:
        return json.loads(path.read_bytes(), parse_constant=_no_constant)
    except ValueError as exc:
        raise InvalidResults(name, "", f"not valid JSON: {exc}") from None


def parse_document(file: str, data: Any) -> ResultsDocument:
    if not isinstance(data, dict):
        raise InvalidResults(file, "", "must be a JSON object with a list 'measurements'")
    doc = ResultsDocument(file=file)
    for i, item in enumerate(_list(file, data, "measurements")):
        doc.measurements.append(_measurement(file, f"measurements[{i}]", item))
    for i, item in enumerate(_list(file, data, "findings")):
        if not isinstance(item, str) or not item.strip():
            raise InvalidResults(file, f"findings[{i}]", "must be a non-empty string")
        if len(item) > MAX_FINDING_TEXT:
            raise InvalidResults(file, f"findings[{i}]", f"longer than {MAX_FINDING_TEXT} "
                                 "characters")
        doc.findings.append(item)
    for i, item in enumerate(_list(file, data, "segmentations")):
        doc.segmentations.append(_segmentation(file, f"segmentations[{i}]", item))
    for i, item in enumerate(_list(file, data, "documents")):
        where = f"documents[{i}]"
        obj = _object(file, where, item, ("file",))
        doc.documents.append(DocumentSpec(
            file=_file(file, where, obj["file"], (".pdf",)),
            title=_text(file, where, "title", obj.get("title", "Report"))[:MAX_TITLE],
            where=where))
    for i, item in enumerate(_list(file, data, "images")):
        where = f"images[{i}]"
        obj = _object(file, where, item, ("file",))
        doc.images.append(ImageSpec(
            file=_file(file, where, obj["file"], (".png", ".jpg", ".jpeg")),
            burn_in=_bool(file, where, "burn_in", obj.get("burn_in", False)),
            description=(None if obj.get("description") is None else
                         _text(file, where, "description", obj["description"])[:MAX_TITLE]),
            where=where))
    for i, item in enumerate(_list(file, data, "key_images")):
        where = f"key_images[{i}]"
        obj = _object(file, where, item, ("sop_uid",))
        doc.key_images.append(KeyImageSpec(sop_uid=_uid(file, where, "sop_uid",
                                                        obj["sop_uid"]), where=where))
    model = data.get("model")
    if model is not None:
        obj = _object(file, "model", model, ())
        if obj.get("name") is not None:
            doc.model_name = _text(file, "model", "name", obj["name"])[:MAX_TITLE]
        if obj.get("version") is not None:
            doc.model_version = _text(file, "model", "version", obj["version"],
                                      numbers=True)[:MAX_TITLE]
    return doc


def _list(file: str, data: dict[str, Any], key: str) -> list[Any]:
    items = data.get(key, [])
    if items is None:
        return []
    if not isinstance(items, list):
        raise InvalidResults(file, key, "must be a list")
    return items


def _object(file: str, where: str, item: Any, required: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise InvalidResults(file, where, "must be an object" + (
            f" with {', '.join(required)}" if required else ""))
    for key in required:
        if key not in item:
            raise InvalidResults(file, where, f"{key} is missing")
    return item


def _bool(file: str, where: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidResults(file, where, f"{key} must be true or false, got "
                             f"{json.dumps(value)[:80]}")
    return value


def _uid(file: str, where: str, key: str, uid: Any) -> str:
    if not isinstance(uid, str) or not valid_uid(uid, conformant=True):
        raise InvalidResults(file, where, f"{key} {uid!r} is not a valid UID")
    return uid


def _file(file: str, where: str, name: Any, suffixes: tuple[str, ...]) -> str:
    if not isinstance(name, str) or not name.strip():
        raise InvalidResults(file, where, f"file must be a path relative to the output, "
                             f"got {json.dumps(name)[:80]}")
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts or not parts:
        raise InvalidResults(file, where, f"file {name!r} must be a path inside the output "
                             "(relative, no '..')")
    if not name.lower().endswith(suffixes):
        raise InvalidResults(file, where, f"file {name!r} must end with "
                             f"{' or '.join(suffixes)}")
    return name


def _code(file: str, where: str, key: str, value: Any) -> Code:
    if not isinstance(value, dict):
        raise InvalidResults(file, where, f"{key} must be a code object "
                             '{"value": ..., "scheme": ..., "meaning": ...}, got '
                             f"{json.dumps(value)[:80]}")
    parts = []
    for part, limit in (("value", MAX_CODE_VALUE), ("scheme", 16), ("meaning", MAX_MEANING)):
        text = value.get(part)
        if not isinstance(text, str) or not text.strip() or "\\" in text:
            raise InvalidResults(file, where, f"{key}.{part} must be a non-empty string "
                                 f"(no backslash), got {json.dumps(text)[:80]}")
        if len(text) > limit:
            raise InvalidResults(file, where, f"{key}.{part} longer than {limit} characters")
        parts.append(text)
    return Code(*parts)


def _measurement(file: str, where: str, item: Any) -> Measurement:
    if not isinstance(item, dict):
        raise InvalidResults(file, where, "must be an object with name and value")
    for key in ("name", "value"):
        if key not in item:
            raise InvalidResults(file, where, f"{key} is missing")
    entry: ResultEntry = {"name": _text(file, where, "name", item["name"]),
                          "value": _value(file, where, item["value"]),
                          "unit": None, "source": file}
    m = Measurement(entry=entry, where=where)
    if item.get("unit") is not None:
        unit = _text(file, where, "unit", item["unit"])
        if unit_meaning(unit) is None:
            raise InvalidResults(file, where, f"unit {unit!r} is not a UCUM unit dts knows "
                                 "(docs/results.md lists them; {annotation} is accepted)")
        entry["unit"] = unit
    if item.get("series_uid") is not None:
        entry["series_uid"] = _uid(file, where, "series_uid", item["series_uid"])
    for key in ("code", "value_code", "finding", "finding_site"):
        if item.get(key) is not None:
            setattr(m, key, _code(file, where, key, item[key]))
    if item.get("tracking_id") is not None:
        m.tracking_id = _text(file, where, "tracking_id", item["tracking_id"], numbers=True)[:64]
    sops = item.get("sop_uids")
    if sops is not None:
        if not isinstance(sops, list):
            raise InvalidResults(file, where, "sop_uids must be a list of SOP Instance UIDs")
        m.sop_uids = tuple(_uid(file, where, "sop_uids", u) for u in sops)
    if m.value_code is not None and isinstance(entry["value"], (int, float)) \
            and not isinstance(entry["value"], bool):
        raise InvalidResults(file, where, "value_code is for a qualitative value (a string "
                             "or true/false), the value is a number")
    return m


def _segmentation(file: str, where: str, item: Any) -> SegmentationSpec:
    obj = _object(file, where, item, ("file", "series_uid", "labels"))
    spec = SegmentationSpec(
        file=_file(file, where, obj["file"], (".npy", ".nii", ".nii.gz")),
        series_uid=_uid(file, where, "series_uid", obj["series_uid"]),
        labels=[], fractional=_bool(file, where, "fractional", obj.get("fractional", False)),
        where=where)
    labels = obj["labels"]
    if not isinstance(labels, list) or not labels:
        raise InvalidResults(file, where, "labels must be a non-empty list of segment "
                             "descriptions")
    algorithm = obj.get("algorithm")
    seen: set[int] = set()
    for j, raw in enumerate(labels):
        lw = f"{where}.labels[{j}]"
        lab = _object(file, lw, raw, ("value", "label", "category", "type"))
        value = lab["value"]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise InvalidResults(file, lw, f"value must be an integer from 1 to 65535 (the "
                                 f"mask's voxel value), got {json.dumps(value)[:80]}")
        if value in seen:
            raise InvalidResults(file, lw, f"value {value} is described twice")
        seen.add(value)
        alg = lab.get("algorithm", algorithm)
        label = Label(value=value, label=_text(file, lw, "label", lab["label"])[:MAX_TITLE],
                      category=_code(file, lw, "category", lab["category"]),
                      type=_code(file, lw, "type", lab["type"]), where=lw)
        if alg is not None:
            a = _object(file, lw, alg, ())
            if a.get("name") is not None:
                label.algorithm_name = _text(file, lw, "algorithm.name", a["name"])[:MAX_TITLE]
            if a.get("version") is not None:
                label.algorithm_version = _text(file, lw, "algorithm.version", a["version"],
                                                numbers=True)[:MAX_TITLE]
        if lab.get("tracking_id") is not None:
            label.tracking_id = _text(file, lw, "tracking_id", lab["tracking_id"],
                                      numbers=True)[:64]
        spec.labels.append(label)
    return spec


def _ror_records(file: str, data: Any) -> list[ResultEntry]:
    if isinstance(data, dict):
        records = [(f"record {json.dumps(k)}", k, v) for k, v in data.items()]
    elif isinstance(data, list):
        records = [(f"record [{i}]", None, v) for i, v in enumerate(data)]
    else:
        raise InvalidResults(file, "", "must be a JSON object of records (or a list of "
                             "records) with record_id, event_name, field_name, value")
    out: list[ResultEntry] = []
    for where, key, rec in records:
        if not isinstance(rec, dict):
            raise InvalidResults(file, where, "must be an object with " + ", ".join(ROR_FIELDS))
        missing = [f for f in ROR_FIELDS if f not in rec]
        if missing:
            raise InvalidResults(file, where, f"{', '.join(missing)} missing")
        entry: ResultEntry = {
            "name": _text(file, where, "field_name", rec["field_name"], numbers=True),
            "value": _value(file, where, rec["value"]), "unit": None, "source": file,
            "record_id": _text(file, where, "record_id", rec["record_id"], numbers=True),
            "event_name": _text(file, where, "event_name", rec["event_name"], numbers=True)}
        if key is not None:
            entry["key"] = key
        out.append(entry)
    return out


def describe(entry: ResultEntry) -> str:
    """``tumor_size = 42.5 mm`` (for the journal's message)."""
    unit = f" {entry['unit']}" if entry.get("unit") else ""
    return f"{entry.get('name')} = {entry.get('value')}{unit}"
