"""Issue 17: rollback and correction, on the core steps with real peers (the
simulated PACS, moto's S3 server): a rollback moves verified copies aside and
reopens the partition; a re-run under a new rule-set version writes at the
freed keys; an interrupted rollback resumes; a busy date is refused; a purge
waits for its retention and is audited."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from include.pacs_migration.audit import chain
from include.pacs_migration.config import NormalizationConfig, RollbackConfig
from include.pacs_migration.counts import counts_from_frame
from include.pacs_migration.lease import DateLease
from include.pacs_migration.manifest import PartitionManifests
from include.pacs_migration.partition import Partition
from include.pacs_migration.plan import LEDGER_KEY, Ledger, UnitRecord, UnitState
from include.pacs_migration.rollback import (
    PurgeRefused,
    RollbackLost,
    RollbackRefused,
    Selection,
    SelectionError,
    read_record,
)
from include.pacs_migration.steps import Services, purge_rolled_back, roll_back, transfer_step, validate_step
from include.pacs_migration.trace import render_trace, trace_instance
from tests.conftest import PATIENT_SECRET
from tests.faults.harness import DATE, migration_config, object_store, run_date

CT = Partition(DATE, "CT")
RULES = """
id: site-fixes
version: {version}
description: test rule set
rules:
  - id: institution
    action: set
    tag: InstitutionName
    value: "{value}"
