"""Owns the DICOM file meta information (``DICM`` and group 0002) as bytes: read and written.

Read without pydicom, because it is read once per file on hot paths (every received
instance, every file ``dts send --to`` looks at, every object the sender streams): the
identity of the object (SOP class, SOP instance, transfer syntax) and where its data set
starts. Only a meta laid out as PS3.10 7.1 says (preamble, ``DICM``, a group length that
covers exactly the group's explicit-VR elements) is read here; for anything else
``read``/``parse`` answer None and the caller asks pydicom.

Written as pynetdicom has pydicom write it before a received data set
(``pynetdicom.dsutils.create_file_meta``; tests compare the two byte for byte), so that
a file received on the fast path is the file pynetdicom's own path would have written.
"""

from __future__ import annotations

import struct
from typing import BinaryIO, NamedTuple

import pynetdicom

PREAMBLE = 128
HEAD = PREAMBLE + 16  # preamble, "DICM", the group length element (0002,0000) UL
_MAGIC_AND_GROUP_LENGTH = b"DICM\x02\x00\x00\x00UL"
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_ELEMENT = struct.Struct("<HH2sH")  # tag, VR, and the length of a VR with a short one

# Element numbers (group 0002)
MEDIA_STORAGE_SOP_CLASS_UID = 0x0002
MEDIA_STORAGE_SOP_INSTANCE_UID = 0x0003
TRANSFER_SYNTAX_UID = 0x0010
IMPLEMENTATION_CLASS_UID = 0x0012
IMPLEMENTATION_VERSION_NAME = 0x0013


class FileMeta(NamedTuple):
    """The file meta of one file: its elements' values (element number -> value as
    stored, padding included) and the offset of the data set."""

    elements: dict[int, bytes]
    dataset_offset: int

    def text(self, elem: int) -> str | None:
        """A value without its padding; None when absent or empty."""
        value = self.elements.get(elem)
        if value is None:
            return None
        return value.rstrip(b"\0 ").decode("ascii", "replace") or None

    @property
    def sop_class(self) -> str | None:
        return self.text(MEDIA_STORAGE_SOP_CLASS_UID)

    @property
    def sop_instance(self) -> str | None:
        return self.text(MEDIA_STORAGE_SOP_INSTANCE_UID)

    @property
    def transfer_syntax(self) -> str | None:
        return self.text(TRANSFER_SYNTAX_UID)


def parse(buf: bytes | bytearray) -> FileMeta | None:
    """The file meta of a file whose first bytes are ``buf`` (at least through the
    meta; 2 bytes more, when the file has them, let a group length that covers only
    part of the meta be noticed); None when it is not laid out as the standard says."""
    if len(buf) < HEAD or buf[PREAMBLE:PREAMBLE + 10] != _MAGIC_AND_GROUP_LENGTH:
        return None
    end = HEAD + _U32.unpack_from(buf, HEAD - 4)[0]
    if len(buf) < end:
        return None
    if len(buf) >= end + 2 and _U16.unpack_from(buf, end)[0] == 0x0002:
        return None  # the group length does not cover the whole meta
    buf = bytes(buf)
    elements: dict[int, bytes] = {}
    pos = HEAD
    while pos < end:
        if pos + 8 > end:
            return None
        group, elem, vr, length = _ELEMENT.unpack_from(buf, pos)
        if group != 0x0002:
            return None
        if vr in _LONG_VRS:
            if pos + 12 > end:
                return None
            length = _U32.unpack_from(buf, pos + 8)[0]
            pos += 12
        else:
            pos += 8
        if length == _UNDEFINED or pos + length > end:
            return None
        value = buf[pos:pos + length]
        if vr == b"UI" and not value.isascii():
            return None
        elements[elem] = value
        pos += length
    return FileMeta(elements, end)


def read(fh: BinaryIO) -> FileMeta | None:
    """``parse`` of an open file, read from its start (the position is left after the
    bytes read)."""
    head = fh.read(HEAD)
    if len(head) < HEAD or head[PREAMBLE:PREAMBLE + 10] != _MAGIC_AND_GROUP_LENGTH:
        return None
    return parse(head + fh.read(_U32.unpack_from(head, HEAD - 4)[0] + 2))


# -- writing -------------------------------------------------------------------------------

def _explicit(elem: int, vr: bytes, value: bytes) -> bytes:
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", 0x0002, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, elem, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def encode(sop_class: str, sop_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group, as pydicom writes them for
    pynetdicom's ``create_file_meta``."""
    body = b"".join((
        _explicit(0x0001, b"OB", b"\x00\x01"),
        _explicit(MEDIA_STORAGE_SOP_CLASS_UID, b"UI", _padded(sop_class, b"\0")),
        _explicit(MEDIA_STORAGE_SOP_INSTANCE_UID, b"UI", _padded(sop_uid, b"\0")),
        _explicit(TRANSFER_SYNTAX_UID, b"UI", _padded(transfer_syntax, b"\0")),
        _explicit(IMPLEMENTATION_CLASS_UID, b"UI",
                  _padded(str(pynetdicom.PYNETDICOM_IMPLEMENTATION_UID), b"\0")),
        _explicit(IMPLEMENTATION_VERSION_NAME, b"SH",
                  _padded(pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
    ))
    return b"\0" * PREAMBLE + b"DICM" + struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4,
                                                    len(body)) + body
