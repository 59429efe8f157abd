"""Issue 13, points 4-7: no copy dropped, quarantine proven, this run's census
only, true figures. Real peers: the simulated PACS and moto's S3 server."""

from __future__ import annotations

import datetime as dt
import hashlib

import pydicom
import pytest

from include.pacs_migration.census import take_census
from include.pacs_migration.config import TargetConfig
from include.pacs_migration.dimse import FindSession, StagingSink, c_get
from include.pacs_migration.manifest import PartitionManifests, StaleCensus
from include.pacs_migration.partition import Partition
from include.pacs_migration.report import partition_figures
from include.pacs_migration.store import ObjectStore, PutOutcome
from include.pacs_migration.transfer import transfer_partition
from include.pacs_migration.validate import validate_partition
from peers.pacs import SimulatedPACS
from tests.conftest import TEST_KEYER
from tests.peers import loopback_source, series_study

DATE = dt.date(2019, 3, 1)
CT = Partition(DATE, "CT")


def _store(s3_server, bucket) -> ObjectStore:
    return ObjectStore(s3_server.client(), TargetConfig(bucket=bucket))


def _transfer(port, store, partition, staging, run_id="proof-run"):
    m = PartitionManifests(store, partition)
    transfer_partition(
        lambda q, c, s: c_get(loopback_source(port), q, c, s),
        store,
        partition,
        m.census(),
        staging,
        run_id,
        3,
        2,
        4,
        keyer=TEST_KEYER,
    )
    return m.transfer()


def _validate(store, partition):
    m = PartitionManifests(store, partition)
    return validate_partition(store, partition, m.census(), m.transfer(), publish=False)


