"""Retrieval by C-MOVE to our own Storage SCP, from the simulated PACS and
from Orthanc: completion reconciled against the census, nothing unasked kept."""

from __future__ import annotations

import datetime as dt

from include.pacs_migration.census import take_census
from include.pacs_migration.config import SourceConfig, TargetConfig
from include.pacs_migration.dimse import FindSession, retriever
from include.pacs_migration.manifest import read_census, write_census
from include.pacs_migration.store import ObjectStore
from include.pacs_migration.transfer import transfer_partition
from peers.pacs import SimulatedPACS
from peers.ports import free_port
from tests.conftest import TEST_KEYER
from tests.peers import Orthanc

DATE = dt.date(2019, 3, 1)


def _migrate_all(source, store, tmp_path, archive) -> int:
    with FindSession(source) as session:
        census = take_census(session.find, DATE)
    total = 0
    for p in census.partitions():
        write_census(store, p, census.for_partition(p))
        with retriever(source, tmp_path / "staging") as get:
            counts = transfer_partition(
                get, store, p, read_census(store, p), tmp_path / "staging", "move-run", 3, 1, 4, keyer=TEST_KEYER
            )
        assert counts.expected == archive.by_partition[p.key]
        assert counts.expected == counts.migrated + counts.quarantined + counts.unresolved
        assert counts.unresolved == 0 and counts.unsolicited == 0
        total += counts.migrated
    return total


def test_c_move_from_simulated_pacs(archive, s3_server, bucket, tmp_path):
    port = free_port()
    pacs = SimulatedPACS(archive.root, move_destinations={"PACSMIGRATE": ("127.0.0.1", port)})
    try:
        source = SourceConfig(
            host="127.0.0.1",
            port=pacs.port,
            called_ae_title="LEGACYPACS",
            calling_ae_title="PACSMIGRATE",
            retrieve_method="C-MOVE",
            move_listen_host="127.0.0.1",
            move_listen_port=port,
        )
        store = ObjectStore(s3_server.client(), TargetConfig(bucket=bucket))
        total = _migrate_all(source, store, tmp_path, archive)
    finally:
        pacs.stop()
    assert total == s3_server.count(bucket, "studies/") > 0


def test_c_move_from_orthanc(archive, s3_server, bucket, tmp_path):
    port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", calling_aes={"PACSMIGRATE": port})
    try:
        orthanc.upload_folder(archive.root / "20190301")
        source = SourceConfig(
            host="127.0.0.1",
            port=orthanc.dicom_port,
            called_ae_title=orthanc.ae_title,
            calling_ae_title="PACSMIGRATE",
            retrieve_method="C-MOVE",
            move_listen_host="127.0.0.1",
            move_listen_port=port,
        )
        store = ObjectStore(s3_server.client(), TargetConfig(bucket=bucket))
        total = _migrate_all(source, store, tmp_path, archive)
    finally:
        orthanc.stop()
    assert total == s3_server.count(bucket, "studies/") == 45
