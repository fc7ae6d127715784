"""Owns the bytes of DIMSE command sets that dts encodes and decodes itself.

A command set is group 0000, implicit VR little endian (PS3.7 6.3, 9.3, E.1); the
C-STORE exchange on an established association is done by dts on both sides
(``dts.dicom.scu`` sends, ``dts.dicom.scp`` receives), so these few elements are all it
needs.
"""

from __future__ import annotations

import struct

from . import wire

# Command Field values
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
# Command Data Set Type: no data set follows (any other value: one does)
NO_DATA_SET = 0x0101

# Element numbers (group 0000) of the command sets used here
AFFECTED_SOP_CLASS_UID = 0x0002
COMMAND_FIELD = 0x0100
MESSAGE_ID = 0x0110
MESSAGE_ID_BEING_RESPONDED_TO = 0x0120
COMMAND_DATA_SET_TYPE = 0x0800
STATUS = 0x0900
ERROR_COMMENT = 0x0902
AFFECTED_SOP_INSTANCE_UID = 0x1000


def command_fields(command: bytes) -> dict[int, bytes]:
    """Element number -> value of a command set (group 0000, implicit VR little endian)."""
    fields: dict[int, bytes] = {}
    pos = 0
    while pos + 8 <= len(command):
        _group, elem, length = struct.unpack_from("<HHI", command, pos)
        fields[elem] = command[pos + 8:pos + 8 + length]
        pos += 8 + length
    return fields


def u16(fields: dict[int, bytes], elem: int) -> int | None:
    value = fields.get(elem)
    return struct.unpack("<H", value[:2])[0] if value and len(value) >= 2 else None


def text(fields: dict[int, bytes], elem: int) -> str:
    """A UI/LO value without its padding ('' when absent)."""
    return fields.get(elem, b"").decode("ascii", "replace").rstrip("\0 ")


def element(elem: int, value: bytes) -> bytes:
    """One command set element (group 0000, implicit VR little endian)."""
    return struct.pack("<HHI", 0x0000, elem, len(value)) + value


def uid_bytes(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def _group(body: bytes) -> bytes:
    return element(0x0000, struct.pack("<I", len(body))) + body


def c_store_command(msg_id: int, sop_class: str, sop_uid: str, priority: int = 2) -> bytes:
    """The encoded command set of a C-STORE-RQ with a data set (PS3.7 9.3.1.1)."""
    return _group(b"".join((
        element(0x0002, uid_bytes(sop_class)),               # Affected SOP Class UID
        element(0x0100, struct.pack("<H", C_STORE_RQ)),      # Command Field
        element(0x0110, struct.pack("<H", msg_id)),          # Message ID
        element(0x0700, struct.pack("<H", priority)),        # Priority
        element(0x0800, struct.pack("<H", 0x0001)),          # Command Data Set Type: present
        element(0x1000, uid_bytes(sop_uid)),                 # Affected SOP Instance UID
    )))


def c_store_response(msg_id: int, sop_class: bytes, sop_uid: bytes, status: int) -> bytes:
    """The encoded command set of a C-STORE-RSP (PS3.7 9.3.1.2); the UIDs as they came in
    the request (already padded to an even length)."""
    return _group(b"".join((
        element(0x0002, sop_class),                          # Affected SOP Class UID
        element(0x0100, struct.pack("<H", C_STORE_RSP)),     # Command Field
        element(0x0120, struct.pack("<H", msg_id)),          # Message ID Being Responded To
        element(0x0800, struct.pack("<H", NO_DATA_SET)),     # Command Data Set Type: none
        element(0x0900, struct.pack("<H", status)),          # Status
        element(0x1000, sop_uid),                            # Affected SOP Instance UID
    )))


def p_data_command(context_id: int, command: bytes) -> bytes:
    """One P-DATA-TF PDU carrying a whole command set as its last fragment."""
    return wire.p_data(context_id, wire.PDV_COMMAND | wire.PDV_LAST, command)
