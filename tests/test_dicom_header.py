"""The receiver's header scan (dts.dicom.header) against pydicom."""

from __future__ import annotations

from pathlib import Path

from pydicom.uid import generate_uid

from dts.dicom import header
from tests.helpers import make_instance


def test_header_scan_agrees_with_pydicom_on_its_test_files(tmp_path: Path) -> None:
    import pydicom.data
    from pydicom.filereader import read_partial

    scanned = 0
    # the files shipped with pydicom (get_testdata_files would try to download more)
    for name in sorted((Path(pydicom.data.__file__).parent / "test_files").rglob("*.dcm")):
        head = Path(name).read_bytes()[:65536]
        fast = header.scan_header(head)
        if fast is None:
            continue  # not little endian with file meta: pydicom reads those
        with open(name, "rb") as fh:
            ds = read_partial(fh, stop_when=header._past_series_uid)  # type: ignore[arg-type]
        for tag, key in header._TAGS.items():
            elem = ds.get(tag)
            value = str(elem.value).strip("\0 ") if elem is not None and elem.value else None
            assert fast[key] == (value or None), (name, key)
        scanned += 1
    assert scanned >= 20
    # truncated input never yields a half answer
    path = make_instance(tmp_path / "x.dcm", study_uid=generate_uid(), series_uid=generate_uid())
    raw = path.read_bytes()
    assert header.scan_header(raw) is not None
    assert header.scan_header(raw[:300]) is None


def test_read_header_of_a_file_whose_meta_the_scan_does_not_take(tmp_path: Path) -> None:
    """A group length that covers only part of the meta: the scan steps aside and
    pydicom reads the same identity."""
    study, series = generate_uid(), generate_uid()
    path = make_instance(tmp_path / "x.dcm", study_uid=study, series_uid=series)
    raw = bytearray(path.read_bytes())
    assert header.scan_header(bytes(raw)) is not None
    raw[140:144] = (int.from_bytes(raw[140:144], "little") - 20).to_bytes(4, "little")
    odd = tmp_path / "odd.dcm"
    odd.write_bytes(raw)
    assert header.scan_header(bytes(raw)) is None
    got = header.read_header(odd)
    assert (got["study_uid"], got["series_uid"]) == (study, series)
