"""Interop with a PACS nobody here wrote: Orthanc (Debian package) as the source,
census by C-FIND and retrieval by C-GET through the core, into moto's S3."""

from __future__ import annotations

import datetime as dt
import hashlib

from include.pacs_migration.census import take_census
from include.pacs_migration.config import SourceConfig, TargetConfig
from include.pacs_migration.dimse import FindSession, c_get
from include.pacs_migration.manifest import read_census, read_transfer, write_census
from include.pacs_migration.store import ObjectStore
from include.pacs_migration.transfer import transfer_partition
from include.pacs_migration.validate import validate_partition
from tests.conftest import TEST_KEYER
from tests.peers import Orthanc


def test_partition_from_orthanc(archive, s3_server, bucket, tmp_path):
    orthanc = Orthanc(tmp_path / "orthanc")
    try:
        stored = orthanc.upload_folder(archive.root / "20190301")
        assert stored == sum(v for k, v in archive.by_partition.items() if k.startswith("2019-03-01"))
        source = SourceConfig(
            host="127.0.0.1",
            port=orthanc.dicom_port,
            called_ae_title=orthanc.ae_title,
            calling_ae_title="PACSMIGRATE",
            acse_timeout=5,
            dimse_timeout=30,
            network_timeout=30,
        )
        with FindSession(source) as session:
            census = take_census(session.find, dt.date(2019, 3, 1))
        assert not census.warnings
        store = ObjectStore(s3_server.client(), TargetConfig(bucket=bucket))
        total = 0
        for p in census.partitions():
            write_census(store, p, census.for_partition(p))
            counts = transfer_partition(
                lambda q, c, s: c_get(source, q, c, s),
                store,
                p,
                read_census(store, p),
                tmp_path / "staging",
                "orthanc-run",
                3,
                2,
                4,
                keyer=TEST_KEYER,
            )
            assert counts.expected == archive.by_partition[p.key]
            assert counts.migrated == counts.expected and counts.unsolicited == 0
            df = read_transfer(store, p)
            report = validate_partition(store, p, read_census(store, p), df, publish=False)
            assert report.success, [o.label for o in report.failed]
            for key, sha in zip(df.object_key, df.object_sha256, strict=True):
                assert hashlib.sha256(store.get(key)).hexdigest() == sha
            total += counts.migrated
        assert s3_server.count(bucket, "studies/") == total == stored
    finally:
        orthanc.stop()
