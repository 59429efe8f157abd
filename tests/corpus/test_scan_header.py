"""The re-read's header scan (issue 22): the study-index row it gives is the row pydicom's
parse of the same header gives, for every object the pipeline stores from the corpus (each
file normalized with the site rules, then its header as the re-read keeps it), and the scan
leaves to pydicom whatever it cannot follow."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from include.pacs_migration import study_index
from include.pacs_migration.normalize import normalize
from include.pacs_migration.partition import Partition
from include.pacs_migration.rules import load_ruleset
from tests.corpus.corpus import mutants, pydicom_files

RULESET = load_ruleset(Path(__file__).resolve().parents[2] / "include/config/rules/site-default.yaml")
ROW = {"object_key": "k", "object_sha256": "s", "run_id": "r"}
PARTITION = Partition.parse("2021-03-15/CT")


def _stored() -> list[tuple[str, bytes]]:
    """(name, bytes) of every corpus object normalize lets migrate: what S3 holds."""
    out = []
    for case in pydicom_files() + mutants():
        result = normalize(case.data, None, RULESET, "ORTHANC")
        if result.reason is None and result.data:
            out.append((case.name, result.data))
    return out


STORED = _stored()


def _by_pydicom(data: bytes) -> dict:
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, defer_size=1 << 16)
    return study_index.header_row(ds, len(data), ROW, PARTITION)


def test_the_scan_takes_most_stored_objects():
    scanned = [name for name, data in STORED if study_index.scan_header(data) is not None]
    assert len(STORED) > 50
    assert len(scanned) >= 0.8 * len(STORED), sorted({n for n, _ in STORED} - set(scanned))


@pytest.mark.parametrize("name,data", STORED, ids=[n for n, _ in STORED])
def test_row_as_pydicom_reads_it(name, data):
    ds = study_index.scan_header(data)
    if ds is None:
        return  # left to pydicom: the row is pydicom's
    assert study_index.header_row(ds, len(data), ROW, PARTITION) == _by_pydicom(data)


def test_names_in_other_character_sets_decode_as_pydicom_decodes_them():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for charset, name in (("ISO_IR 192", "Müller^Zoë"), ("ISO_IR 100", "Müller^Zoë"), ("ISO_IR 144", "Иванов^Иван")):
        ds.SpecificCharacterSet, ds.PatientName, ds.StudyDescription = charset, name, f"étude {name}"
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        data = buf.getvalue()
        scanned = study_index.scan_header(data)
        assert scanned is not None
        row = study_index.header_row(scanned, len(data), ROW, PARTITION)
        assert row == _by_pydicom(data)
        assert row["PatientName"] == name


def test_what_the_scan_cannot_follow_is_left_to_pydicom():
    ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    assert study_index.scan_header(ct) is not None
    implicit = Path(get_testdata_file("MR_small_implicit.dcm")).read_bytes()
    assert study_index.scan_header(implicit) is None  # another encoding
    assert study_index.scan_header(b"not DICOM at all" * 64) is None
    assert study_index.scan_header(ct[:1000]) is None  # the header cut short (kept bytes end mid-element)
    offset = 132 + 12 + struct.unpack_from("<L", ct, 140)[0]  # after the file meta
    garbled = ct[: offset + 4] + b"\x01\x02" + ct[offset + 6 :]  # no VR where one must be
    assert study_index.scan_header(garbled) is None
