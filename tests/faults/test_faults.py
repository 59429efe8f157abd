"""Issue 15, point 7: the fault suite. Each scenario runs one study date
(2019-03-01, CT: 25 instances, one of them truncated) the way ``pacs_migration`` does, with
a fault injected, then the re-run (a retry of the same run id, or a new run),
and ends with the invariants of :func:`harness.assert_converged`:
conservation, every listed object a migrated row (adopted orphans included),
no object rewritten, no multipart upload left, staging and temp empty, the
report's figures equal to the manifests', and a verdict that is true."""

from __future__ import annotations

import itertools
import threading
import time

import pydicom
import pytest

from include.pacs_migration.config import ValidationConfig
from include.pacs_migration.manifest import PartitionManifests
from include.pacs_migration.report import RunVerdict
from include.pacs_migration.validate import validate_partition
from peers.pacs import Faults, SimulatedPACS
from tests.faults.harness import assert_converged

TRANSFER_MANIFEST = "/transfer.parquet"


def _every(n: int, first_only: bool = True):
    """A fault for every n-th instance PUT (its first attempt only, if ``first_only``)."""
    seen: dict[str, int] = {}
    counter = itertools.count(1)
    lock = threading.Lock()

    def pick(method: str, path: str) -> bool:
        if method != "PUT" or "/instances/" not in path:
            return False
        with lock:
            if path not in seen:
                seen[path] = next(counter)
                return seen[path] % n == 0
            return not first_only and seen[path] % n == 0

    return pick


# -- kills --------------------------------------------------------------------


def test_transfer_killed_after_some_uploads_then_retried(rig):
    """SIGKILL after 5 uploads, before the manifest; Airflow's retry (same run id) converges."""
    rig.proxy.fault = lambda m, p: "slow" if m == "PUT" and "/instances/" in p else None
    rig.proxy.slow_s = 0.05
    rig.kill_run_when("run-1", lambda: rig.s3_server.count(rig.bucket, "studies/") >= 5)
    assert not any(k.endswith(TRANSFER_MANIFEST) for k in rig.etags()) and rig.s3_server.count(rig.bucket, "studies/")
    before = rig.etags()
    left = [p for p in rig.staging.rglob("*.dcm")]
    rig.proxy.fault = None
    outcome = rig.run("run-1")
    totals = assert_converged(rig.direct, outcome, rig.staging, before)
    assert (totals["expected"], totals["migrated"], totals["quarantined"]) == (25, 24, 1)
    assert left, "the killed attempt left staged files for the sweep"


def test_killed_after_uploads_and_the_instance_deleted_before_the_rerun(rig):
    """The killed attempt's object for an instance the source has since deleted: an orphan, adopted."""
    rig.proxy.fault = lambda m, p: "slow" if m == "PUT" and "/instances/" in p else None
    rig.proxy.slow_s = 0.05
    rig.kill_run_when("run-1", lambda: rig.s3_server.count(rig.bucket, "studies/") >= 3)
    orphan = next(k for k in rig.etags() if k.startswith("studies/"))
    sop = orphan.rsplit("/", 1)[1].removesuffix(".dcm")
    (gone,) = [p for p in rig.root.rglob("*.dcm") if str(pydicom.dcmread(p, force=True).get("SOPInstanceUID")) == sop]
    gone.unlink()
    rig.pacs.reindex()
    before = rig.etags()
    rig.proxy.fault = None
    outcome = rig.run("run-1")
    totals = assert_converged(rig.direct, outcome, rig.staging, before)
    assert totals["adopted"] == 1 and totals["expected"] == 24


def test_killed_during_validation_then_retried(rig):
    """SIGKILL while validation writes its results; the retry converges (a new
    run would first wait out the dead run's lease: test_date_lease)."""
    rig.proxy.fault = lambda m, p: "hold" if m == "PUT" and "/gx/" in p else None
    rig.kill_run_when("run-1", lambda: bool(rig.proxy.held))
    before = rig.etags()
    rig.proxy.fault = None
    rig.proxy.release.set()
    assert_converged(rig.direct, rig.run("run-1"), rig.staging, before)


