"""S3 throttling (issue 15.4): every eighth key written is answered 503 SlowDown
several times before its PUT goes through. With the pipeline's client settings
(adaptive retries, ``target.retry_attempts``) the partition migrates and its
validation (manifests, GX results, Data Docs) passes; with botocore's default
the same run fails. Real peers: the simulated PACS, moto behind a fault proxy."""

from __future__ import annotations

import datetime as dt

import boto3
import pytest
from botocore.exceptions import ClientError

from include.pacs_migration.census import take_census
from include.pacs_migration.config import TargetConfig
from include.pacs_migration.dimse import FindSession, c_get
from include.pacs_migration.manifest import PartitionManifests
from include.pacs_migration.partition import Partition
from include.pacs_migration.store import ObjectStore
from include.pacs_migration.transfer import transfer_partition
from include.pacs_migration.validate import validate_partition
from tests.conftest import TEST_KEYER
from tests.peers import loopback_source
from tests.s3_faults import S3FaultProxy

DATE = dt.date(2019, 3, 1)


def _migrate(store: ObjectStore, pacs, staging) -> bool:
    p = Partition(DATE, "CT")
    m = PartitionManifests(store, p)
    with FindSession(loopback_source(pacs.port)) as session:
        census = take_census(session.find, DATE)
    m.write_census(census.for_partition(p), [])
    counts = transfer_partition(
        lambda q, c, s: c_get(loopback_source(pacs.port), q, c, s),
        store,
        p,
        m.census(),
        staging,
        "throttled-run",
        3,
        2,
        4,
        keyer=TEST_KEYER,
    )
    report = validate_partition(store, p, m.census(), m.transfer())  # publishes GX results and Data Docs
    return report.success and counts.migrated == counts.expected


def _client(url: str, config=None):
    return boto3.client(
        "s3",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=config,
    )


def test_throttling_is_ridden_out(s3_server, bucket, pacs, tmp_path):
    target = TargetConfig(bucket=bucket)
    proxy = S3FaultProxy(s3_server.endpoint_url, throttle_every=8, throttle_times=3)
    try:
        assert _migrate(ObjectStore(_client(proxy.endpoint_url, target.client_config()), target), pacs, tmp_path)
    finally:
        proxy.stop()
    assert proxy.throttled >= 3 * 5  # >= 5 keys, 3 SlowDowns each (one more than botocore's default allows)


def test_botocore_default_gives_up(s3_server, bucket, pacs, tmp_path):
    """The reference: the same faults with botocore's default retry settings fail the run."""
    target = TargetConfig(bucket=bucket)
    proxy = S3FaultProxy(s3_server.endpoint_url, throttle_every=8, throttle_times=3)
    try:
        with pytest.raises(ClientError, match="SlowDown"):
            _migrate(ObjectStore(_client(proxy.endpoint_url), target), pacs, tmp_path)
    finally:
        proxy.stop()
