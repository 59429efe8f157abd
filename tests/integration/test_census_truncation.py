"""An untruncatable census: PACS that cap C-FIND answers, silently or with a
status, still yield every study (StudyTime ranges bisected)."""

from __future__ import annotations

import datetime as dt

import pytest

from include.pacs_migration.census import take_census
from include.pacs_migration.dimse import FindSession, find
from peers.pacs import SimulatedPACS
from tests.peers import Orthanc, loopback_source, many_studies

DATE = dt.date(2019, 3, 1)


@pytest.mark.parametrize(("status", "configured"), [(0x0000, 5), (0xA700, None), (0xFE00, None)])
def test_capped_simulated_pacs(tmp_path, status, configured):
    """A silent cap (known from the config) and caps the peer signals (learned)."""
    expected = set(many_studies(tmp_path / "a", 40))
    pacs = SimulatedPACS(tmp_path / "a", find_limit=5, truncation_status=status)
    try:
        with FindSession(loopback_source(pacs.port, "LEGACYPACS")) as session:
            census = take_census(session.find, DATE, find_limit=configured)
    finally:
        pacs.stop()
    assert {s.study_instance_uid for s in census.series} == expected
    assert not [w for w in census.warnings if w.code == "QUERY_TRUNCATED"]
    assert pacs.find_requests < 40 * 3 + 64  # bounded splitting


def test_unsplittable_cap_is_reported_not_hidden(tmp_path):
    """12 studies at the same second, cap 5: what cannot be split is named."""
    many_studies(tmp_path / "a", 12, same_time=True)
    pacs = SimulatedPACS(tmp_path / "a", find_limit=5, truncation_status=0xA700)
    try:
        census = take_census(lambda q: find(loopback_source(pacs.port, "LEGACYPACS"), q), DATE, split_depth=6)
    finally:
        pacs.stop()
    assert len({s.study_instance_uid for s in census.series}) == 5
    assert any(w.code == "QUERY_TRUNCATED" for w in census.warnings)


def test_orthanc_limit_find_results(tmp_path):
    """Orthanc with LimitFindResults = 5 and 40 studies on one date: all 40 found."""
    expected = set(many_studies(tmp_path / "a", 40))
    orthanc = Orthanc(tmp_path / "orthanc", LimitFindResults=5)
    try:
        assert orthanc.upload_folder(tmp_path / "a") == 40
        with FindSession(loopback_source(orthanc.dicom_port, orthanc.ae_title)) as session:
            census = take_census(session.find, DATE)
    finally:
        orthanc.stop()
    assert {s.study_instance_uid for s in census.series} == expected
    assert sum(len(s.instances) for s in census.series) == 40
    assert not census.warnings