def test_killed_during_the_manifest_write_which_lands_late(rig):
    """SIGKILL while the transfer manifest's PUT is in flight; it lands after
    the retry wrote its own, and is refused (the retry's manifest stays)."""
    rig.proxy.fault = lambda m, p: "hold" if m == "PUT" and p.endswith(TRANSFER_MANIFEST) else None
    rig.kill_run_when("run-1", lambda: bool(rig.proxy.held))
    before = rig.etags()
    rig.proxy.fault = None
    outcome = rig.run("run-1")
    rig.proxy.release.set()  # the killed attempt's PUT lands now: If-Match refuses it
    time.sleep(1)
    assert rig.proxy.injected == {"hold": 1}
    assert_converged(rig.direct, outcome, rig.staging, before)


# -- S3 through the fault proxy ------------------------------------------------


@pytest.mark.parametrize(
    "action, every",
    [("503", 5), ("500", 5), ("reset", 7), ("reset_after", 7), ("slow", 9)],
    ids=["slowdown-a-fifth", "500-a-fifth", "reset-mid-body", "reset-after-store", "slower-than-the-client"],
)
def test_s3_misbehaving_on_some_puts(rig, action, every):
    """Each misbehaves on the first attempt of every n-th instance PUT: one run converges, nothing rewritten."""
    pick = _every(every)
    rig.proxy.fault = lambda m, p: action if pick(m, p) else None
    rig.proxy.slow_s = 2.5
    outcome = rig.run("run-1", read_timeout=1.0)
    totals = assert_converged(rig.direct, outcome, rig.staging, {})
    assert totals["migrated"] == 24 and rig.proxy.injected[action] >= 24 // every


def _first(kind: str):
    done = []

    def fault(method: str, path: str) -> str | None:
        hit = method == "PUT" and (
            (kind == "instance" and "/instances/" in path)
            or (kind == "quarantine" and "/quarantine/" in path)
            or (kind == "manifest" and path.endswith(TRANSFER_MANIFEST))
        )
        if hit and not done:
            done.append(path)
            return "drop"
        return None

    return fault


@pytest.mark.parametrize(
    "kind, first_verdict", [("instance", "FAILED"), ("quarantine", "FAILED"), ("manifest", "INCOMPLETE")]
)
def test_a_put_acknowledged_and_not_stored(rig, kind, first_verdict):
    """The first run's proof catches it (never PASSED); the next run repairs it."""
    rig.proxy.fault = _first(kind)
    first = rig.run("run-1")
    assert first.verdict.value == first_verdict, (first.figures, first.failures)
    assert rig.proxy.injected == {"drop": 1}
    before = rig.etags()
    rig.proxy.fault = None
    assert_converged(rig.direct, rig.run("run-2"), rig.staging, before)


def test_an_s3_outage_fails_within_its_bound_naming_s3(rig):
    """S3 answers 503 to everything after the 5th instance PUT: the run fails
    within a bounded time, the failure names S3; the retry converges."""
    puts = itertools.count(1)
    rig.proxy.fault = lambda m, p: (
        "503"
        if ("/instances/" in p and m == "PUT" and next(puts) > 5) or p.count("/") and rig.proxy.injected.get("503")
        else None
    )
    started = time.monotonic()
    first = rig.run("run-1", retry_attempts=3)
    elapsed = time.monotonic() - started
    assert first.verdict is RunVerdict.INCOMPLETE
    assert first.failures and all(f.error.startswith("S3 ") for f in first.failures), [f.label for f in first.failures]
    assert elapsed < 60, elapsed
    before = rig.etags()
    rig.proxy.fault = None
    assert_converged(rig.direct, rig.run("run-1"), rig.staging, before)


# -- the PACS, the disk, concurrency, the source --------------------------------


