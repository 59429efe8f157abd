"""Issue 20 with issue 17: a study's reports from the RIS leave the live layout
with its last instance (verified copies, the ledger says they wait for their
study again, the index forgets them) and come back when a run migrates the
study again; a study that keeps instances keeps its reports."""

from __future__ import annotations

import datetime as dt
import hashlib

from include.pacs_migration.manifest import PartitionManifests
from include.pacs_migration.partition import Partition
from include.pacs_migration.reports.ledger import ReportLedger
from include.pacs_migration.rollback import Selection
from include.pacs_migration.steps import Services, reports_step, roll_back
from include.pacs_migration.study_index import read_partition
from peers.pacs import SimulatedPACS
from tests.conftest import PATIENT_SECRET
from tests.faults.harness import migration_config, object_store, run_date
from tests.ris import clinical_day, with_export

DAY = dt.date(2019, 3, 2)


def _migrate(services: Services, run_id: str) -> None:
    outcome = run_date(services.config, services.store, run_id, DAY)
    reports_step(services, DAY, run_id, list(outcome.partitions))


def test_reports_leave_with_their_study_and_come_back_with_it(s3_server, bucket, tmp_path):
    summary, _added, messages = clinical_day(tmp_path, DAY, dangling=False)
    pacs = SimulatedPACS(summary.root)
    try:
        cfg = with_export(migration_config(pacs.port, bucket, tmp_path / "staging"), tmp_path / "ris")
        store = object_store(cfg, s3_server.endpoint_url)
        services = Services(cfg, store, cfg.source.max_associations, patient_secret=PATIENT_SECRET, actor="test")
        _migrate(services, "run-1")
        ledger = ReportLedger(store, DAY)
        before = ledger.read()
        amended = before[before["message_sha256"] == hashlib.sha256(messages["amended"][1]).hexdigest()].iloc[0]
        study = str(amended["study_instance_uid"])
        mine = before[before["study_instance_uid"] == study]
        hashes = {
            r[f"{kind}_key"]: r[f"{kind}_sha256"]
            for r in mine.to_dict("records")
            for kind in ("sr", "pdf")
            if isinstance(r[f"{kind}_key"], str)
        }
        keys = sorted(hashes)
        assert len(keys) == 2  # the report and its amendment

        # A study that keeps instances keeps its reports: the KOS alone goes.
        ko = roll_back(services, Selection.parse(partitions=[f"{DAY}/KO"]), "bad KOS", "alice", "rb-ko", dry_run=True)
        assert [p["partition"] for p in ko["partitions"]] == [f"{DAY}/KO"]

        plan = roll_back(services, Selection.parse(study_uids=[study]), "wrong patient", "alice", "rb-1", dry_run=True)
        ris = [p for p in plan["partitions"] if p["partition"] == f"{DAY}/RIS"]
        assert len(ris) == 1 and ris[0]["objects"] == 2 and ris[0]["studies"] == 1
        assert all(store.head(k) is not None for k in keys)  # a dry run moves nothing
        done = roll_back(services, Selection.parse(study_uids=[study]), "wrong patient", "alice", "rb-1", dry_run=False)
        assert done["state"] == "complete"
        manifests = PartitionManifests(store, Partition(DAY, "RIS"))
        for key in keys:
            assert store.head(key) is None
            copy = manifests.rolled_back_copy("rb-1", key)
            assert store.sha256_of(copy)[0] == hashes[key]  # a verified copy
        after = ledger.read()
        theirs = after[after["study_instance_uid"] == study]
        assert set(theirs["state"]) == {"unmatched"} and set(theirs["reason"]) == {"REPORT_NO_MATCHING_STUDY"}
        others = after[after["study_instance_uid"] != study]
        assert others.equals(before[before["study_instance_uid"] != study])  # untouched
        index = read_partition(store, Partition(DAY, "RIS"))
        assert study not in set(index["StudyInstanceUID"]) and len(index) > 0
        assert store.head(ledger.key("rollbacks/rb-1.json")) is not None

        # The next run migrates the study again, and its reports with it: the same objects.
        _migrate(services, "run-2")
        again = ledger.read()
        assert set(again[again["study_instance_uid"] == study]["state"]) == {"migrated"}
        assert sorted(k for k in [*again["sr_key"], *again["pdf_key"]] if k in keys) == keys
        assert all(store.head(k) is not None for k in keys)
        assert study in set(read_partition(store, Partition(DAY, "RIS"))["StudyInstanceUID"])
    finally:
        pacs.stop()
