"""Normalize from the staged file (issue 22, point 3): every corpus case, taken
down the streamed path (``stream_from=0``: the header parsed, the pixel data
hashed and copied in chunks), ends exactly as in memory: the same reason, the
same hashes, changes and findings, and byte-identical output."""

from __future__ import annotations

import datetime as dt
import io
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from include.pacs_migration import normalize_file as streamed
from include.pacs_migration.normalize import _dataset_offset, normalize
from include.pacs_migration.normalize_file import find_pixel_data, normalize_file
from include.pacs_migration.rules import load_ruleset
from tests.corpus.corpus import Case, mutants, pydicom_files

CASES_FOR_STREAMING = pydicom_files() + mutants()
RULESET = load_ruleset(Path(__file__).resolve().parents[2] / "include/config/rules/site-default.yaml")
WHEN = dt.datetime(2026, 12, 6, 12, 0, tzinfo=dt.UTC)
FIELDS = (
    "reason",
    "sop_instance_uid",
    "transfer_syntax_in",
    "transfer_syntax_out",
    "pixel_sha256_before",
    "pixel_sha256_after",
    "patient_digest",
    "changes",
    "rules_applied",
    "findings",
)
TAKEN: list[str] = []


@pytest.mark.parametrize("case", CASES_FOR_STREAMING, ids=[c.name for c in CASES_FOR_STREAMING])
def test_streamed_normalize_is_the_in_memory_one(case: Case, tmp_path, monkeypatch):
    path, out = tmp_path / "in.dcm", tmp_path / "in.dcm.out"
    path.write_bytes(case.data)
    mapped = streamed._normalize_mapped
    took: list[bool] = []

    def spy(*args, **kwargs):
        outcome = mapped(*args, **kwargs)
        took.append(outcome is not None)
        return outcome

    monkeypatch.setattr(streamed, "_normalize_mapped", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        memory = normalize(case.data, ruleset=RULESET, source_ae="LEGACYPACS", modified_at=WHEN)
        result, rewritten = normalize_file(path, None, out, RULESET, "LEGACYPACS", WHEN, stream_from=0)
    assert {f: getattr(result, f) for f in FIELDS} == {f: getattr(memory, f) for f in FIELDS}
    assert result.data is None
    if memory.data is None:
        assert not rewritten and not out.exists()
    else:
        assert (out.read_bytes() if rewritten else path.read_bytes()) == memory.data
    if took and took[0]:
        TAKEN.append(case.name)


def test_the_streamed_path_takes_the_common_encodings():
    """Which cases went down the streamed path (not the in-memory fallback): the
    equality above must cover native, big endian, implicit and encapsulated data."""
    if not TAKEN:
        pytest.skip("run with the cases above")
    for name in ("CT_small.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_RLE.dcm"):
        assert any(t.endswith(f":{name}") for t in TAKEN), name


def test_pixel_data_is_found_by_headers_alone():
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    span = find_pixel_data(data, _dataset_offset(data)[0], implicit=False, little=True)
    assert span is not None and data[span.value_at : span.value_end] == ds.PixelData
    assert (span.vr, span.undefined) == (b"OW", False) and span.end == span.value_end <= len(data)


def test_a_known_attribute_sent_as_un_is_retyped_every_time():
    """The rules' cache of values already judged valid skips decoding a value
    seen before: a known UN was retyped only the first time a process met its
    bytes, while every instance's changes said ``un:retyped``."""
    case = next(c for c in mutants() if c.name == "CT_small.dcm:UN-for-LO")
    for _ in range(2):
        result = normalize(case.data, ruleset=RULESET, modified_at=WHEN)
        assert "un:retyped:1" in result.changes
        assert pydicom.dcmread(io.BytesIO(result.data)).get_item(0x00080070).VR == "LO"
