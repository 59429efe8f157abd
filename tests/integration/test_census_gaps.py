"""Issue 13, points 2 and 3: a census that is complete under caps at every
level, and a query failure confined to its study or series."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from include.pacs_migration.census import take_census
from include.pacs_migration.config import SourceConfig, TargetConfig
from include.pacs_migration.dimse import FindSession, c_get
from include.pacs_migration.manifest import PartitionManifests
from include.pacs_migration.partition import Partition
from include.pacs_migration.store import ObjectStore
from include.pacs_migration.transfer import transfer_partition
from include.pacs_migration.validate import validate_partition
from peers.pacs import Faults, SimulatedPACS
from tests.conftest import TEST_KEYER
from tests.peers import Orthanc, loopback_source, series_study

DATE = dt.date(2019, 3, 1)
CT = Partition(DATE, "CT")


def _migrate(source: SourceConfig, store: ObjectStore, census, staging: Path, run_id: str = "gap-run"):
    """census -> transfer -> validate for every partition; returns {partition: (counts, report, transfer frame)}."""
    out = {}
    for p in census.partitions():
        manifests = PartitionManifests(store, p)
        manifests.write_census(census.for_partition(p), [w.code for w in census.warnings_for(p)])
        counts = transfer_partition(
            lambda q, c, s: c_get(source, q, c, s),
            store,
            p,
            manifests.census(),
            staging,
            run_id,
            3,
            2,
            4,
            keyer=TEST_KEYER,
        )
        df = manifests.transfer()
        report = validate_partition(
            store, p, manifests.census(), df, publish=False, census_warnings=list(manifests.summary().warnings)
        )
        out[p.key] = (counts, report, df)
    return out


def test_series_and_image_caps_on_the_simulated_pacs(tmp_path, s3_server, bucket):
    """12 series behind a series cap of 5; a 2,000-instance series behind an image cap of 500."""
    truth = series_study(tmp_path / "a", 12, [2000] + [3] * 11)
    pacs = SimulatedPACS(tmp_path / "a", find_limit=5, image_find_limit=500)
    store = ObjectStore(s3_server.client(), TargetConfig(bucket=bucket))
    try:
        with FindSession(loopback_source(pacs.port)) as session:
            census = take_census(session.find, DATE, find_limit=5, image_limit=500)
        assert {s.series_instance_uid for s in census.series} == set(truth)
        big = next(s for s in census.series if s.reported_instances == 2000)
        assert big.census_gap == "IMAGE_CAPPED" and len(big.instances) == 500
        assert not [w for w in census.warnings if w.code in ("SERIES_LEVEL_TRUNCATED", "COUNT_MISMATCH")]
        counts, report, df = _migrate(loopback_source(pacs.port), store, census, tmp_path / "staging")["2019-03-01/CT"]
    finally:
        pacs.stop()
    expected = sum(len(v) for v in truth.values())
    assert (counts.expected, counts.migrated, counts.quarantined, counts.unresolved, counts.unsolicited) == (
        expected,
        expected,
        0,
        0,
        0,
    )
    assert report.success, [o.label for o in report.failed]
    assert (df["membership"] == "retrieval").sum() == 1500
    assert set(df["sop_instance_uid"]) == {u for v in truth.values() for u in v}
    assert s3_server.count(bucket, "studies/") == expected


def test_series_and_image_caps_on_orthanc(tmp_path, s3_server, bucket):
    """Orthanc LimitFindResults 4 (8 series in the study), LimitFindInstances 40 (a 150-instance series)."""
    truth = series_study(tmp_path / "a", 8, [150] + [2] * 7, tag="orthanc-big")
    orthanc = Orthanc(tmp_path / "orthanc", LimitFindResults=4, LimitFindInstances=40)
    store = ObjectStore(s3_server.client(), TargetConfig(bucket=bucket))
    try:
        assert orthanc.upload_folder(tmp_path / "a") == 164
        source = loopback_source(orthanc.dicom_port, orthanc.ae_title)
        with FindSession(source) as session:
            census = take_census(session.find, DATE, find_limit=4, image_limit=40)
        assert {s.series_instance_uid for s in census.series} == set(truth)
        counts, report, _ = _migrate(source, store, census, tmp_path / "staging")["2019-03-01/CT"]
    finally:
        orthanc.stop()
    assert (counts.expected, counts.migrated, counts.unsolicited) == (164, 164, 0)
    assert report.success, [o.label for o in report.failed]


def test_image_query_failure_is_confined_to_its_series(tmp_path, s3_server, bucket):
    """One series' image-level C-FIND fails (0xC000) and one of its instances cannot
    be sent: that series is unresolved (CENSUS_FAILED:IMAGE), the rest of the date passes."""
    truth = series_study(tmp_path / "all" / "a", 3, [4, 4, 4])
    mr = series_study(tmp_path / "all" / "b", 1, [3], modality="MR", tag="mr")
    bad_series = sorted(truth)[1]
    faults = Faults(
        fail_image_find=frozenset({bad_series}), withhold=frozenset({truth[bad_series][0]}), withhold_times=100
    )
    pacs = SimulatedPACS(tmp_path / "all", faults=faults)
    store = ObjectStore(s3_server.client(), TargetConfig(bucket=bucket))
    try:
        with FindSession(loopback_source(pacs.port)) as session:
            census = take_census(session.find, DATE)
        assert [w.code for w in census.warnings] == ["CENSUS_FAILED:IMAGE"]
        results = _migrate(loopback_source(pacs.port), store, census, tmp_path / "staging")
    finally:
        pacs.stop()
    ct_counts, ct_report, df = results["2019-03-01/CT"]
    assert (ct_counts.expected, ct_counts.migrated, ct_counts.unresolved) == (12, 11, 1)
    assert df[df["state"] == "unresolved"]["reason"].tolist() == ["CENSUS_FAILED:IMAGE"]
    assert not ct_report.success
    assert results["2019-03-01/MR"][1].success  # the rest of the date migrates and validates
    assert results["2019-03-01/MR"][0].migrated == len(next(iter(mr.values())))


def test_series_query_failure_is_confined_to_its_study(tmp_path, s3_server, bucket):
    import pydicom

    series_study(tmp_path / "a" / "good", 2, [2, 2], tag="good")
    series_study(tmp_path / "a" / "bad", 2, [2, 2], tag="bad")
    bad_study = str(pydicom.dcmread(next((tmp_path / "a" / "bad").glob("*.dcm"))).StudyInstanceUID)
    pacs = SimulatedPACS(tmp_path / "a", faults=Faults(fail_series_find=frozenset({bad_study})))
    store = ObjectStore(s3_server.client(), TargetConfig(bucket=bucket))
    try:
        with FindSession(loopback_source(pacs.port)) as session:
            census = take_census(session.find, DATE)
        results = _migrate(loopback_source(pacs.port), store, census, tmp_path / "staging")
    finally:
        pacs.stop()
    assert set(results) == {"2019-03-01/CT", "2019-03-01/UNKNOWN"}
    assert results["2019-03-01/CT"][1].success and results["2019-03-01/CT"][0].migrated == 4
    unknown = results["2019-03-01/UNKNOWN"][2]
    assert unknown["reason"].tolist() == ["CENSUS_FAILED:SERIES"] * 4  # the study's reported instance count
    assert not results["2019-03-01/UNKNOWN"][1].success


def test_a_census_asked_over_several_associations_is_the_sequential_one(tmp_path):
    """Issue 22, point 4: ``census_associations`` studies asked at once; the census
    (series, instances, gaps, warnings, their order) is the one-at-a-time census,
    under a failed series query, a failed image query and an image cap."""
    import pydicom

    for i in range(8):
        series_study(tmp_path / "a" / f"s{i}", 2, [3, 600 if i == 2 else 3], tag=f"s{i}")
    bad_study = str(pydicom.dcmread(next((tmp_path / "a" / "s5").glob("*.dcm"))).StudyInstanceUID)
    bad_series = str(pydicom.dcmread(next((tmp_path / "a" / "s6").glob("*.dcm"))).SeriesInstanceUID)
    faults = Faults(fail_series_find=frozenset({bad_study}), fail_image_find=frozenset({bad_series}))
    pacs = SimulatedPACS(tmp_path / "a", faults=faults, image_find_limit=500)
    try:
        with FindSession(loopback_source(pacs.port)) as session:
            one = take_census(session.find, DATE, image_limit=500)
            pacs.max_active = 0
            four = take_census(session.find, DATE, image_limit=500, workers=4)
    finally:
        pacs.stop()
    assert four == one
    assert sorted(w.code for w in one.warnings) == ["CENSUS_FAILED:IMAGE", "CENSUS_FAILED:SERIES"]
    assert sum(s.census_gap == "IMAGE_CAPPED" for s in one.series) == 1
    assert 1 < pacs.max_active <= 4  # asked at once, never more than allowed
