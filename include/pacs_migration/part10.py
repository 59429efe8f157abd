"""Reading a Part 10 instance whose dataset is explicit VR little endian (what nearly
every instance arrives as) the way pydicom's ``dcmread`` reads it, in a leaner loop.

pydicom's reader pulls each element through a generator and a file object; here the
top-level elements are unpacked straight from the bytes into the same undecoded
``RawDataElement``s (pydicom decodes them when they are read, as after ``dcmread``).
Undefined-length elements (sequences, encapsulated pixel data) are read by pydicom's
own functions. Anything this loop does not follow exactly as pydicom would (another
encoding, a command set, an item at the top level, a VR pydicom does not know, a
length past the end, trailing bytes) returns None: the caller reads with pydicom.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from typing import Any

from pydicom import config
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import _dictionary_vr_fast
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element, empty_value_for_VR
from pydicom.dataset import Dataset, FileDataset
from pydicom.filereader import _read_file_meta_info, read_preamble, read_sequence
from pydicom.fileutil import read_undefined_length_value
from pydicom.tag import BaseTag, ItemTag, SequenceDelimiterTag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    PrivateTransferSyntaxes,
)
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR
from pydicom.values import convert_string

_HEADER = struct.Struct("<HH2sH")
_LENGTH = struct.Struct("<L")
_TAG = struct.Struct("<HH")
# The VRs pydicom's reader knows, as plain strings (an enum member hashes in Python), and whether a
# 4-byte length follows.
_VRS = {v.value.encode(): (v.value, v in EXPLICIT_VR_LENGTH_32) for v in VR}
_UNDEFINED = 0xFFFFFFFF
_NOT_EXPLICIT_LE = frozenset({ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian})
_EMPTY: dict[str, Any] = {name: empty_value_for_VR(name, raw=True) for name, _ in _VRS.values()}  # bytes or None


# Walks the nested structure of an undefined-length value from where it starts (whether
# it is a UN, whose items are implicit VR); returns where it ends or raises.
WalkNested = Callable[[int, bool], int]


def read_explicit_le(raw: bytes, offset: int, transfer_syntax: str | None, walk: WalkNested) -> FileDataset | None:
    """``pydicom.dcmread(io.BytesIO(raw), force=True)`` for a Part 10 instance whose file
    meta ends at ``offset`` and names ``transfer_syntax``, when the dataset is explicit VR
    little endian and this reader follows all of it; else None. Every top-level length is
    checked against the end, and ``walk`` checks each undefined-length value (it must end
    where pydicom's read of it ends): a dataset returned has the structure normalize's
    check asks for."""
    if (
        transfer_syntax is None
        or transfer_syntax in _NOT_EXPLICIT_LE
        or transfer_syntax in PrivateTransferSyntaxes
        or offset + 8 > len(raw)
        or not (0x40 < raw[offset + 4] < 0x5B and 0x40 < raw[offset + 5] < 0x5B)  # pydicom would switch to implicit
        or raw[offset : offset + 2] == b"\x00\x00"  # a command set: pydicom reads it apart
    ):
        return None
    fp = io.BytesIO(raw)
    try:
        preamble = read_preamble(fp, True)
        file_meta = _read_file_meta_info(fp)
        if fp.tell() != offset or file_meta.get("TransferSyntaxUID") != transfer_syntax:
            return None
        elements = _top_level(raw, offset, fp, walk)
    except Exception:  # noqa: BLE001 - whatever this loop cannot follow, pydicom reads (and judges)
        return None
    if elements is None:
        return None
    dataset = Dataset(elements, parent_encoding=default_encoding)
    encoding: Any = default_encoding
    if 0x00080005 in elements:
        encoding = convert_encodings(convert_raw_data_element(elements[BaseTag(0x00080005)]).value)  # type: ignore[arg-type]
    dataset.set_original_encoding(False, True, encoding)
    ds = FileDataset(fp, dataset, preamble, file_meta, False, True)
    ds.set_original_encoding(False, True, dataset._character_set)
    return ds


def _top_level(
    raw: bytes, pos: int, fp: io.BytesIO, walk: WalkNested
) -> dict[BaseTag, RawDataElement | DataElement] | None:
    """The top-level elements from ``pos`` to the end, as pydicom's generator yields them."""
    end, out = len(raw), dict[BaseTag, RawDataElement | DataElement]()
    encoding: Any = default_encoding
    while pos + 8 <= end:
        group, element, vr_bytes, length = _HEADER.unpack_from(raw, pos)
        known = _VRS.get(vr_bytes)
        if group == 0x0000 or group == 0xFFFE or known is None:
            return None  # a command element, an item or delimiter, or a VR pydicom would guess at
        vr, long_length = known
        tag = group << 16 | element  # compared as an int: BaseTag's comparisons run in Python
        value_at = pos + 8
        if long_length:
            length, value_at = _LENGTH.unpack_from(raw, value_at)[0], value_at + 4
        if length == _UNDEFINED:
            walked_to = walk(value_at, vr_bytes == b"UN")
            fp.seek(value_at)
            out[BaseTag(tag)] = _undefined_length(fp, BaseTag(tag), vr, value_at, encoding)
            pos = fp.tell()
            if pos != walked_to:
                return None
            continue
        pos = value_at + length
        if pos > end:
            return None
        value = raw[value_at:pos] if length else _EMPTY[vr]
        if tag == 0x00080005:  # later sequences decode with it, as in pydicom's reader
            encoding = convert_encodings(convert_string(value or b"", True))
        key = BaseTag(tag)
        out[key] = RawDataElement(key, vr, length, value, value_at, False, True)
    return out if pos == end else None


def _undefined_length(
    fp: io.BytesIO, tag: BaseTag, vr: str, value_at: int, encoding: Any
) -> RawDataElement | DataElement:
    """An undefined-length element read by pydicom's functions, its VR settled as its reader settles it."""
    if vr == VR.UN and config.settings.infer_sq_for_un_vr:
        vr = VR.SQ
    if vr == VR.UN and config.replace_un_with_known_vr:
        try:
            vr = _dictionary_vr_fast(tag)
        except KeyError:
            if _TAG.unpack(fp.read(4)) == (ItemTag >> 16, ItemTag & 0xFFFF):
                vr = VR.SQ
            fp.seek(value_at)
    if vr == VR.SQ:
        seq = read_sequence(fp, False, True, _UNDEFINED, encoding)
        return DataElement(tag, vr, seq, value_at, is_undefined_length=True)
    value = read_undefined_length_value(fp, True, SequenceDelimiterTag, None)
    return RawDataElement(tag, vr, _UNDEFINED, value, value_at, False, True)
