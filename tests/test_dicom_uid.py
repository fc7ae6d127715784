"""The one UID check (dts.dicom.uid): what may become a path component."""

from __future__ import annotations

import pytest

from dts.dicom.uid import valid_uid


@pytest.mark.parametrize("value", ["1", "1.2.840.10008.5.1.4.1.1.2", "0.0", "1." + "2" * 62,
                                   "1.02.3"])
def test_valid(value: str) -> None:
    assert valid_uid(value)


@pytest.mark.parametrize("value", ["", "1.", ".1", "1..2", "1.2a", "1.2 ", " 1.2", "1/2",
                                   "../1", "1.2\n", "1.2\0", "1." + "2" * 63, None, 12, b"1.2",
                                   "１.２"])
def test_invalid(value: object) -> None:
    assert not valid_uid(value)
    assert not valid_uid(value, conformant=True)


def test_conformant_refuses_leading_zeros() -> None:
    assert valid_uid("1.02.3") and not valid_uid("1.02.3", conformant=True)
    assert valid_uid("1.0.3", conformant=True)
    assert valid_uid("0.3", conformant=True)
    assert not valid_uid("00.3", conformant=True)
