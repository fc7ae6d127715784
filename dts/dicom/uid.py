"""Owns what a valid DICOM UID is for dts: the check before a UID becomes a path component.

docs/architecture.md: digits and dots (``^[0-9]+(\\.[0-9]+)*$``), at most 64 characters;
anything else is refused where it enters. Results a run produced are held to the
standard's full rule as well (PS3.5 9.1: no component with a leading zero), since
they go out to other systems.
"""

from __future__ import annotations

import re

MAX_LENGTH = 64
_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)*")


def valid_uid(value: object, *, conformant: bool = False) -> bool:
    """A UID that may serve as a file name: digits and dots, 1 to 64 characters.
    ``conformant``: also no component with a leading zero (``1.02`` is refused)."""
    if not (isinstance(value, str) and 0 < len(value) <= MAX_LENGTH):
        return False
    # fullmatch: "$" would also accept a trailing newline
    if _PATTERN.fullmatch(value) is None:
        return False
    return not conformant or not any(len(part) > 1 and part[0] == "0"
                                     for part in value.split("."))
