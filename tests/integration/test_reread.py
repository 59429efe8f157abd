"""Validation's re-read (issue 22, point 3): every object hashed as a stream and
its header parsed from what is kept of its first bytes, never the whole object
in memory, with the same verdicts as before for good, altered and foreign bytes."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from include.pacs_migration.config import TargetConfig
from include.pacs_migration.reports import dicom
from include.pacs_migration.reports.hl7 import parse_report
from include.pacs_migration.store import ObjectStore
from include.pacs_migration.validate import HEADER_BYTES, reread, reread_quarantine
from tests.ris import oru, tiny_pdf


class StreamOnly(ObjectStore):
    """A store that refuses to hand out a whole object."""

    def get(self, key: str) -> bytes:
        raise AssertionError(f"{key}: read whole")

    def get_or_none(self, key: str) -> bytes | None:
        raise AssertionError(f"{key}: read whole")


@pytest.fixture
def store(s3_server, bucket):
    return StreamOnly(s3_server.client(), TargetConfig(bucket=bucket, sse="none"))


def _put(store: ObjectStore, key: str, data: bytes) -> str:
    sha = hashlib.sha256(data).hexdigest()
    store.put(key, data, "application/dicom")
    return sha


def test_reread_streams_and_judges_as_before(store):
    ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    good = _put(store, "studies/a.dcm", ct)
    assert reread(store, "studies/a.dcm", good)
    assert not reread(store, "studies/a.dcm", "0" * 64)  # the recorded checksum differs
    foreign = _put(store, "studies/b.dcm", b"not DICOM at all" * 64)
    assert not reread(store, "studies/b.dcm", foreign)  # the right hash, but no DICOM
    assert not reread(store, "studies/missing.dcm", good)
    # an object far larger than what is kept for its header (a 12 MB PDF, not pixel data)
    pdf = tiny_pdf("big") + b"%" * (12 << 20)
    report = parse_report(oru("C1", "P1", "ACC1", "20190301", pdf=pdf).encode())
    study = {"StudyInstanceUID": "1.2.3", "PatientID": "P1", "PatientName": "DOE^JANE"}
    big = dicom.encapsulated_pdf(report, study, "e" * 64, 1)
    assert len(big) > 2 * HEADER_BYTES
    sha = _put(store, "studies/c.dcm", big)
    assert reread(store, "studies/c.dcm", sha)
    assert pydicom.dcmread(io.BytesIO(big)).EncapsulatedDocumentLength == len(pdf)


def test_quarantine_reread_streams(store):
    data = b"truncated original bytes" * 1000
    sha = hashlib.sha256(data).hexdigest()
    key = f"quarantine/date=2019-03-01/modality=CT/{sha}.dcm"
    store.put(key, data, "application/dicom")
    assert reread_quarantine(store, key, sha)
    assert not reread_quarantine(store, key.replace(sha, "f" * 64), sha)  # not keyed by its hash
    assert not reread_quarantine(store, f"quarantine/date=2019-03-01/modality=CT/{'a' * 64}.dcm", "a" * 64)
