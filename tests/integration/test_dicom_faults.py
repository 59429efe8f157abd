"""DICOM-level faults, scripted in the simulated PACS (our pynetdicom SCP):
each case converges to the full expected set, or ends with named
``unresolved`` instances; never hangs, never loses or double-counts."""

from __future__ import annotations

import datetime as dt
import time

import pydicom
import pytest
from pydicom.dataset import Dataset

from include.pacs_migration.census import take_census
from include.pacs_migration.config import SourceConfig, TargetConfig
from include.pacs_migration.counts import PartitionCounts
from include.pacs_migration.dimse import DicomNetworkError, FindSession, c_get, find, retriever
from include.pacs_migration.manifest import read_census, read_transfer, write_census
from include.pacs_migration.partition import Partition
from include.pacs_migration.store import ObjectStore
from include.pacs_migration.transfer import transfer_partition
from include.pacs_migration.validate import validate_partition
from peers.pacs import Faults, SimulatedPACS
from peers.ports import free_port
from tests.conftest import TEST_KEYER

DATE = dt.date(2019, 3, 1)
CT = Partition(DATE, "CT")
BOUND = 60  # seconds: no case may take longer


def _source(port: int, **kw) -> SourceConfig:
    return SourceConfig(
        **{
            "host": "127.0.0.1",
            "port": port,
            "called_ae_title": "LEGACYPACS",
            "calling_ae_title": "PACSMIGRATE",
            "acse_timeout": 2,
            "dimse_timeout": 1.0,
            "network_timeout": 5,
            "move_settle_timeout": 2,
            **kw,
        }
    )


def _migrate(
    pacs: SimulatedPACS, source: SourceConfig, store: ObjectStore, tmp_path, get=None, attempts: int = 3
) -> tuple[PartitionCounts, float]:
    started = time.monotonic()
    with FindSession(source) as session:
        census = take_census(session.find, DATE)
    write_census(store, CT, census.for_partition(CT))
    get = get or (lambda q, c, s: c_get(source, q, c, s))
    counts = transfer_partition(
        get, store, CT, read_census(store, CT), tmp_path / "staging", "fault-run", attempts, 1, 2, keyer=TEST_KEYER
    )
    elapsed = time.monotonic() - started
    assert elapsed < BOUND
    assert counts.expected == counts.migrated + counts.quarantined + counts.unresolved
    return counts, elapsed


