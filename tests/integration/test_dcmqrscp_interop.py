"""Interop with DCMTK's dcmqrscp (Debian package dcmtk) as the source: a
Query/Retrieve SCP whose C-FIND answers carry no SOP Class UID and no
Number of Series Related Instances, filled over C-STORE by storescu.
Census, then retrieval by C-GET and by C-MOVE, into moto's S3."""

from __future__ import annotations

import datetime as dt
import hashlib

import pytest

from include.pacs_migration.census import take_census
from include.pacs_migration.config import SourceConfig, TargetConfig
from include.pacs_migration.dimse import FindSession, retriever
from include.pacs_migration.manifest import read_census, read_transfer, write_census
from include.pacs_migration.store import ObjectStore
from include.pacs_migration.transfer import transfer_partition
from include.pacs_migration.validate import validate_partition
from peers.ports import free_port
from tests.conftest import TEST_KEYER
from tests.peers import Dcmqrscp

DATE = dt.date(2019, 3, 1)


@pytest.mark.parametrize("method", ["C-GET", "C-MOVE"])
def test_partition_from_dcmqrscp(method, archive, s3_server, bucket, tmp_path):
    port = free_port()
    qr = Dcmqrscp(tmp_path / "dcmqrscp", move_destinations={"PACSMIGRATE": port} if method == "C-MOVE" else None)
    try:
        paths = sorted((archive.root / DATE.strftime("%Y%m%d")).rglob("*.dcm"))
        qr.load(paths)
        source = SourceConfig(
            host="127.0.0.1",
            port=qr.port,
            called_ae_title=qr.ae_title,
            calling_ae_title="PACSMIGRATE",
            retrieve_method=method,
            acse_timeout=5,
            dimse_timeout=30,
            network_timeout=30,
            move_settle_timeout=10,
            move_listen_host="127.0.0.1",
            move_listen_port=port,
        )
        with FindSession(source) as session:
            census = take_census(session.find, DATE)
        assert not census.warnings
        expected = {k: v for k, v in archive.by_partition.items() if k.startswith(DATE.isoformat())}
        found = {p.key: sum(len(s.instances) for s in census.for_partition(p)) for p in census.partitions()}
        assert found == expected
        # dcmqrscp offers neither key: the retrieve proposes classes by modality.
        assert all(not i.sop_class_uid for s in census.series for i in s.instances)
        assert all(s.reported_instances is None for s in census.series)

        store = ObjectStore(s3_server.client(), TargetConfig(bucket=bucket))
        total = 0
        for p in census.partitions():
            write_census(store, p, census.for_partition(p))
            with retriever(source, tmp_path / "staging") as get:
                counts = transfer_partition(
                    get,
                    store,
                    p,
                    read_census(store, p),
                    tmp_path / "staging",
                    "dcmqrscp-run",
                    3,
                    2,
                    4,
                    keyer=TEST_KEYER,
                )
            assert counts.expected == expected[p.key]
            assert counts.migrated == counts.expected and counts.unresolved == 0 and counts.unsolicited == 0
            df = read_transfer(store, p)
            report = validate_partition(store, p, read_census(store, p), df, publish=False)
            assert report.success, [o.label for o in report.failed]
            for key, sha in zip(df.object_key, df.object_sha256, strict=True):
                assert hashlib.sha256(store.get(key)).hexdigest() == sha
            total += counts.migrated
        assert s3_server.count(bucket, "studies/") == total == len(paths)
    finally:
        qr.stop()
