"""Normalize's lean read (issue 22, :mod:`part10`): for every corpus file it reads, the
dataset is the one ``pydicom.dcmread`` gives (each element as pydicom holds it, undecoded
or read, the file meta, the encodings), and normalize's outcome is the same byte for byte
with the lean read or with pydicom's; what it cannot follow exactly is left to pydicom."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

from include.pacs_migration import normalize as normalize_module
from include.pacs_migration.normalize import _dataset_offset, _walk, normalize
from include.pacs_migration.part10 import read_explicit_le
from include.pacs_migration.rules import load_ruleset
from tests.corpus.corpus import Case, mutants, pydicom_files

AT = dt.datetime(2026, 12, 8, tzinfo=dt.UTC)  # the rewrite's modification time, fixed to compare
RULESET = load_ruleset(Path(__file__).resolve().parents[2] / "include/config/rules/site-default.yaml")


def _lean(raw: bytes) -> pydicom.FileDataset | None:
    offset, ts = _dataset_offset(raw)
    return read_explicit_le(raw, offset, ts, lambda at, un: _walk(raw, at, len(raw), un, True, True, 1))


def _cases() -> list[Case]:
    out = []
    for case in pydicom_files() + mutants():
        try:
            _dataset_offset(case.data)
        except Exception:  # a cut file meta: normalize quarantines it before reading
            continue
        out.append(case)
    return out


CASES = _cases()


def _differences(a: Dataset, b: Dataset, path: str = "") -> list[str]:
    """Where two datasets differ as pydicom holds them (raw elements compared raw)."""
    if list(a.keys()) != list(b.keys()):
        return [f"{path or 'top'}: tags differ"]
    out = []
    for tag in a.keys():
        x, y = a.get_item(tag), b.get_item(tag)
        if type(x) is not type(y):
            out.append(f"{path}{tag}: {type(x).__name__} vs {type(y).__name__}")
        elif isinstance(x, RawDataElement):
            if tuple(x) != tuple(y):
                out.append(f"{path}{tag}: raw element differs")
        elif (x.VR, x.is_undefined_length, x.file_tell) != (y.VR, y.is_undefined_length, y.file_tell):
            out.append(f"{path}{tag}: element differs")
        elif x.VR == "SQ":
            if len(x.value) != len(y.value):
                out.append(f"{path}{tag}: item count differs")
            for i, (p, q) in enumerate(zip(x.value, y.value, strict=False)):
                out.extend(_differences(p, q, f"{path}{tag}[{i}]/"))
        elif x.value != y.value:
            out.append(f"{path}{tag}: value differs")
    return out


def test_the_lean_read_takes_most_explicit_little_endian_files():
    taken = [c.name for c in CASES if _lean(c.data) is not None]
    assert len(taken) >= 150, len(taken)
    assert "pydicom:CT_small.dcm" in taken and "pydicom:JPEG2000.dcm" in taken  # sequences, encapsulated pixels


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_read_as_pydicom_reads_it(case):
    ours = _lean(case.data)
    if ours is None:
        return  # left to pydicom
    theirs = pydicom.dcmread(io.BytesIO(case.data), force=True)
    assert _differences(ours, theirs) == []
    assert _differences(ours.file_meta, theirs.file_meta) == []
    for attribute in ("preamble", "original_encoding", "_character_set", "_parent_encoding", "fileobj_type"):
        assert getattr(ours, attribute) == getattr(theirs, attribute), attribute


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_normalize_is_the_same_with_pydicoms_read(case, monkeypatch):
    ours = normalize(case.data, None, RULESET, "ORTHANC", AT)
    monkeypatch.setattr(normalize_module, "read_explicit_le", lambda *args: None)
    theirs = normalize(case.data, None, RULESET, "ORTHANC", AT)
    assert dataclasses.asdict(ours) == dataclasses.asdict(theirs)


def _ct() -> bytes:
    return Path(get_testdata_file("CT_small.dcm")).read_bytes()


def _with_sequence(undefined_length: bool) -> bytes:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "T-D1100", "SRT", "Head"
    ds.AnatomicRegionSequence = [item]
    ds["AnatomicRegionSequence"].is_undefined_length = undefined_length
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_what_it_cannot_follow_is_left_to_pydicom():
    ct = _ct()
    offset, ts = _dataset_offset(ct)
    assert _lean(ct) is not None
    assert _lean(Path(get_testdata_file("MR_small_implicit.dcm")).read_bytes()) is None  # another encoding
    assert _lean(Path(get_testdata_file("MR_small_bigendian.dcm")).read_bytes()) is None
    assert _lean(ct + b"\x00" * 4) is None  # trailing bytes
    assert _lean(ct[:-10]) is None  # the last element cut
    garbled = bytearray(ct)
    garbled[offset + 4 : offset + 6] = b"ZQ"  # a VR pydicom does not know
    assert _lean(bytes(garbled)) is None
    assert read_explicit_le(ct, offset + 2, ts, lambda at, un: 0) is None  # not where the meta ends


def test_an_undefined_length_sequence_is_walked_and_read_by_pydicom(monkeypatch):
    for undefined in (True, False):
        data = _with_sequence(undefined)
        ours = _lean(data)
        assert ours is not None
        assert _differences(ours, pydicom.dcmread(io.BytesIO(data), force=True)) == []
        assert ours["AnatomicRegionSequence"].is_undefined_length is undefined
        assert ours.AnatomicRegionSequence[0].CodeMeaning == "Head"
    data = _with_sequence(True)
    at = data.index(struct.pack("<HH", 0xFFFE, 0xE0DD))  # the sequence's delimiter
    cut = data[:at] + data[at + 8 :]  # gone: the walk finds no delimiter
    assert _lean(cut) is None
    judged = normalize(cut, None, RULESET, "ORTHANC", AT)
    with monkeypatch.context() as m:  # the same verdict as pydicom's read and the structure check give it
        m.setattr(normalize_module, "read_explicit_le", lambda *args: None)
        assert dataclasses.asdict(judged) == dataclasses.asdict(normalize(cut, None, RULESET, "ORTHANC", AT))
    assert judged.reason is not None  # a sequence without its delimiter is not passed as conformant
    # A walk that ends elsewhere than pydicom's read: not ours to judge.
    offset, ts = _dataset_offset(data)
    assert read_explicit_le(data, offset, ts, lambda at, un: at) is None


def test_a_truncated_file_is_still_quarantined_truncated():
    for name in ("MR_truncated.dcm", "rtplan_truncated.dcm"):
        data = Path(get_testdata_file(name)).read_bytes()
        assert normalize(data, None, RULESET, "ORTHANC").reason == "TRUNCATED"