def test_the_pacs_killed_mid_transfer(rig):
    """The PACS dies after 5 uploads: what did not arrive is unresolved (a true
    FAILED); once it is back (another port), the next run converges."""
    rig.pacs.stop()
    rig.pacs = SimulatedPACS(rig.root, faults=Faults(stall_seconds=2, stall_times=1000))  # slow to answer each series
    watcher = threading.Thread(
        target=lambda: _wait(lambda: rig.s3_server.count(rig.bucket, "studies/") >= 5) or rig.pacs.stop(), daemon=True
    )
    watcher.start()
    first = rig.run("run-1")
    watcher.join(timeout=60)
    assert first.verdict in (RunVerdict.FAILED, RunVerdict.INCOMPLETE), first
    assert sum(f.unresolved for f in first.figures) > 0 or first.failures
    before = rig.etags()
    rig.pacs = SimulatedPACS(rig.root)
    assert_converged(rig.direct, rig.run("run-2"), rig.staging, before)


def _wait(ready, limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while not ready() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_staging_too_small_for_the_partition(rig, small_disk):
    """A 640 KiB staging disk: the CT partition's instances that found no room
    are STAGING_FULL (a true FAILED); with room, the next run converges."""
    rig.staging = small_disk
    first = rig.run("run-1")
    assert first.verdict is RunVerdict.FAILED
    ct = next(f for f in first.figures if f.partition.endswith("CT"))
    assert ct.unresolved > 0 and ct.reasons.get("STAGING_FULL") == ct.unresolved
    assert not [p for p in small_disk.rglob("*") if p.is_file()]
    before = rig.etags()
    rig.staging = small_disk.parent / "roomy"
    assert_converged(rig.direct, rig.run("run-2"), rig.staging, before)


def test_two_runs_of_the_date_at_once(rig):
    """The second waits for the first's lease, then proves the same objects
    (written 0); both verdicts true, neither overwrites the other's proof."""
    outcomes = {}
    threads = [threading.Thread(target=lambda r=r: outcomes.__setitem__(r, rig.run(r))) for r in ("run-a", "run-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    written = {r: sum(f.written for f in o.figures) for r, o in outcomes.items()}
    assert sorted(written.values()) == [0, 24], written
    first, second = sorted(outcomes.values(), key=lambda o: -sum(f.written for f in o.figures))
    assert first.verdict is RunVerdict.PASSED  # proven from its own manifests, before the second ran
    assert_converged(rig.direct, second, rig.staging, {})


def test_instances_deleted_and_changed_at_the_source_after_migration(rig):
    """The deleted one stays migrated (SOURCE_DELETED, policy keep); the changed
    one is recorded once (SOURCE_CHANGED), its live object untouched and the
    new version kept in quarantine; the re-run validates (before: failing for ever)."""
    first = rig.run("run-1")
    before = assert_converged(rig.direct, first, rig.staging, {}) and rig.etags()
    deleted, changed = sorted((rig.root / "CT01").rglob("*.dcm"))[:2]
    deleted.unlink()
    ds = pydicom.dcmread(changed)
    ds.PixelData = bytes([7]) * len(ds.PixelData)  # re-processed at the source, same UIDs
    ds.save_as(changed)
    rig.pacs.reindex()
    second = rig.run("run-2")
    assert_converged(rig.direct, second, rig.staging, before)
    (ct,) = second.figures
    assert ct.reasons.get("SOURCE_DELETED") == ct.reasons.get("SOURCE_CHANGED") == 1, ct.reasons
    assert (ct.expected, ct.migrated, ct.quarantined, ct.unsolicited) == (24, 23, 1, 0)
    # The policy "hold": the same state fails validation until someone decides.
    (p,) = second.partitions
    m = PartitionManifests(rig.direct, p)
    held = validate_partition(
        rig.direct, p, m.census(), m.transfer("run-2"), ValidationConfig(source_deleted="hold"), publish=False
    )
    assert [o.label for o in held.failed] == ["migrated:expect_column_values_to_not_be_in_set(reason)"]
