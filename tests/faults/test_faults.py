"""Issue 15, point 7: the fault suite. Each scenario runs one study date
(2019-03-01, CT and MR: 36 instances) the way ``pacs_migration`` does, with
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
    assert totals["migrated"] + totals["quarantined"] == totals["expected"] == 36
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
    assert totals["adopted"] == 1 and totals["expected"] == 35


def test_killed_during_validation_then_a_new_run(rig):
    """SIGKILL while validation writes its results; a new run waits out the dead run's lease, then converges."""
    rig.proxy.fault = lambda m, p: "hold" if m == "PUT" and "/gx/" in p else None
    rig.kill_run_when("run-1", lambda: bool(rig.proxy.held))
    before = rig.etags()
    rig.proxy.fault = None
    rig.proxy.release.set()
    started = time.monotonic()
    outcome = rig.run("run-2")
    assert time.monotonic() - started >= 5  # waited for the lease to lapse
    assert_converged(rig.direct, outcome, rig.staging, before)


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
