"""Nothing left on disk (issue 15.3): staging keyed by partition and swept of
what dead attempts left; C-GET writes received instances nowhere but the
attempt's folder; a full staging disk reported as STAGING_FULL. Real peers:
the simulated PACS, moto's S3 server; a real small tmpfs for the full disk."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from include.pacs_migration.census import take_census
from include.pacs_migration.config import TargetConfig
from include.pacs_migration.dimse import FindSession, c_get
from include.pacs_migration.manifest import PartitionManifests
from include.pacs_migration.partition import Partition
from include.pacs_migration.store import ObjectStore
from include.pacs_migration.transfer import transfer_partition
from tests.conftest import TEST_KEYER
from tests.peers import loopback_source

DATE = dt.date(2019, 3, 1)
CT = Partition(DATE, "CT")


def _transfer(pacs, s3_server, bucket, staging_root: Path, run_id: str = "staging-run", dimse_timeout: float = 30):
    store = ObjectStore(s3_server.client(), TargetConfig(bucket=bucket))
    m = PartitionManifests(store, CT)
    with FindSession(loopback_source(pacs.port)) as session:
        census = take_census(session.find, DATE)
    m.write_census(census.for_partition(CT), [])
    source = loopback_source(pacs.port).model_copy(update={"dimse_timeout": dimse_timeout})
    counts = transfer_partition(
        lambda q, c, s: c_get(source, q, c, s), store, CT, m.census(), staging_root, run_id, 2, 2, 4, keyer=TEST_KEYER
    )
    return counts, m.transfer()


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_what_a_dead_attempt_left_is_swept(pacs, s3_server, bucket, tmp_path):
    """A killed attempt's staged files (patient data) are removed by the next
    attempt on the worker, whatever its run id; the attempt leaves nothing."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = tmp_path / "staging" / CT.hive_path / "0123456789abcdef"
    left.mkdir(parents=True)
    (left / ".owner").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": time.time()}))
    (left / "00000001.dcm").write_bytes(b"a staged instance with a name inside")
    other = tmp_path / "staging" / "date=2019-03-02" / "modality=MR" / "fedcba9876543210"
    other.mkdir(parents=True)  # no marker, an hour old: a crash before the marker was written
    (other / "00000001.dcm").write_bytes(b"x")
    os.utime(other, (time.time() - 3600, time.time() - 3600))
    counts, _ = _transfer(pacs, s3_server, bucket, tmp_path / "staging")
    assert counts.migrated == counts.expected > 0
    assert _files(tmp_path / "staging") == []


_WRITES: list[str] | None = None  # paths this process opens for writing, while a test watches


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _WRITES is not None and isinstance(args[0], (str, bytes, os.PathLike)):
        mode, flags = args[1], args[2]
        if (isinstance(mode, str) and set(mode) & set("wax+")) or (flags or 0) & (os.O_WRONLY | os.O_RDWR):
            _WRITES.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # cannot be removed: it records only while _WRITES is a list


def test_a_c_get_transfer_writes_only_inside_staging(pacs, s3_server, bucket, tmp_path):
    """Every file the transfer's process opens for writing (PEP 578 audit
    events: any thread, any library) is inside the attempt's staging folder:
    received instances go straight there, no temporary elsewhere."""
    global _WRITES
    _WRITES = []
    try:
        counts, _ = _transfer(pacs, s3_server, bucket, tmp_path / "staging")
        written, _WRITES = _WRITES, None
    finally:
        _WRITES = None
    assert counts.migrated > 0
    staged = [w for w in written if w.endswith(".part")]
    assert len(staged) >= counts.migrated  # the watch saw the instances being written
    elsewhere = [w for w in written if not Path(w).resolve().is_relative_to((tmp_path / "staging").resolve())]
    assert elsewhere == [], elsewhere[:3]
    assert _files(tmp_path / "staging") == []


def test_a_full_staging_disk_is_staging_full(pacs, s3_server, bucket, small_disk):
    counts, df = _transfer(pacs, s3_server, bucket, small_disk, dimse_timeout=5)  # a receive cut by ENOSPC stalls
    missing = df[df["state"] == "unresolved"]
    assert counts.migrated > 0 and len(missing) > 0 and set(missing["reason"]) == {"STAGING_FULL"}
    assert counts.migrated + counts.unresolved + counts.quarantined == counts.expected
    assert _files(small_disk) == []  # and the attempt cleaned up after itself