def _ct_uids(archive) -> list[str]:
    uids = []
    for path in sorted((archive.root / DATE.strftime("%Y%m%d")).rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        if ds.get("Modality") == "CT":
            uids.append(str(ds.SOPInstanceUID))
    return sorted(uids)


@pytest.fixture
def store(s3_server, bucket):
    return ObjectStore(s3_server.client(), TargetConfig(bucket=bucket))


def _converged(counts: PartitionCounts, archive, s3_server, bucket) -> None:
    assert counts.expected == archive.by_partition[CT.key]
    assert counts.migrated == counts.expected and counts.unresolved == 0 and counts.unsolicited == 0
    assert s3_server.count(bucket, "studies/") == counts.migrated  # nothing double-counted or lost


def test_association_rejected_then_accepted(archive, store, s3_server, bucket, tmp_path):
    pacs = SimulatedPACS(archive.root, faults=Faults(reject_associations=2))
    try:
        counts, _ = _migrate(pacs, _source(pacs.port), store, tmp_path)
    finally:
        pacs.stop()
    assert pacs.rejected == 2
    _converged(counts, archive, s3_server, bucket)


def test_permanent_rejection_is_not_retried(archive, tmp_path):
    pacs = SimulatedPACS(archive.root)
    try:
        source = _source(pacs.port, called_ae_title="WRONGAE", association_attempts=5)
        pacs.ae.require_called_aet = True
        started = time.monotonic()
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyDate = "20190301"
        with pytest.raises(DicomNetworkError, match="rejected permanently"):
            find(source, q)
        assert time.monotonic() - started < 2  # no backoff: retrying cannot help
        assert pacs.associations == 0
    finally:
        pacs.stop()


def test_abort_after_k_of_n_sub_operations(archive, store, s3_server, bucket, tmp_path):
    pacs = SimulatedPACS(archive.root, faults=Faults(abort_after=2, abort_times=2))
    try:
        counts, _ = _migrate(pacs, _source(pacs.port), store, tmp_path)
    finally:
        pacs.stop()
    assert pacs.aborted == 2
    _converged(counts, archive, s3_server, bucket)


def test_stall_past_dimse_timeout_then_answer(archive, store, s3_server, bucket, tmp_path):
    pacs = SimulatedPACS(archive.root, faults=Faults(stall_seconds=2.5, stall_times=1))
    try:
        counts, _ = _migrate(pacs, _source(pacs.port), store, tmp_path)
    finally:
        pacs.stop()
    assert pacs.stalled == 1
    _converged(counts, archive, s3_server, bucket)


def test_stall_every_time_ends_unresolved_within_bound(archive, store, s3_server, bucket, tmp_path):
    pacs = SimulatedPACS(archive.root, faults=Faults(stall_seconds=1.5, stall_times=10**6))
    try:
        counts, elapsed = _migrate(pacs, _source(pacs.port), store, tmp_path, attempts=2)
    finally:
        pacs.stop()
    assert counts.unresolved == counts.expected > 0 and counts.migrated == 0
    df = read_transfer(store, CT)
    assert set(df.reason) == {"NOT_RECEIVED:network"}
    assert s3_server.count(bucket, "studies/") == 0


@pytest.mark.parametrize("failed_list", [True, False], ids=["with-failed-list", "without-failed-list"])
def test_warning_b000_transient_converges(failed_list, archive, store, s3_server, bucket, tmp_path):
    withhold = frozenset(_ct_uids(archive)[:3])
    pacs = SimulatedPACS(archive.root, faults=Faults(withhold=withhold, withhold_times=1, failed_list=failed_list))
    try:
        counts, _ = _migrate(pacs, _source(pacs.port), store, tmp_path)
    finally:
        pacs.stop()
    _converged(counts, archive, s3_server, bucket)


@pytest.mark.parametrize("failed_list", [True, False], ids=["with-failed-list", "without-failed-list"])
def test_warning_b000_persistent_names_the_unresolved(failed_list, archive, store, s3_server, bucket, tmp_path):
    withhold = frozenset(_ct_uids(archive)[:2])
    pacs = SimulatedPACS(archive.root, faults=Faults(withhold=withhold, withhold_times=10**6, failed_list=failed_list))
    try:
        counts, _ = _migrate(pacs, _source(pacs.port), store, tmp_path)
    finally:
        pacs.stop()
    assert counts.unresolved == 2 and counts.migrated == counts.expected - 2
    df = read_transfer(store, CT)
    unresolved = df[df.state == "unresolved"]
    assert set(unresolved.sop_instance_uid) == withhold
    detail = "source-failed" if failed_list else "not-sent"
    assert set(unresolved.reason) == {f"NOT_RECEIVED:{detail}"}
    assert s3_server.count(bucket, "studies/") == counts.migrated
    report = validate_partition(store, CT, read_census(store, CT), df, publish=False)
    assert not report.success  # unresolved instances fail the partition


def test_c_move_success_before_stores_arrive(archive, store, s3_server, bucket, tmp_path):
    port = free_port()
    pacs = SimulatedPACS(
        archive.root,
        move_destinations={"PACSMIGRATE": ("127.0.0.1", port)},
        faults=Faults(move_success_before_stores=1.0),
    )
    try:
        # The stores come 1 s after the answer; 6 s to settle: on a loaded CI machine 24 stores took more than 2.
        source = _source(
            pacs.port, retrieve_method="C-MOVE", move_listen_host="127.0.0.1", move_listen_port=port,
            move_settle_timeout=6,
        )  # fmt: skip
        with retriever(source, tmp_path / "staging") as get:
            counts, _ = _migrate(pacs, source, store, tmp_path, get=get)
    finally:
        pacs.stop()
    _converged(counts, archive, s3_server, bucket)
