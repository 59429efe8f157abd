"""Issue 16, point 5: the least-privilege S3 policies under docs/iam/, parsed
and checked against the bucket layout the code writes."""

from __future__ import annotations

import datetime as dt
import fnmatch
import json
from pathlib import Path

import pytest

from include.pacs_migration.assessment import ASSESSMENT_PREFIX
from include.pacs_migration.audit.chain import link_key
from include.pacs_migration.config import TargetConfig
from include.pacs_migration.coverage import INDEX_KEY as COVERAGE_KEY
from include.pacs_migration.lease import PREFIX as LEASES
from include.pacs_migration.manifest import PartitionManifests, instance_key
from include.pacs_migration.partition import Partition
from include.pacs_migration.plan import LEDGER_KEY
from include.pacs_migration.reports.ledger import ReportLedger
from include.pacs_migration.store import ObjectStore
from include.pacs_migration.study_index import index_key

DOCS = Path(__file__).resolve().parents[2] / "docs" / "iam"
BUCKET = "arn:aws:s3:::hospital-pacs-archive"


def _layout() -> dict[str, str]:
    """One real key of each kind the pipeline writes."""
    store = ObjectStore(None, TargetConfig(bucket="hospital-pacs-archive"))
    m = PartitionManifests(store, Partition.parse("2019-03-01/CT"))
    return {
        "instance": instance_key("", "1.2.3", "1.2.3.4", "1.2.3.4.5"),
        "quarantine": m.quarantine_prefix + "abc.dcm",
        "manifest": m.key("transfer.parquet"),
        "audit": link_key(store, 1),
        "lease": f"{LEASES}date=2019-03-01.json",
        "ledger": LEDGER_KEY,
        "assessment": f"{ASSESSMENT_PREFIX}2019-03-01_2019-03-05/report.html",
        "study_index": index_key(store, Partition.parse("2019-03-01/CT")),
        "coverage": COVERAGE_KEY,
        "report_inbox": ReportLedger(store, dt.date(2019, 3, 1)).inbox_key("ab" * 32),
        "report_ledger": ReportLedger(store, dt.date(2019, 3, 1)).key("ledger.parquet"),
    }


def _decide(policy: dict, action: str, key: str | None) -> bool:
    """IAM's evaluation for one request (no conditions considered): an explicit Deny wins."""
    resource = f"{BUCKET}/{key}" if key is not None else BUCKET
    allowed = False
    for st in policy["Statement"]:
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        if action in actions and any(fnmatch.fnmatchcase(resource, r) for r in resources):
            if st["Effect"] == "Deny" and "Condition" not in st:
                return False
            allowed = allowed or st["Effect"] == "Allow"
    return allowed


@pytest.fixture(scope="module")
def policies() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(DOCS.glob("*.json"))}


def test_the_policies_are_well_formed(policies):
    assert set(policies) == {"writer", "reader", "auditor", "rollback", "dicomweb", "hl7-listener"}
    for name, policy in policies.items():
        assert policy["Version"] == "2012-10-17"
        for st in policy["Statement"]:
            assert st["Effect"] in ("Allow", "Deny") and st["Sid"]
            actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
            assert all(a.startswith("s3:") and "*" not in a for a in actions), (name, actions)
            resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
            assert all(r.startswith(BUCKET) for r in resources), (name, resources)


def test_what_each_principal_may_do_on_the_layout(policies):
    keys = _layout()
    w, r, a = policies["writer"], policies["reader"], policies["auditor"]
    for kind, key in keys.items():
        assert _decide(w, "s3:PutObject", key) and _decide(w, "s3:GetObject", key), kind
        assert not _decide(r, "s3:PutObject", key) and not _decide(a, "s3:PutObject", key), kind
        # deny delete on the live layout: only the writer's own lease may go
        assert _decide(w, "s3:DeleteObject", key) == (kind == "lease"), kind
        assert not _decide(w, "s3:DeleteObjectVersion", key), kind
    assert _decide(r, "s3:GetObject", keys["instance"])
    assert not any(_decide(r, "s3:GetObject", keys[k]) for k in ("quarantine", "manifest", "audit"))
    assert all(_decide(a, "s3:GetObject", keys[k]) for k in ("manifest", "audit", "ledger", "assessment"))
    assert not any(_decide(a, "s3:GetObject", keys[k]) for k in ("instance", "quarantine"))  # no images
    assert _decide(a, "s3:ListBucketVersions", None)  # audit verify looks for overwritten links
    unencrypted = [st for st in w["Statement"] if st["Effect"] == "Deny" and "Condition" in st]
    assert unencrypted and unencrypted[0]["Condition"] == {"Null": {"s3:x-amz-server-side-encryption": "true"}}


