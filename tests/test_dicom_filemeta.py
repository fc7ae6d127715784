"""The file meta reader and writer (dts.dicom.filemeta) against pydicom and pynetdicom."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pydicom.data
import pytest
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom.dsutils import create_file_meta
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from dts.dicom import filemeta
from tests.helpers import make_instance

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"


def _pydicom_meta(path: Path) -> tuple[str | None, str | None, str | None, int]:
    with open(path, "rb") as fp:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
        offset = fp.tell()
    return (str(meta.get("MediaStorageSOPClassUID") or "") or None,
            str(meta.get("MediaStorageSOPInstanceUID") or "") or None,
            str(meta.get("TransferSyntaxUID") or "") or None, offset)


def test_reads_what_pydicom_reads_on_its_test_files() -> None:
    read = 0
    # the files shipped with pydicom (get_testdata_files would try to download more)
    for path in sorted(p for p in TEST_FILES.rglob("*") if p.is_file()):
        with open(path, "rb") as fh:
            meta = filemeta.read(fh)
        if meta is None:
            continue  # not laid out as the standard says: pydicom reads those
        assert (meta.sop_class, meta.sop_instance, meta.transfer_syntax,
                meta.dataset_offset) == _pydicom_meta(path), path
        read += 1
    assert read >= 100


def test_encode_is_what_pynetdicom_writes() -> None:
    for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, "1.2.840.10008.1.2.4.50"):
        sop = generate_uid()
        ref = io.BytesIO()
        ref.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(ref, create_file_meta(sop_class_uid=CTImageStorage,  # type: ignore
                                                   sop_instance_uid=sop, transfer_syntax=ts))
        assert filemeta.encode(str(CTImageStorage), sop, ts) == ref.getvalue()
        meta = filemeta.parse(ref.getvalue())
        assert meta is not None
        assert (meta.sop_class, meta.sop_instance, meta.transfer_syntax) == (
            CTImageStorage, sop, ts)
        assert meta.dataset_offset == len(ref.getvalue())


def _meta_bytes(tmp_path: Path) -> bytes:
    path = make_instance(tmp_path / "x.dcm", study_uid=generate_uid(), series_uid=generate_uid())
    return path.read_bytes()


@pytest.mark.parametrize("damage", ["no-magic", "truncated", "short-group-length",
                                    "long-group-length", "other-group", "undefined-length",
                                    "non-ascii-uid"])
def test_a_meta_that_is_not_as_the_standard_says_is_left_to_pydicom(
        tmp_path: Path, damage: str) -> None:
    raw = bytearray(_meta_bytes(tmp_path))
    good = filemeta.parse(raw)
    assert good is not None
    end = good.dataset_offset
    length = struct.unpack_from("<I", raw, 140)[0]
    first = 144  # (0002,0001) OB: tag, VR, reserved, 4-byte length
    if damage == "no-magic":
        raw[128:132] = b"DICX"
    elif damage == "truncated":
        raw = raw[:end - 3]
    elif damage == "short-group-length":
        # leaves the last element, (0002,0013) SH, outside the group
        struct.pack_into("<I", raw, 140, length - 8 - len(good.elements[0x0013]))
    elif damage == "long-group-length":
        struct.pack_into("<I", raw, 140, length + 8)
    elif damage == "other-group":
        struct.pack_into("<H", raw, first, 0x0008)
    elif damage == "undefined-length":
        struct.pack_into("<I", raw, first + 8, 0xFFFFFFFF)
    elif damage == "non-ascii-uid":
        pos = raw.index(good.elements[0x0003])
        raw[pos] = 0xE9
    assert filemeta.parse(raw) is None
    assert filemeta.read(io.BytesIO(raw)) is None
