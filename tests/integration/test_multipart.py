"""Objects over ``target.multipart_threshold_mb`` go up in parts (issue 22, point 3):
S3 takes at most 5 GB in one PUT. Each part carries its SHA-256, the completion
is write-once (If-None-Match), and no part is left behind after a failure.
Instances over ``normalization.stream_from_mb`` are normalized and uploaded from
their staged file, never held whole."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from include.pacs_migration.config import NormalizationConfig, TargetConfig
from include.pacs_migration.counts import counts_from_frame
from include.pacs_migration.manifest import PartitionManifests
from include.pacs_migration.normalize_processes import NormalizeProcesses
from include.pacs_migration.partition import Partition
from include.pacs_migration.rollback import Selection
from include.pacs_migration.rules import STRUCTURAL
from include.pacs_migration.steps import Services, roll_back
from include.pacs_migration.store import ObjectStore, PutOutcome
from include.pacs_migration.uids import InstanceUIDs
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


ENCODINGS = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian)


def _big_archive(root, day: dt.date, n: int = 3) -> dict[str, bytes]:
    """A CT series of ``n`` 12 MB instances (2048 x 3072, 16 bits), stored in
    turn explicit little endian (passed through), implicit and big endian (both
    rewritten). Returns each SOP Instance UID's pixel values, little endian."""
    tpl = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series = generate_uid()
    study = generate_uid()
    pixels = {}
    for i in range(n):
        ds = tpl.copy()
        ds.Rows, ds.Columns = 2048, 3072
        values = np.random.default_rng(i).integers(0, 4096, (2048, 3072), dtype=np.uint16)
        ts = ENCODINGS[i % len(ENCODINGS)]
        ds.PixelData = (values.byteswap() if ts == ExplicitVRBigEndian else values).tobytes()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ts
        ds.StudyDate = ds.SeriesDate = day.strftime("%Y%m%d")
        ds.InstanceNumber = i + 1
        path = root / f"{i:04d}.dcm"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom deprecates writing big endian; legacy archives hold it
            pydicom.dcmwrite(
                path,
                ds,
                implicit_vr=ts == ImplicitVRLittleEndian,
                little_endian=ts != ExplicitVRBigEndian,
                force_encoding=True,
            )
        pixels[str(ds.SOPInstanceUID)] = values.tobytes()
    return pixels


def _never_read_whole(monkeypatch, above: int = 8 << 20) -> None:
    """Reading a file over ``above`` bytes whole fails (the task, then the run)."""
    real = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self.stat().st_size > above:
            raise AssertionError(f"{self.name}: a large instance read whole")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)


def test_a_partition_of_large_instances_migrates_in_parts_end_to_end(s3_server, bucket, tmp_path, monkeypatch):
    """Normalized from the staged file (``stream_from_mb`` 1: header parsed, pixel
    data hashed and copied in chunks), uploaded from the file in parts: no
    instance is ever read whole."""
    day = dt.date(2019, 3, 1)
    (tmp_path / "big").mkdir()
    pixels = _big_archive(tmp_path / "big", day)
    pacs = SimulatedPACS(tmp_path / "big")
    try:
        cfg = migration_config(pacs.port, bucket, tmp_path / "staging", **SMALL)
        cfg = cfg.model_copy(update={"normalization": NormalizationConfig(stream_from_mb=1)})
        store = object_store(cfg, s3_server.endpoint_url)
        _never_read_whole(monkeypatch)
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
        ds = pydicom.dcmread(io.BytesIO(store.get(copy)))
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.PixelData == pixels[str(ds.SOPInstanceUID)]  # the same pixel values, little endian
    assert sorted(df["transfer_syntax_in"]) == sorted(ENCODINGS)
    rewritten = df[df["transfer_syntax_in"] != ExplicitVRLittleEndian]
    assert all(";transfer_syntax:" in f";{c}" for c in rewritten["changes"])
    assert (df["pixel_sha256_before"] == df["pixel_sha256_after"]).all()
    assert _uploads(store) == []


def test_a_normalize_process_streams_a_large_instance(tmp_path):
    """The normalize processes take the same path: the rewritten file beside
    the staged one, its pixel data the source's, little endian."""
    pixels = _big_archive(tmp_path, dt.date(2019, 3, 1))
    staged = tmp_path / "0002.dcm"  # big endian: rewritten
    ds = pydicom.dcmread(staged, stop_before_pixels=True)
    expected = InstanceUIDs(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    with NormalizeProcesses(1, STRUCTURAL, None, stream_from=1 << 20) as processes:
        result, rewritten, _ = processes.normalize(staged, expected)
    assert rewritten and result.reason is None and result.transfer_syntax_out == ExplicitVRLittleEndian
    out = pydicom.dcmread(tmp_path / "0002.dcm.out")
    assert out.PixelData == pixels[expected.sop]
    assert result.pixel_sha256_before == result.pixel_sha256_after == hashlib.sha256(out.PixelData).hexdigest()
