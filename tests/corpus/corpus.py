"""The normalization corpus: pydicom's bundled real files plus generated mutants,
each with the outcome it must reach."""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file, get_testdata_files


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    expected: str | None  # reason code, None = must migrate, "*" = any closed-set outcome


# pydicom files whose outcome is known and must not drift.
KNOWN: dict[str, str | None] = {
    "CT_small.dcm": None,
    "MR_small.dcm": None,
    "MR_small_bigendian.dcm": None,
    "MR_small_implicit.dcm": None,
    "MR_small_RLE.dcm": None,
    "MR_small_jp2klossless.dcm": None,
    "JPEG2000.dcm": None,
    "image_dfl.dcm": None,
    "ExplVR_BigEnd.dcm": None,
    "ExplVR_LitEndNoMeta.dcm": None,
    "rtplan.dcm": None,
    "MR_truncated.dcm": "TRUNCATED",
    "rtplan_truncated.dcm": "TRUNCATED",
    "README.txt": "NOT_DICOM",
    "test1.json": "NOT_DICOM",
    "DICOMDIR": "MISSING_UID:SOPClassUID",
}


def pydicom_files() -> list[Case]:
    cases = []
    for path in sorted(get_testdata_files()):
        if os.path.isdir(path):
            continue
        rel = path.split("test_files" + os.sep, 1)[-1]
        with open(path, "rb") as fh:
            data = fh.read()
        base = os.path.basename(path)
        cases.append(Case(f"pydicom:{rel}", data, KNOWN.get(base, "*")))
    return cases


def _save(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def mutants() -> list[Case]:
    out: list[Case] = []
    for base in ("CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "rtplan.dcm"):
        raw = Path(get_testdata_file(base)).read_bytes()
        ds0 = pydicom.dcmread(io.BytesIO(raw))
        # Truncation at several offsets: inside the meta, the header, the pixel data, the last bytes.
        for frac in (0.02, 0.25, 0.5, 0.9):
            cut = raw[: int(len(raw) * frac)]
            out.append(Case(f"{base}:truncated@{frac}", cut, "TRUNCATED|PIXEL_LENGTH_MISMATCH|NOT_DICOM"))
        out.append(Case(f"{base}:truncated@-1", raw[:-1], "TRUNCATED|PIXEL_LENGTH_MISMATCH"))
        for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            ds = pydicom.dcmread(io.BytesIO(raw))
            delattr(ds, kw)
            out.append(Case(f"{base}:no-{kw}", _save(ds), f"MISSING_UID:{kw}"))
            for bad_name, bad in (("dotdot", "../1.2"), ("70-digits", "1." + "2" * 68), ("leading-zero", "1.02.3")):
                ds = pydicom.dcmread(io.BytesIO(raw))
                setattr(ds, kw, bad)
                if kw in ("SOPClassUID", "SOPInstanceUID"):
                    ds.file_meta.MediaStorageSOPInstanceUID = ds0.SOPInstanceUID
                out.append(Case(f"{base}:{kw}={bad_name}", _save(ds), f"BAD_UID_SYNTAX:{kw}"))
        # Over-long text value: truncated (old value kept) and migrated.
        ds = pydicom.dcmread(io.BytesIO(raw))
        ds.InstitutionName = "X" * 100
        out.append(Case(f"{base}:over-long-LO", _save(ds), None))
        # Non-conformant date and time formats: repaired.
        ds = pydicom.dcmread(io.BytesIO(raw))
        ds.StudyDate, ds.StudyTime = "2019/03/01", "12:30:45"
        out.append(Case(f"{base}:date-format", _save(ds), None))
        # Wrong VR: a known attribute sent as UN (re-typed from the dictionary).
        ds = pydicom.dcmread(io.BytesIO(raw))
        if "Manufacturer" in ds and not ds.original_encoding[0]:
            value = ds["Manufacturer"].value
            ds["Manufacturer"].VR = "UN"
            ds["Manufacturer"].value = (str(value) + (" " if len(str(value)) % 2 else "")).encode()
            out.append(Case(f"{base}:UN-for-LO", _save(ds), None))
        # Not DICOM at all.
    out.append(Case("garbage", os.urandom(4096), "NOT_DICOM|TRUNCATED"))
    out.append(Case("deflate-bomb", deflate_bomb(), "DECOMPRESSION_LIMIT"))
    out.append(Case("nested-3000", deeply_nested(3000), "NESTING_LIMIT"))
    out.append(Case("nested-12", deeply_nested(12), None))  # deep as a real SR tree, within the bound: migrates
    out.append(Case("empty", b"", "NOT_DICOM|TRUNCATED"))
    return out


def _element(tag: tuple[int, int], vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR"):
        return struct.pack("<HH", *tag) + vr + b"\x00\x00" + struct.pack("<L", len(value)) + value
    return struct.pack("<HH", *tag) + vr + struct.pack("<H", len(value)) + value


def _uid(value: str) -> bytes:
    data = value.encode()
    return data + (b"\x00" if len(data) % 2 else b"")


def _part10(body: bytes, transfer_syntax: str, sop_uid: str) -> bytes:
    sop_class = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    meta = (
        _element((0x0002, 0x0001), b"OB", b"\x00\x01")
        + _element((0x0002, 0x0002), b"UI", _uid(sop_class))
        + _element((0x0002, 0x0003), b"UI", _uid(sop_uid))
        + _element((0x0002, 0x0010), b"UI", _uid(transfer_syntax))
    )
    group_length = _element((0x0002, 0x0000), b"UL", struct.pack("<L", len(meta)))
    return b"\x00" * 128 + b"DICM" + group_length + meta + body


def _identity(sop_uid: str) -> bytes:
    return (
        _element((0x0008, 0x0016), b"UI", _uid("1.2.840.10008.5.1.4.1.1.7"))
        + _element((0x0008, 0x0018), b"UI", _uid(sop_uid))
        + _element((0x0008, 0x0060), b"CS", b"OT")
        + _element((0x0020, 0x000D), b"UI", _uid("1.2.3.4.5"))
        + _element((0x0020, 0x000E), b"UI", _uid("1.2.3.4.5.6"))
    )


def deflate_bomb(inflated: int = 64 << 20) -> bytes:
    """A deflated instance of ~64 KiB that inflates to 64 MiB (a zero-filled OB)."""
    body = _identity("1.2.3.4.5.6.7") + struct.pack("<HH", 0x0009, 0x0010) + b"LO" + struct.pack("<H", 4) + b"BOMB"
    body += struct.pack("<HH", 0x0009, 0x1000) + b"OB\x00\x00" + struct.pack("<L", inflated)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = packer.compress(body) + packer.compress(bytes(inflated)) + packer.flush()
    return _part10(deflated, "1.2.840.10008.1.2.1.99", "1.2.3.4.5.6.7")


def deeply_nested(levels: int) -> bytes:
    """Sequences nested ``levels`` deep (undefined lengths), explicit VR little endian."""
    open_ = struct.pack("<HH", 0x0040, 0xA730) + b"SQ\x00\x00" + struct.pack("<L", 0xFFFFFFFF)
    item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    close = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    body = _identity("1.2.3.4.5.6.8") + (open_ + item) * levels + close * levels
    return _part10(body, "1.2.840.10008.1.2.1", "1.2.3.4.5.6.8")