def test_the_rollback_principal_moves_objects_aside_and_keeps_the_chain_of_custody(policies):
    """docs/iam/rollback.json (Connection aws_rollback): exactly the rollback's and the purge's writes."""
    rb, keys = policies["rollback"], _layout()
    m = PartitionManifests(
        ObjectStore(None, TargetConfig(bucket="hospital-pacs-archive")), Partition.parse("2019-03-01/CT")
    )
    copy = m.rolled_back_copy("rb-1", keys["instance"])
    for kind in ("instance", "quarantine"):
        assert _decide(rb, "s3:GetObject", keys[kind]) and _decide(rb, "s3:DeleteObject", keys[kind]), kind
        assert not _decide(rb, "s3:PutObject", keys[kind]), kind  # never writes a live object
    assert _decide(rb, "s3:PutObject", copy) and _decide(rb, "s3:DeleteObject", copy)  # the copy; the purge
    assert _decide(rb, "s3:DeleteObject", keys["manifest"])  # the live transfer manifest of a whole partition
    for key in (
        m.rollback_record_key("rb-1"),
        m.rolled_back_copy("rb-1", keys["manifest"]),
        keys["audit"],
        "rolled-back/rb-1/rollback.json",
        m.key("validation.json"),
    ):
        assert not _decide(rb, "s3:DeleteObject", key), key
    assert all(_decide(rb, "s3:PutObject", k) for k in (keys["ledger"], keys["audit"], m.key("lineage.json")))
    assert not any(_decide(rb, "s3:DeleteObjectVersion", k) for k in keys.values())
    # and the migration's own principal still cannot delete a live object
    assert not _decide(policies["writer"], "s3:DeleteObject", keys["instance"])


def test_the_study_index_holds_patient_data_and_only_its_readers_see_it(policies):
    """Issue 19: the study index (names, IDs, accession numbers) is apart from the
    coverage index; the DICOMweb service reads it and the studies, writes only audit links."""
    keys, dw = _layout(), policies["dicomweb"]
    assert not any(_decide(policies[p], "s3:GetObject", keys["study_index"]) for p in ("auditor", "reader"))
    assert _decide(dw, "s3:GetObject", keys["study_index"]) and _decide(dw, "s3:GetObject", keys["instance"])
    assert _decide(dw, "s3:GetObject", keys["manifest"])  # the locator's partly/quarantined answers
    assert not _decide(dw, "s3:GetObject", keys["quarantine"])
    assert _decide(dw, "s3:PutObject", keys["audit"]) and not _decide(dw, "s3:DeleteObject", keys["audit"])
    for kind in ("instance", "quarantine", "manifest", "study_index", "coverage", "ledger", "lease"):
        assert not _decide(dw, "s3:PutObject", keys[kind]) and not _decide(dw, "s3:DeleteObject", keys[kind]), kind
    # the rollback principal keeps both indexes current; nobody deletes the study index
    rb = policies["rollback"]
    assert _decide(rb, "s3:PutObject", keys["study_index"]) and _decide(rb, "s3:PutObject", keys["coverage"])
    assert not any(_decide(policies[p], "s3:DeleteObject", keys["study_index"]) for p in policies)


def test_the_report_inbox_holds_patient_data_and_the_listener_only_adds_to_it(policies):
    """Issue 20: the RIS's messages as they arrived (names, IDs, the report) are read by
    the migration only; the MLLP listener's principal may add messages and nothing else."""
    keys, hl7 = _layout(), policies["hl7-listener"]
    assert _decide(hl7, "s3:PutObject", keys["report_inbox"]) and _decide(hl7, "s3:GetObject", keys["report_inbox"])
    for kind, key in keys.items():
        assert not _decide(hl7, "s3:DeleteObject", key), kind
        if kind != "report_inbox":
            assert not _decide(hl7, "s3:PutObject", key) and not _decide(hl7, "s3:GetObject", key), kind
    for p in ("auditor", "reader", "dicomweb"):
        assert not _decide(policies[p], "s3:GetObject", keys["report_inbox"]), p
    assert _decide(policies["auditor"], "s3:GetObject", keys["report_ledger"])  # what became of each, no patient data
