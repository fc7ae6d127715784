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
    if not isinstance(data, dict):
        raise InvalidResults(file, "", "must be a JSON object with a list 'measurements'")
    items = data.get("measurements", [])
    if not isinstance(items, list):
        raise InvalidResults(file, "measurements", "must be a list")
    out: list[ResultEntry] = []
    for i, item in enumerate(items):
        where = f"measurements[{i}]"
        if not isinstance(item, dict):
            raise InvalidResults(file, where, "must be an object with name and value")
        for key in ("name", "value"):
            if key not in item:
                raise InvalidResults(file, where, f"{key} is missing")
        entry: ResultEntry = {"name": _text(file, where, "name", item["name"]),
                              "value": _value(file, where, item["value"]),
                              "unit": None, "source": file}
        if item.get("unit") is not None:
            entry["unit"] = _text(file, where, "unit", item["unit"])
        if item.get("series_uid") is not None:
            uid = item["series_uid"]
            if not isinstance(uid, str) or not valid_uid(uid, conformant=True):
                raise InvalidResults(file, where, f"series_uid {uid!r} is not a valid UID")
            entry["series_uid"] = uid
        out.append(entry)
    return out


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
