"""Owns reading a DICOM file's identity from its first bytes: study, series and SOP UIDs,
patient id and accession number, for the receiver and the importer.

This runs once per received instance, so little-endian files (nearly all) are scanned
here without building a pydicom data set, never further than the Series Instance UID
(pixel data is never touched); pydicom reads every other kind and has the last word
whenever the scan is not sure.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from pydicom.filereader import read_partial
from pydicom.tag import BaseTag

from . import filemeta

_TAGS = {
    0x00080018: "sop_uid",
    0x00080050: "accession",
    0x00100020: "patient_id",
    0x0020000D: "study_uid",
    0x0020000E: "series_uid",
}
_TAG_LIST: list[BaseTag | int] = [BaseTag(t) for t in _TAGS]


def _past_series_uid(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag > 0x0020000E


def read_header(path: Path | str) -> dict[str, str | None]:
    """The UIDs, patient id and accession of a DICOM file, reading no further than the
    Series Instance UID (pixel data is never touched). ValueError if it is not DICOM.

    Little-endian files (nearly all) are scanned by ``scan_header`` without building a
    pydicom data set: this runs once per received instance. pydicom reads the rest."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(_SCAN_BYTES)
            fast = scan_header(head)
            if fast is not None:
                return fast
            fh.seek(0)
            ds = read_partial(fh, stop_when=_past_series_uid,  # type: ignore[arg-type]
                              specific_tags=_TAG_LIST)
    except Exception as exc:  # noqa: BLE001 (pydicom raises many kinds on garbage)
        raise ValueError(f"not a DICOM file: {exc}") from None
    out: dict[str, str | None] = {}
    for tag, key in _TAGS.items():
        elem = ds.get(tag)
        value = None if elem is None or elem.value is None else str(elem.value).strip("\0 ")
        out[key] = value or None
    return out


_SCAN_BYTES = 1 << 16
_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}
_IMPLICIT_TS = "1.2.840.10008.1.2"
_NOT_SCANNED_TS = {"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}  # big endian, deflated
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_TAG = struct.Struct("<HH")


def scan_header(buf: bytes) -> dict[str, str | None] | None:
    """``read_header`` for a little-endian DICOM file's first bytes; None when the file is
    of another kind or the wanted elements are not within ``buf`` (then pydicom decides)."""
    meta = filemeta.parse(buf)
    if meta is None:
        return None
    ts = meta.transfer_syntax
    if not ts or ts in _NOT_SCANNED_TS:
        return None
    try:
        found: dict[int, bytes] = {}
        _walk(buf, meta.dataset_offset, ts == _IMPLICIT_TS, found, _TAGS.keys(),
              stop=0x0020000E)
    except (IndexError, struct.error, _Truncated):
        return None
    if not all(t in found for t in (0x0020000D, 0x0020000E, 0x00080018)):
        return None  # pydicom has the last word on what is missing
    out: dict[str, str | None] = {}
    for tag, key in _TAGS.items():
        raw = found.get(tag)
        value = raw.decode("utf-8", "replace").strip("\0 ") if raw is not None else None
        out[key] = value or None
    return out


class _Truncated(Exception):
    pass


def _walk(buf: bytes, pos: int, implicit: bool, found: dict[int, bytes], wanted: Any,
          stop: int | None) -> int:
    """Step over data elements from ``pos``; collect ``wanted`` top-level values. Returns
    the position after an item delimiter (nested) or at the first tag past ``stop``."""
    while True:
        if pos + 8 > len(buf):
            raise _Truncated
        group, elem = _TAG.unpack_from(buf, pos)
        tag = group << 16 | elem
        if tag == 0xFFFEE00D:  # item delimitation: end of a nested item
            return pos + 8
        if stop is not None and tag > stop:
            return pos
        if implicit:
            length, start = _U32.unpack_from(buf, pos + 4)[0], pos + 8
            nested_implicit = True
        else:
            vr = buf[pos + 4:pos + 6]
            if vr in _LONG_VRS:
                length, start = _U32.unpack_from(buf, pos + 8)[0], pos + 12
            else:
                length, start = _U16.unpack_from(buf, pos + 6)[0], pos + 8
            nested_implicit = vr == b"UN"
        if length == _UNDEFINED:  # a sequence: walk its items
            pos = _skip_items(buf, start, implicit or nested_implicit)
            continue
        if tag in wanted:
            if start + length > len(buf):
                raise _Truncated
            found[tag] = buf[start:start + length]
        pos = start + length


def _skip_items(buf: bytes, pos: int, implicit: bool) -> int:
    while True:
        if pos + 8 > len(buf):
            raise _Truncated
        group, elem = _TAG.unpack_from(buf, pos)
        length = _U32.unpack_from(buf, pos + 4)[0]
        tag = group << 16 | elem
        if tag == 0xFFFEE0DD:  # sequence delimitation
            return pos + 8
        if tag != 0xFFFEE000:
            raise _Truncated  # not what a sequence holds: let pydicom judge
        if length == _UNDEFINED:
            pos = _walk(buf, pos + 8, implicit, {}, (), stop=None)
        else:
            pos += 8 + length




def read_attributes(path: Path | str, keywords: list[str]) -> dict[str, str]:
    """The values of the attributes ``keywords`` that a file has, as text: several
    values joined by a backslash (as DICOM writes them), an attribute present but empty
    as ``""``; an attribute the file lacks is not in the result. Pixel data is never
    read. ValueError if the file is not DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(keywords))
    except (InvalidDicomError, OSError) as exc:
        raise ValueError(f"{path}: not a readable DICOM file: {exc}") from None
    out: dict[str, str] = {}
    for keyword in keywords:
        if keyword not in ds:
            continue
        value = ds[keyword].value
        if value is None:
            out[keyword] = ""
        elif isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            out[keyword] = "\\".join(str(v) for v in value)
        else:
            out[keyword] = str(value)
    return out
