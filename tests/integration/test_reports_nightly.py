"""Issue 20 in the nightly path: a unit places its date's reports once its
partitions are in, and a dangling reference fails the unit (its KO partition),
while the rest of the date stays migrated and validated."""

from __future__ import annotations

import datetime as dt

from include.pacs_migration.plan import Unit, UnitState
from include.pacs_migration.reports.ledger import ReportLedger
from include.pacs_migration.reports.place import ReportCounts
from include.pacs_migration.steps import Services, migrate_unit
from peers.pacs import SimulatedPACS
from tests.conftest import PATIENT_SECRET
from tests.faults.harness import migration_config, object_store
from tests.ris import clinical_day, with_export

DAY = dt.date(2019, 3, 2)


def test_a_night_places_the_reports_and_a_dangling_reference_fails_the_unit(s3_server, bucket, tmp_path):
    summary, added, messages = clinical_day(tmp_path, DAY, dangling=True)
    pacs = SimulatedPACS(summary.root)
    try:
        cfg = with_export(migration_config(pacs.port, bucket, tmp_path / "staging"), tmp_path / "ris")
        store = object_store(cfg, s3_server.endpoint_url)
        io = Services(cfg, store, cfg.source.max_associations, patient_secret=PATIENT_SECRET)
        result = migrate_unit(io, Unit(DAY, None, "recent"), "night-1", "pacs_nightly")
    finally:
        pacs.stop()
    assert result.state is UnitState.FAILED
    failed = {r.partition for r in result.partitions if not r.validation_passed}
    assert failed == {f"{DAY.isoformat()}/KO"}, failed  # the KOS naming {added.dangling}
    c = ReportCounts.of(ReportLedger(store, DAY).read())
    in_folder = [n for n in messages if not n.startswith("live-")]
    assert c.expected == len(in_folder) and c.conserved and c.migrated > 0 and c.rejected == 1
    assert ReportLedger(store, DAY).verdict("night-1")["success"] and added.kos
