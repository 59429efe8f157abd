"""Issue 18, point 3: the clinical window enforced during a unit. At the
window's end the unit asks for no further series: what was moved is recorded
(a consistent manifest, the rest WINDOW_CLOSED), the unit stays pending with
no attempt spent, and the next night finishes it without rewriting anything."""

from __future__ import annotations

import datetime as dt
import threading

from include.pacs_migration.counts import counts_from_frame
from include.pacs_migration.manifest import PartitionManifests
from include.pacs_migration.partition import Partition
from include.pacs_migration.plan import Ledger, NightPlan, Unit, UnitState, record_night
from include.pacs_migration.steps import Services, migrate_unit
from tests.conftest import PATIENT_SECRET
from tests.faults.harness import DATE, etags, migration_config, object_store


def test_the_window_stops_a_unit_between_series_and_the_next_night_finishes_it(pacs, s3_server, bucket, tmp_path):
    cfg = migration_config(pacs.port, bucket, tmp_path / "staging")
    store = object_store(cfg, s3_server.endpoint_url)
    io = Services(cfg, store, cfg.source.max_associations, patient_secret=PATIENT_SECRET)
    unit = Unit(DATE, ("CT",), "recent")
    asked, lock = [], threading.Lock()

    def window_closed() -> bool:  # the partition may start and two series go; then the window closes
        with lock:
            asked.append(1)
            return len(asked) > 3

    first = migrate_unit(io, unit, "night-1", "pacs_nightly", window_closed)
    assert first.state is UnitState.WINDOW_CLOSED
    ct = PartitionManifests(store, Partition(DATE, "CT"))
    df = ct.transfer("night-1")
    c = counts_from_frame(df)
    assert c.conserved and 0 < c.migrated < c.expected  # consistent: what is done is done
    assert set(df.loc[df["state"] == "unresolved", "reason"]) == {"WINDOW_CLOSED"}
    assert ct.latest_verdict() is None  # not validated: not migrated yet
    # the night is window-closed, not failed; the unit pending, no attempt spent
    ledger = Ledger()
    entry = record_night(ledger, NightPlan(DATE, None, (unit,), "", 0), [first], dt.datetime.now(dt.UTC), "night-1")
    assert entry["status"] == "window-closed" and entry["failed"] == 0 and entry["window_closed"] == 1
    assert ledger.get(unit).state is UnitState.PENDING and ledger.get(unit).attempts == 0

    before = etags(store.client, bucket)
    second = migrate_unit(io, unit, "night-2", "pacs_nightly")
    assert second.state is UnitState.DONE
    df2 = ct.transfer("night-2")
    c2 = counts_from_frame(df2)
    assert c2.conserved and c2.migrated == c2.expected and ct.passed("night-2")
    assert second.migrated == c.expected - c.migrated  # only what the first night left
    after = etags(store.client, bucket)
    assert {k: after[k] for k in before} == before  # nothing moved on night 1 was rewritten