def test_sink_keeps_a_differing_copy_and_counts_an_identical_one_once(tmp_path):
    sink = StagingSink(tmp_path / "s")
    sink.store("1.2.3", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", b"first")
    sink.store("1.2.3", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", b"first")
    sink.store("1.2.3", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", b"second")
    assert sink.duplicates == 1 and len(sink.received) == 1 and len(sink.copies) == 1
    assert sink.copies[0].copy == 1 and sink.copies[0].path.read_bytes() == b"second"
    assert len(list((tmp_path / "s").iterdir())) == 2  # the identical one is not kept twice


def test_two_instances_under_one_uid_are_both_kept(tmp_path, s3_server, bucket):
    """Two different instances share a SOP Instance UID in two series: both
    quarantined UID_CONFLICT, each with its series; nothing of them goes live."""
    truth = series_study(tmp_path / "a", 2, [3, 3])
    first, second = sorted(truth)
    twin = pydicom.dcmread(next(p for p in (tmp_path / "a").glob("000-*.dcm")))
    twin.SeriesInstanceUID = second
    twin.InstanceNumber = 99
    twin.save_as(tmp_path / "a" / "twin.dcm", enforce_file_format=True)
    pacs = SimulatedPACS(tmp_path / "a")
    store = _store(s3_server, bucket)
    try:
        with FindSession(loopback_source(pacs.port)) as session:
            census = take_census(session.find, DATE)
        PartitionManifests(store, CT).write_census(census.for_partition(CT), [])
        df = _transfer(pacs.port, store, CT, tmp_path / "staging")
    finally:
        pacs.stop()
    rows = df[df["sop_instance_uid"] == str(twin.SOPInstanceUID)]
    assert len(rows) == 2 and set(rows["reason"]) == {"UID_CONFLICT"}
    assert set(rows["series_instance_uid"]) == {first, second}
    assert rows["quarantine_key"].nunique() == 2
    assert s3_server.count(bucket, "studies/") == 5 and s3_server.count(bucket, "quarantine/") == 2


def test_quarantine_is_proven_and_repaired(tmp_path, s3_server, bucket, archive, pacs):
    """The archive's truncated CT (2019-03-02) is quarantined; its object
    corrupted in S3 fails validation, and the next run rewrites it."""
    store = _store(s3_server, bucket)
    date = dt.date(2019, 3, 2)
    with FindSession(loopback_source(pacs.port)) as session:
        census = take_census(session.find, date)
    p = Partition(date, "CT")
    PartitionManifests(store, p).write_census(census.for_partition(p), [])
    df = _transfer(pacs.port, store, p, tmp_path / "staging", "run-1")
    key = df[df["state"] == "quarantined"]["quarantine_key"].iloc[0]
    assert _validate(store, p).success
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=b"corrupted")  # e.g. a bad disk, a bad copy
    report = _validate(store, p)
    assert not report.success and report.quarantine_failures == 1
    assert "quarantined:expect_column_values_to_be_in_set(checksum_verified)" in [o.label for o in report.failed]
    df = _transfer(pacs.port, store, p, tmp_path / "staging", "run-2")
    assert df[df["quarantine_key"] == key]["load_action"].tolist() == ["repaired"]
    assert hashlib.sha256(store.get(key)).hexdigest() in key and _validate(store, p).success
    # Anything else under the partition's quarantine prefix is unaccounted for.
    stray = PartitionManifests(store, p).quarantine_key("0" * 64)
    s3_server.client().put_object(Bucket=bucket, Key=stray, Body=b"stray")
    assert "bucket:expect_column_values_to_be_between(quarantine_unaccounted)" in [
        o.label for o in _validate(store, p).failed
    ]


class _LosingCensusWrites:
    """An S3 client whose census manifest writes are acknowledged and lost."""

    def __init__(self, client):
        self._client = client

    def put_object(self, **kw):
        if kw["Key"].endswith("census.parquet"):
            return {}
        return self._client.put_object(**kw)

    def __getattr__(self, name):
        return getattr(self._client, name)


def test_a_lost_census_write_fails_the_census_and_a_stale_one_is_refused(tmp_path, s3_server, bucket):
    series_study(tmp_path / "a", 1, [2])
    pacs = SimulatedPACS(tmp_path / "a")
    store = _store(s3_server, bucket)
    try:
        with FindSession(loopback_source(pacs.port)) as session:
            before = take_census(session.find, DATE)
            digest = PartitionManifests(store, CT).write_census(before.for_partition(CT), []).census_sha256
            series_study(tmp_path / "a" / "new", 1, [1], tag="late")  # a new series at the source
            pacs.reindex()
            after = take_census(session.find, DATE)
    finally:
        pacs.stop()
    losing = ObjectStore(_LosingCensusWrites(s3_server.client()), store.target)
    with pytest.raises(StaleCensus):
        PartitionManifests(losing, CT).write_census(after.for_partition(CT), [])
    # What the next steps would read is the old census: refused against this run's hash.
    from include.pacs_migration.census import census_hash

    with pytest.raises(StaleCensus):
        PartitionManifests(store, CT).census(census_hash(after.for_partition(CT)))
    assert PartitionManifests(store, CT).census(digest)


class _LosingResponses:
    """An S3 client that stores every instance and loses the first response of each."""

    def __init__(self, client):
        self._client = client
        self.lost = 0

    def put_object(self, **kw):
        rsp = self._client.put_object(**kw)
        if kw["Key"].startswith("studies/") and kw.get("IfNoneMatch") and self.lost < 2:
            self.lost += 1
            from botocore.exceptions import ClientError

            raise ClientError(
                {"Error": {"Code": "PreconditionFailed"}, "ResponseMetadata": {"HTTPStatusCode": 412}}, "PutObject"
            )  # as a retry after a lost response would see it
        return rsp

    def __getattr__(self, name):
        return getattr(self._client, name)


def test_written_counts_objects_whose_response_was_lost(tmp_path, s3_server, bucket):
    series_study(tmp_path / "a", 1, [4])
    pacs = SimulatedPACS(tmp_path / "a")
    client = _LosingResponses(s3_server.client())
    store = ObjectStore(client, TargetConfig(bucket=bucket))
    try:
        with FindSession(loopback_source(pacs.port)) as session:
            census = take_census(session.find, DATE)
        PartitionManifests(store, CT).write_census(census.for_partition(CT), [])
        _transfer(pacs.port, store, CT, tmp_path / "staging", "run-1")
        first = partition_figures(store, CT, "run-1")
        _transfer(pacs.port, store, CT, tmp_path / "staging", "run-2")
        again = partition_figures(store, CT, "run-2")
    finally:
        pacs.stop()
    assert client.lost == 2
    assert (first.written, first.migrated) == (4, 4) and again.written == 0
    assert (
        store.put_new("studies/x.dcm", b"a", hashlib.sha256(b"a").hexdigest(), writer="w1").outcome
        is PutOutcome.CREATED
    )
    assert (
        store.put_new("studies/x.dcm", b"a", hashlib.sha256(b"a").hexdigest(), writer="w2").outcome
        is PutOutcome.ALREADY_PRESENT
    )


def test_a_partition_whose_transfer_failed_shows_the_census_expected(s3_server, bucket):
    from include.pacs_migration.census import CensusSeries, ExpectedInstance

    store = _store(s3_server, bucket)
    series = [
        CensusSeries(
            "1.2.3",
            "1.2.3.4",
            "CT",
            DATE,
            3,
            tuple(ExpectedInstance(f"1.2.3.4.{i}", "1.2.840.10008.5.1.4.1.1.2") for i in range(3)),
        )
    ]
    PartitionManifests(store, CT).write_census(series, [])
    f = partition_figures(store, CT, "run-x")
    assert (f.expected, f.migrated, f.validation_passed) == (3, 0, False)
    assert f.failed_expectations == ("transfer:not_completed",)


def _two_patient_archive(root):
    """Two CT studies of 2019-03-01: "one" names one patient; "mixed" names
    another patient in its second series (a misfiled series)."""
    series_study(root, 2, [30, 30], tag="one")  # keeps the quarantined fraction under 10 %
    mixed = series_study(root / "mixed", 2, [3, 2], tag="mixed")
    second = sorted(mixed)[1]
    for path in (root / "mixed").glob("*.dcm"):
        ds = pydicom.dcmread(path)
        if ds.SeriesInstanceUID == second:
            ds.PatientID = "CANARY-OTHER-PATIENT"
            ds.save_as(path, enforce_file_format=True)
    return str(pydicom.dcmread(next((root / "mixed").glob("*.dcm"))).StudyInstanceUID)


@pytest.mark.parametrize("policy", ["quarantine", "flag"])
def test_a_study_naming_two_patients(tmp_path, s3_server, bucket, policy):
    """Point 8: by default nothing of the study goes live (INCONSISTENT_PATIENT,
    named in the report by Study Instance UID); under ``flag`` it migrates and
    is named. The other study of the partition migrates either way."""
    from include.pacs_migration.rules import PatientPolicy, RuleSet

    mixed = _two_patient_archive(tmp_path / "a")
    ruleset = RuleSet(id="t", version="1", inconsistent_patient=PatientPolicy(policy))
    pacs = SimulatedPACS(tmp_path / "a")
    store = _store(s3_server, bucket)
    m = PartitionManifests(store, CT)
    try:
        with FindSession(loopback_source(pacs.port)) as session:
            census = take_census(session.find, DATE)
        m.write_census(census.for_partition(CT), [])
        transfer_partition(
            lambda q, c, s: c_get(loopback_source(pacs.port), q, c, s),
            store,
            CT,
            m.census(),
            tmp_path / "staging",
            "patients-run",
            3,
            2,
            4,
            ruleset=ruleset,
            keyer=TEST_KEYER,
        )
    finally:
        pacs.stop()
    df = m.transfer()
    study = df[df["study_instance_uid"] == mixed]
    assert len(study) == 5 and len(df) == 65
    if policy == "quarantine":
        assert set(study["reason"]) == {"INCONSISTENT_PATIENT"} and set(study["state"]) == {"quarantined"}
        assert s3_server.count(bucket, f"studies/{mixed}") == 0
        assert s3_server.count(bucket, "studies/") == 60 and s3_server.count(bucket, "quarantine/") == 5
    else:
        assert set(study["state"]) == {"migrated"} and set(study["findings"]) == {"INCONSISTENT_PATIENT"}
        assert s3_server.count(bucket, "studies/") == 65
    assert df[df["study_instance_uid"] != mixed]["state"].eq("migrated").all()
    report = _validate(store, CT)
    assert report.success, [o.label for o in report.failed]
    figures = partition_figures(store, CT, "patients-run")
    named = "quarantined" if policy == "quarantine" else "flagged (migrated)"
    assert figures.inconsistent_patients == (f"{mixed} {named}",)
    assert b"CANARY" not in store.get(m.key("transfer.parquet"))  # the manifest holds a hash, not the ID


def test_a_late_manifest_put_is_not_this_runs(tmp_path, s3_server, bucket):
    """Issue 15.1: a killed run's transfer-manifest PUT landing after the re-run
    wrote its own: validation and lineage of the re-run refuse it (StaleManifest)
    instead of proving the killed run's rows; the next attempt rewrites it."""
    import pandas as pd

    from include.pacs_migration.manifest import StaleManifest, transfer_frame

    store = _store(s3_server, bucket)
    m = PartitionManifests(store, CT)
    m.write_transfer(transfer_frame([]), "rerun")
    assert m.transfer("rerun").empty
    m.write_transfer(transfer_frame([]), "killed-run")  # the late PUT
    with pytest.raises(StaleManifest, match="written by another run"):
        m.transfer("rerun")
    assert isinstance(m.transfer(), pd.DataFrame)  # readers that do not prove a run still read it
    m.write_transfer(transfer_frame([]), "rerun")
    assert m.transfer("rerun").empty


def test_a_late_manifest_put_cannot_land_over_a_newer_one(tmp_path, s3_server, bucket):
    """Issue 15.1: each run writes its transfer manifest only over the version
    it read. A killed run's PUT arriving after the re-run's is refused (the
    re-run's manifest stays); a retry of our own PUT whose answer was lost is not."""
    from include.pacs_migration.manifest import StaleManifest, transfer_frame

    store = _store(s3_server, bucket)
    killed, rerun = PartitionManifests(store, CT), PartitionManifests(store, CT)
    assert killed.transfer_or_none() is None and rerun.transfer_or_none() is None
    rerun.write_transfer(transfer_frame([]), "rerun")
    with pytest.raises(StaleManifest, match="changed during this run"):
        killed.write_transfer(transfer_frame([]), "killed-run")  # the late PUT
    assert rerun.transfer("rerun").empty  # still the re-run's
    rerun.write_transfer(transfer_frame([]), "rerun")  # the same bytes again: our own write, not a conflict
