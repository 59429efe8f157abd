"""The normalization corpus: pydicom's bundled real files plus generated mutants,
each with the outcome it must reach."""

from __future__ import annotations

import io
import os
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
    out.append(Case("empty", b"", "NOT_DICOM|TRUNCATED"))
    return out
