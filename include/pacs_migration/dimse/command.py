"""DIMSE command sets (PS3.7 9.3, 10.3; group 0000, implicit VR little endian)
as our Upper Layer sends and reads them, and the Part 10 header of a received
instance. Bytes in, bytes out: no pydicom object per message."""

from __future__ import annotations

import struct
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from ..uids import IMPLEMENTATION_CLASS_UID
from .association import DicomNetworkError
from .upper_layer import IMPLEMENTATION_VERSION_NAME

# Command Field values (PS3.7 E.1)
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_GET_RQ, C_GET_RSP = 0x0010, 0x8010
C_FIND_RQ, C_FIND_RSP = 0x0020, 0x8020
# Command elements (element number in group 0000)
AFFECTED_SOP_CLASS_UID, COMMAND_FIELD, MESSAGE_ID, MESSAGE_ID_RESPONDED_TO = 0x0002, 0x0100, 0x0110, 0x0120
PRIORITY, DATA_SET_TYPE, STATUS, AFFECTED_SOP_INSTANCE_UID = 0x0700, 0x0800, 0x0900, 0x1000
REMAINING, COMPLETED, FAILED, WARNING = 0x1020, 0x1021, 0x1022, 0x1023
NO_DATA_SET, DATA_SET = 0x0101, 0x0001
PENDING = (0xFF00, 0xFF01)
_LOW = 0x0002  # priority, as pynetdicom sends it
_ELEMENT = struct.Struct("<HHL")


def _element(element: int, value: bytes, pad: bytes = b"\0") -> bytes:
    if len(value) % 2:
        value += pad
    return _ELEMENT.pack(0x0000, element, len(value)) + value


def command_set(elements: dict[int, bytes | int]) -> bytes:
    """A command set of ``elements`` (an int is US, bytes are a UID), ascending, with its group length."""
    body = b"".join(
        _element(el, struct.pack("<H", v) if isinstance(v, int) else v) for el, v in sorted(elements.items())
    )
    return _element(0x0000, struct.pack("<L", len(body))) + body


def request(command_field: int, sop_class_uid: str, message_id: int) -> bytes:
    """A C-FIND-RQ or C-GET-RQ command set (an identifier follows), priority low as pynetdicom's."""
    return command_set(
        {
            AFFECTED_SOP_CLASS_UID: sop_class_uid.encode("ascii"),
            COMMAND_FIELD: command_field,
            MESSAGE_ID: message_id,
            PRIORITY: _LOW,
            DATA_SET_TYPE: DATA_SET,
        }
    )


def c_store_rsp(message_id: int, sop_class_uid: str, sop_instance_uid: str, status: int) -> bytes:
    return command_set(
        {
            AFFECTED_SOP_CLASS_UID: sop_class_uid.encode("ascii"),
            COMMAND_FIELD: C_STORE_RSP,
            MESSAGE_ID_RESPONDED_TO: message_id,
            DATA_SET_TYPE: NO_DATA_SET,
            STATUS: status,
            AFFECTED_SOP_INSTANCE_UID: sop_instance_uid.encode("ascii"),
        }
    )


def command_fields(command: bytes) -> dict[int, bytes]:
    """The command set's elements (group 0000) by element number."""
    return split_command(command)[0]


def split_command(command: bytes) -> tuple[dict[int, bytes], bytes]:
    """The command set's elements, and what follows group 0000 in the same
    message part: DCMTK (Orthanc) appends a C-GET failure's identifier there
    (the Failed SOP Instance UID List) instead of sending a data set."""
    out: dict[int, bytes] = {}
    at = 0
    while at + 8 <= len(command):
        group, element, length = _ELEMENT.unpack_from(command, at)
        if group != 0x0000:
            return out, command[at:]
        if at + 8 + length > len(command):
            raise DicomNetworkError("the peer sent a malformed command set")
        out[element] = command[at + 8 : at + 8 + length]
        at += 8 + length
    return out, b""


def us(fields: dict[int, bytes], element: int) -> int | None:
    value = fields.get(element)
    return struct.unpack("<H", value[:2])[0] if value and len(value) >= 2 else None


def ui(fields: dict[int, bytes], element: int) -> str:
    return fields.get(element, b"").rstrip(b"\0 ").decode("ascii", "replace")


def has_data_set(fields: dict[int, bytes]) -> bool:
    return us(fields, DATA_SET_TYPE) not in (None, NO_DATA_SET)


def encode(identifier: Dataset, implicit: bool) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    write_dataset(fp, identifier)
    return fp.getvalue()


def decode(data: bytes, implicit: bool) -> Dataset:
    return read_dataset(BytesIO(data), implicit, True)


def _meta(group_element: int, vr: bytes, value: bytes, pad: bytes = b"\0") -> bytes:
    if len(value) % 2:
        value += pad
    group, element = group_element >> 16, group_element & 0xFFFF
    if vr == b"OB":
        return struct.pack("<HH2s2xL", group, element, vr, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def part10_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information (PS3.10 7.1) of a
    received instance, for the data set that follows it as it arrived."""
    body = (
        _meta(0x00020001, b"OB", b"\x00\x01")
        + _meta(0x00020002, b"UI", sop_class_uid.encode("ascii"))
        + _meta(0x00020003, b"UI", sop_instance_uid.encode("ascii"))
        + _meta(0x00020010, b"UI", transfer_syntax.encode("ascii"))
        + _meta(0x00020012, b"UI", IMPLEMENTATION_CLASS_UID.encode("ascii"))
        + _meta(0x00020013, b"SH", IMPLEMENTATION_VERSION_NAME, b" ")
    )
    return bytes(128) + b"DICM" + _meta(0x00020000, b"UL", struct.pack("<L", len(body))) + body