"""


def _config(pacs, s3_server, bucket, tmp_path, version: int, **extra):
    rules = tmp_path / f"rules-v{version}.yaml"
    value = "St Elsewhere" if version == 1 else "St Elsewhere Hospital"
    rules.write_text(RULES.format(version=version, value=value))
    cfg = migration_config(pacs.port, bucket, tmp_path / "staging")
    return cfg.model_copy(update={"normalization": NormalizationConfig(ruleset=rules), **extra})


def _services(cfg, s3_server) -> Services:
    store = object_store(cfg, s3_server.endpoint_url)
    return Services(cfg, store, cfg.source.max_associations, patient_secret=PATIENT_SECRET, actor="test")


def _keys(store, prefix: str = "") -> dict[str, str]:
    out = {}
    for page in store.client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = obj["ETag"]
    return out


def _instance_keys(store) -> set[str]:
    return {k for k in _keys(store) if k.startswith(("studies/", "quarantine/"))}


def test_rollback_then_correction_under_a_new_rule_set(pacs, s3_server, bucket, tmp_path):
    v1 = _config(pacs, s3_server, bucket, tmp_path, 1)
    io = _services(v1, s3_server)
    store = io.store
    first = run_date(v1, store, "run-v1")
    assert first.verdict.value == "PASSED"
    ct = PartitionManifests(store, CT)
    before = ct.transfer()
    migrated = before[before["state"] == "migrated"]
    assert len(migrated) > 0

    # a dry run: counts per partition from the manifest, nothing written
    keys_before = _keys(store)
    dry = roll_back(io, Selection.parse(["2019-03-01/CT"]), "wrong institution", "alice", "rb-test-1")
    assert dry["dry_run"] and dry["partitions"][0]["objects"] == len(migrated)
    assert dry["partitions"][0]["instances"] == len(before) and dry["partitions"][0]["whole"]
    assert _keys(store) == keys_before

    done = roll_back(io, Selection.parse(["2019-03-01/CT"]), "wrong institution", "alice", "rb-test-1", dry_run=False)
    assert done["state"] == "complete" and done["totals"]["objects"] == len(migrated)
    # every old object: gone from the live layout, its copy under rolled-back/ verifies
    for key, sha in zip(migrated["object_key"], migrated["object_sha256"], strict=True):
        assert store.head(key) is None
        assert store.sha256_of(ct.rolled_back_copy("rb-test-1", key))[0] == sha
    assert ct.transfer_or_none() is None and not ct.latest_verdict()["success"]
    assert ct.rolled_back_transfer("rb-test-1").equals(before)  # the manifests, kept as found
    record = ct.rollback_records()[0]
    assert (record["requested_by"], record["reason"]) == ("alice", "wrong institution")
    assert record["objects"] == len(migrated)
    # the other partitions are untouched and still validated
    assert all(PartitionManifests(store, p).latest_verdict()["success"] for p in first.partitions if p != CT)
    # the audit trail says who took which studies out, and why
    events = chain.find(store, set(migrated["study_instance_uid"]))
    deleted = [e for e in events if e["event"] == "DICOM Study Deleted"]
    assert deleted and "wrong institution" in deleted[0]["description"]

    # correction: the same date under rule set v2 writes new objects at the freed keys
    v2 = _config(pacs, s3_server, bucket, tmp_path, 2)
    second = run_date(v2, store, "run-v2")
    passed = {f.partition: f.validation_passed for f in second.figures}
    # CT passes; the partitions not rolled back now differ from what v2 makes of them: UID_CONFLICT, not overwritten
    assert passed == {p.key: p == CT for p in second.partitions}, second.failures
    after = ct.transfer("run-v2")
    c = counts_from_frame(after)
    assert c.conserved and c.written == len(migrated) and c.quarantined == 0
    assert set(after[after["state"] == "migrated"]["object_key"]) == set(migrated["object_key"])
    lineage = ct.lineage()
    assert lineage["ruleset"]["version"] == "2"
    link = lineage["supersedes"][0]
    assert link["rollback_id"] == "rb-test-1" and link["runs"] == [{"run_id": "run-v1", "ruleset": "site-fixes@1"}]
    assert json.loads(store.get(link["lineage"]))["run_id"] == "run-v1"  # v1's lineage, kept with the copies

    # trace: first migration, rollback, re-migration
    sop = migrated["sop_instance_uid"].iloc[0]
    t = trace_instance(store, sop)
    assert [e["event"] for e in t["history"]] == ["migrated", "rolled_back", "migrated"]
    assert [e.get("ruleset") for e in t["history"]] == ["site-fixes@1", None, "site-fixes@2"]
    assert t["history"][1]["by"] == "alice" and t["state"] == "migrated"
    text = render_trace(t)
    assert "rolled back by rb-test-1" in text and "site-fixes@2" in text

    # a second run of the same rollback id changes nothing more
    again = roll_back(io, Selection.parse(["2019-03-01/CT"]), "wrong institution", "alice", "rb-test-1", dry_run=False)
    assert again["resumed"] and store.head(after["object_key"].iloc[0]) is not None


def test_interrupted_rollback_resumes_to_completion(pacs, s3_server, bucket, tmp_path):
    cfg = _config(pacs, s3_server, bucket, tmp_path, 1)
    io = _services(cfg, s3_server)
    assert run_date(cfg, io.store, "run-1").verdict.value == "PASSED"
    df = PartitionManifests(io.store, CT).transfer()
    live = set(df["object_key"].dropna())
    moved = []

    def crash_after_three(obj):
        moved.append(obj.key)
        if len(moved) == 3:
            raise KeyboardInterrupt  # the task killed between two objects

    sel = Selection.parse(["2019-03-01/CT"])
    with pytest.raises(KeyboardInterrupt):
        roll_back(io, sel, "test", "bob", "rb-crash", dry_run=False, moved_hook=crash_after_three)
    assert read_record(io.store, "rb-crash")["state"] == "in_progress"
    # never neither: each object is live or has its copy
    ct = PartitionManifests(io.store, CT)
    for key in live:
        assert io.store.head(key) is not None or io.store.head(ct.rolled_back_copy("rb-crash", key)) is not None
    # the leases were given back: a resume is not refused by itself
    result = roll_back(io, sel, "test", "bob", "rb-crash", dry_run=False)
    assert result["resumed"] and result["state"] == "complete"
    for key in live:
        assert io.store.head(key) is None and io.store.head(ct.rolled_back_copy("rb-crash", key)) is not None
    # a copy lost behind our back is a loud failure, not a silent skip
    io.store.delete(ct.rolled_back_copy("rb-crash", sorted(live)[0]))
    journal = read_record(io.store, "rb-crash")
    journal.update(state="in_progress", steps={})
    io.store.put(ct.store.target.key("rolled-back/rb-crash/rollback.json"), json.dumps(journal).encode(), "x")
    with pytest.raises(RollbackLost):
        roll_back(io, sel, "test", "bob", "rb-crash", dry_run=False)


def test_a_date_another_run_writes_is_refused_and_bad_requests_name_their_field(pacs, s3_server, bucket, tmp_path):
    cfg = _config(pacs, s3_server, bucket, tmp_path, 1)
    io = _services(cfg, s3_server)
    assert run_date(cfg, io.store, "run-1").verdict.value == "PASSED"
    before = _keys(io.store)
    lease = DateLease(io.store, DATE, "pacs_migration/manual__2026-12-06").acquire()
    try:
        with pytest.raises(RollbackRefused, match="pacs_migration/manual__2026-12-06"):
            roll_back(io, Selection.parse(["2019-03-01/CT"]), "x", "alice", "rb-busy", dry_run=False)
    finally:
        lease.release()
    assert _keys(io.store) == before  # refused before anything moved
    for args, field in (
        ((["2019-3-01/CT"],), "partitions[0]"),
        (([], ["1.2.3.abc"]), "study_uids[0]"),
        (((),), "selection"),
    ):
        with pytest.raises(SelectionError) as err:
            Selection.parse(*args)
        assert err.value.field == field
    with pytest.raises(SelectionError, match="reason"):
        roll_back(io, Selection.parse(["2019-03-01/CT"]), " ", "alice", "rb-x")
    with pytest.raises(SelectionError, match="2019-03-05/CT has no transfer manifest"):
        roll_back(io, Selection.parse(["2019-03-05/CT"]), "x", "alice", "rb-x")
    with pytest.raises(SelectionError, match="matches no row"):
        roll_back(io, Selection.parse(run_ids=["no-such-run"]), "x", "alice", "rb-x")


def test_study_rollback_reopens_the_unit_and_a_delta_run_moves_just_it(pacs, s3_server, bucket, tmp_path):
    cfg = _config(pacs, s3_server, bucket, tmp_path, 1, rollback=RollbackConfig(retention_days=30))
    io = _services(cfg, s3_server)
    assert run_date(cfg, io.store, "run-1").verdict.value == "PASSED"
    ledger = Ledger({f"{DATE.isoformat()}|*": UnitRecord(UnitState.DONE, 1, "p1", "night-1", 10)})
    io.store.put(LEDGER_KEY, ledger.to_bytes(), "application/json")
    ct = PartitionManifests(io.store, CT)
    df = ct.transfer()
    study = sorted(df["study_instance_uid"].unique())[0]
    mine = df[df["study_instance_uid"] == study]
    result = roll_back(io, Selection.parse(study_uids=[study]), "one study", "carol", "rb-study", dry_run=False)
    assert result["totals"] == {**result["totals"], "partitions": 1, "studies": 1, "objects": len(mine)}
    live = ct.transfer()
    assert study not in set(live["study_instance_uid"]) and len(live) == len(df) - len(mine)
    assert not ct.latest_verdict()["success"]
    reopened = Ledger.from_bytes(io.store.get(LEDGER_KEY))
    assert reopened.units[f"{DATE.isoformat()}|*"].state is UnitState.PENDING
    assert reopened.rollbacks[0]["rollback_id"] == "rb-study"

    # the nightly's delta run retrieves only that study's series, rewrites nothing else
    counts = transfer_step(io, CT, "delta-1", resume=True, census_sha256=ct.summary().census_sha256)
    assert counts.written == len(mine) and counts.conserved
    assert validate_step(io, CT, "delta-1", ct.summary().census_sha256).success

    # purge: refused within the retention, then audited
    with pytest.raises(PurgeRefused, match="rollback.retention_days: 30"):
        purge_rolled_back(io, "rb-study", "dave", "retention passed")
    io0 = _services(cfg.model_copy(update={"rollback": RollbackConfig(retention_days=0)}), s3_server)
    purged = purge_rolled_back(io0, "rb-study", "dave", "retention passed")
    assert purged["state"] == "purged"
    assert not [k for k in _keys(io.store, "rolled-back/rb-study/studies/")]
    assert ct.rolled_back_transfer("rb-study") is not None  # the manifests stay: the chain of custody
    events = [e for e in chain.find(io.store, {study}) if e["event"] == "DICOM Study Deleted"]
    assert len(events) == 2 and "purge" in events[1]["description"]
    assert chain.verify(io.store, chain.schema_validator()).ok  # 110105 as the DICOM schema has it
    assert dt.datetime.fromisoformat(read_record(io.store, "rb-study")["purged_at"])


def _cli(*args: str, endpoint: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "include.cli", *args, "--endpoint-url", endpoint, "--region", "us-east-1"]


def test_a_rollback_killed_halfway_resumes_to_completion(pacs, s3_server, bucket, tmp_path):
    """The rollback process SIGKILLed between two objects (S3 deletes slowed by
    a proxy so that the kill lands mid-way), then run again with its id: every
    object ends under rolled-back/ (verified), none live, none lost."""
    import os
    import signal
    import subprocess
    import time

    from tests.conftest import ROOT
    from tests.s3_faults import S3FaultProxy

    cfg = _config(pacs, s3_server, bucket, tmp_path, 1)
    store = _services(cfg, s3_server).store
    assert run_date(cfg, store, "run-1").verdict.value == "PASSED"
    ct = PartitionManifests(store, CT)
    live = dict(zip(ct.transfer()["object_key"], ct.transfer()["object_sha256"], strict=True))
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "PYTHONPATH": str(ROOT)}
    args = ("rollback", "--bucket", bucket, "--partition", "2019-03-01/CT", "--reason", "wrong rule", "--user", "erin")
    proxy = S3FaultProxy(
        s3_server.endpoint_url,
        fault=lambda m, path: "slow" if m == "DELETE" and "/studies/" in path else None,
        slow_s=0.4,
    )
    try:
        cmd = _cli(*args, "--id", "rb-kill", "--execute", endpoint=proxy.endpoint_url)
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            copies = [k for k in _keys(store, "rolled-back/rb-kill/studies/")]
            if len(copies) >= 4:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-2000:]
    finally:
        proxy.stop()
    journal = read_record(store, "rb-kill")
    assert journal["state"] == "in_progress" and journal["steps"] == {"2019-03-01/CT": "snapshot"}
    still = [k for k in live if store.head(k) is not None]
    assert 0 < len(still) < len(live)  # killed halfway
    for key in live:  # never neither
        assert store.head(key) is not None or store.head(ct.rolled_back_copy("rb-kill", key)) is not None

    # run again with its id (no proxy): it resumes and completes
    def cli(*more: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            _cli(*more, endpoint=s3_server.endpoint_url), env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
        )

    done = cli(*args, "--id", "rb-kill", "--execute", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["resumed"] and result["state"] == "complete" and result["totals"]["objects"] == len(live)
    for key, sha in live.items():  # never both: the live object is gone once its copy verified
        assert store.head(key) is None and store.sha256_of(ct.rolled_back_copy("rb-kill", key))[0] == sha
    # the trace of one instance tells its history (the lookup itself is audited)
    sop = ct.rolled_back_transfer("rb-kill")["sop_instance_uid"].iloc[0]
    trace = cli("trace", sop, "--bucket", bucket, "--reason", "test")
    assert trace.returncode == 0, trace.stderr[-2000:]
    assert (
        "state             rolled_back" in trace.stdout and "rolled back by rb-kill (erin: wrong rule)" in trace.stdout
    )
    listed = cli("rollbacks", "--bucket", bucket)  # every rollback of the bucket, one line each
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert (
        listed.stdout.startswith("rb-kill  complete")
        and "erin: 24 object(s) of 1 partition(s); wrong rule" in listed.stdout
    )


def test_the_ledger_is_changed_only_over_the_version_read(s3_server, bucket, tmp_path):
    """A rollback reopening units while the nightly records its night: neither loses the other's change."""
    from include.pacs_migration.ledger_store import read_ledger, update_ledger
    from include.pacs_migration.plan import reopen

    cfg = migration_config(1, bucket, tmp_path / "staging")
    store = object_store(cfg, s3_server.endpoint_url)
    store.put(LEDGER_KEY, Ledger({"2019-03-01|*": UnitRecord(UnitState.DONE, 1, "p1")}).to_bytes(), "application/json")
    calls = []

    def night(ledger):
        calls.append(1)
        if len(calls) == 1:  # a rollback writes between our read and our write
            update_ledger(store, lambda other: reopen(other, [(DATE, "CT")], "rb-race", dt.datetime.now(dt.UTC)))
        ledger.nights.append({"night": "2019-03-05"})

    update_ledger(store, night)
    final = read_ledger(store)
    assert len(calls) == 2  # our first write was refused, the change applied again on the fresh ledger
    assert final.nights == [{"night": "2019-03-05"}] and final.rollbacks[0]["rollback_id"] == "rb-race"
    assert final.units["2019-03-01|*"].state is UnitState.PENDING
