"""Objects over ``target.multipart_threshold_mb`` go up in parts (issue 22, point 3,
in part): S3 takes at most 5 GB in one PUT. Each part carries its SHA-256, the
completion is write-once (If-None-Match), and no part is left behind after a failure."""

from __future__ import annotations

import datetime as dt
import hashlib
import os

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from include.pacs_migration.config import TargetConfig
from include.pacs_migration.counts import counts_from_frame
from include.pacs_migration.manifest import PartitionManifests
from include.pacs_migration.partition import Partition
from include.pacs_migration.rollback import Selection
from include.pacs_migration.steps import Services, roll_back
from include.pacs_migration.store import ObjectStore, PutOutcome
from peers.pacs import SimulatedPACS
from tests.conftest import PATIENT_SECRET
from tests.faults.harness import migration_config, object_store, run_date

SMALL = {"multipart_threshold_mb": 5, "multipart_part_mb": 5}


def _uploads(store: ObjectStore) -> list:
    return store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])


def test_a_large_object_goes_up_in_parts_write_once(s3_server, bucket):
    store = ObjectStore(s3_server.client(), TargetConfig(bucket=bucket, sse="none", **SMALL))
    data = os.urandom(12 << 20)
    sha = hashlib.sha256(data).hexdigest()
    assert store.put_new("studies/big.dcm", data, sha).outcome is PutOutcome.CREATED
    head = store.client.head_object(Bucket=bucket, Key="studies/big.dcm")
    assert head["ETag"].strip('"').endswith("-3")  # three parts of at most 5 MiB
    assert store.head("studies/big.dcm").sha256 == sha and store.sha256_of("studies/big.dcm") == (sha, len(data))
    assert store.put_new("studies/big.dcm", data, sha).outcome is PutOutcome.ALREADY_PRESENT
    other = os.urandom(12 << 20)
    assert store.put_new("studies/big.dcm", other, hashlib.sha256(other).hexdigest()).outcome is PutOutcome.CONFLICT
    assert store.sha256_of("studies/big.dcm") == (sha, len(data))  # never overwritten
    assert _uploads(store) == []  # the refused completions left no parts


def test_a_large_object_is_copied_in_parts(s3_server, bucket):
    """What a rollback does to move an object over 5 GB aside (one CopyObject takes no more)."""
    store = ObjectStore(s3_server.client(), TargetConfig(bucket=bucket, sse="none", **SMALL))
    data = os.urandom(11 << 20)
    sha = hashlib.sha256(data).hexdigest()
    store.put_new("studies/big.dcm", data, sha, {"ruleset": "site@1"})
    store.copy("studies/big.dcm", "rolled-back/rb-1/studies/big.dcm")
    copied = store.client.head_object(Bucket=bucket, Key="rolled-back/rb-1/studies/big.dcm")
    assert copied["ETag"].strip('"').endswith("-3") and copied["ContentType"] == "application/dicom"
    assert store.sha256_of("rolled-back/rb-1/studies/big.dcm") == (sha, len(data))
    assert store.head("rolled-back/rb-1/studies/big.dcm").metadata == store.head("studies/big.dcm").metadata
    small = ObjectStore(s3_server.client(), TargetConfig(bucket=bucket, sse="none"))  # the default threshold
    small.copy("studies/big.dcm", "rolled-back/rb-2/studies/big.dcm")
    assert not small.client.head_object(Bucket=bucket, Key="rolled-back/rb-2/studies/big.dcm")["ETag"].endswith('-3"')
    assert _uploads(store) == []


class FailingPart:
    """A client whose second part upload fails (a connection lost mid-object)."""

    def __init__(self, client) -> None:
        self._client, self.parts = client, 0

    def __getattr__(self, name):
        return getattr(self._client, name)

    def upload_part(self, **kwargs):
        self.parts += 1
        if self.parts == 2:
            raise ConnectionResetError("lost mid-object")
        return self._client.upload_part(**kwargs)


def test_a_failed_upload_leaves_no_part_behind(s3_server, bucket):
    store = ObjectStore(FailingPart(s3_server.client()), TargetConfig(bucket=bucket, sse="none", **SMALL))
    data = os.urandom(11 << 20)
    with pytest.raises(ConnectionResetError):
        store.put_new("studies/cut.dcm", data, hashlib.sha256(data).hexdigest())
    assert store.head("studies/cut.dcm") is None and _uploads(store) == []


def _big_archive(root, day: dt.date, n: int = 3) -> None:
    """A CT series of ``n`` 12 MB instances (2048 x 3072, 16 bits)."""
    tpl = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series = generate_uid()
    study = generate_uid()
    for i in range(n):
        ds = tpl.copy()
        ds.Rows, ds.Columns = 2048, 3072
        ds.PixelData = np.random.default_rng(i).integers(0, 4096, (2048, 3072), dtype=np.uint16).tobytes()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyDate = ds.SeriesDate = day.strftime("%Y%m%d")
        ds.InstanceNumber = i + 1
        path = root / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)


def test_a_partition_of_large_instances_migrates_in_parts_end_to_end(s3_server, bucket, tmp_path):
    day = dt.date(2019, 3, 1)
    (tmp_path / "big").mkdir()
    _big_archive(tmp_path / "big", day)
    pacs = SimulatedPACS(tmp_path / "big")
    try:
        cfg = migration_config(pacs.port, bucket, tmp_path / "staging", **SMALL)
        store = object_store(cfg, s3_server.endpoint_url)
        first = run_date(cfg, store, "run-1", day)
        again = run_date(cfg, store, "run-2", day)
        services = Services(cfg, store, 1, patient_secret=PATIENT_SECRET, actor="test")
        rollback = roll_back(
            services, Selection.parse(partitions=[f"{day}/CT"]), "test", "alice", "rb-big", dry_run=False
        )  # moved aside in copied parts, each copy verified
    finally:
        pacs.stop()
    assert rollback["state"] == "complete" and rollback["totals"]["objects"] == 3
    assert first.verdict.value == "PASSED" and again.verdict.value == "PASSED"  # every part re-read and hashed
    manifests = PartitionManifests(store, Partition(day, "CT"))
    df = manifests.rolled_back_transfer("rb-big")
    c = counts_from_frame(df)
    assert (c.expected, c.migrated, c.written) == (3, 3, 0)  # the re-run found every object, wrote none
    for key, sha in zip(df["object_key"], df["object_sha256"], strict=True):
        copy = manifests.rolled_back_copy("rb-big", key)
        assert store.client.head_object(Bucket=bucket, Key=copy)["ETag"].strip('"').endswith("-3")
        assert store.sha256_of(copy)[0] == sha and store.head(key) is None
    assert _uploads(store) == []
