"""pacs_nightly: the phased plan, one night at a time.

When the clinical window opens (``plan.window``, the hospital's local time)
it picks the next units of the plan (``plan.phases``, in order; delta checks
of migrated dates first) within the night's budgets, migrates them one after
another (one task instance per unit, named after it), starts nothing once the
window has closed and stops a unit under way at the window's end (what is done
is recorded, the rest stays pending: the night is ``window-closed``, not
failed), records the night in the ledger (``_plan/ledger.json`` in the bucket: failed units are retried on later
nights up to ``plan.max_attempts``) and e-mails the night's progress and ETA.
The ``now`` param plans as if it were that time (tests, dry runs).

Each further legacy archive (``sources`` in the config) has a nightly DAG of
its own, ``pacs_nightly_<name>``: its window (``sources[].window``, else
``plan.window``), budget, pool and ledger (``_plan/source=<name>/ledger.json``).
"""

from __future__ import annotations

import datetime as dt
import os

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

from airflow.sdk import Param, dag, get_current_context, task
from airflow.timetables.trigger import CronTriggerTimetable

from include.pacs_migration_airflow import archive_asset, assessment_asset, default_args
from include.pacs_migration_dags import (
    ACCESS_CONTROL,
    SourceTasks,
    asset_partition_key,
    nightly_cron,
    source_tasks,
    task_timeouts,
)

DAG_ID = "pacs_nightly"
ARCHIVE = archive_asset()
ASSESSMENT = assessment_asset()  # the plan's estimates come from it
TIMEOUTS = task_timeouts()


def _now() -> dt.datetime:
    """The planning clock: ``params.now`` if given, else the wall clock."""
    override = (get_current_context()["params"] or {}).get("now")
    if override:
        value = dt.datetime.fromisoformat(override)
        if value.tzinfo is None:
            raise ValueError("params.now needs a UTC offset, e.g. 2019-03-03T21:00:00+01:00")
        return value
    return dt.datetime.now(dt.UTC)


def nightly(src: SourceTasks):
    """The nightly DAG of one source archive: ``pacs_nightly``, ``pacs_nightly_<name>``."""
    dag_id = src.task_id(DAG_ID)
    cron, timezone = nightly_cron(src.name)
    slots = src.slots

    @dag(
        dag_id=dag_id,
        schedule=CronTriggerTimetable(cron, timezone=timezone),
        start_date=dt.datetime(1990, 1, 1, tzinfo=dt.UTC),
        catchup=False,
        max_active_runs=1,
        default_args=default_args(),
        params={"now": Param(None, type=["null", "string"], description="ISO datetime with offset; default: now")},
        access_control=ACCESS_CONTROL,
        tags=["pacs", "migration", "nightly", *([f"source:{src.name}"] if src.name else [])],
        doc_md=__doc__,
    )
    def pacs_nightly():
        @task(execution_timeout=TIMEOUTS["report"], inlets=[ASSESSMENT])
        def plan() -> list[dict]:
            """Tonight's units in order (the night's plan itself goes to XCom key ``night``)."""
            from include.pacs_migration.nightly import plan_night
            from include.pacs_migration_airflow import services

            now = _now()
            io = services().for_source(src.name)
            night = plan_night(io, now)
            # The migrate tasks check the window on the same clock: wall time shifted like params.now.
            offset = (now - dt.datetime.now(dt.UTC)).total_seconds()
            get_current_context()["ti"].xcom_push(key="night", value=night.to_json())
            end = night.window_end.isoformat() if night.window_end else None
            w = io.config.plan_for(io.source).window
            window = f"{w.start:%H:%M}-{w.end:%H:%M} {w.timezone}"
            return [{"unit": u.to_json(), "window_end": end, "offset": offset, "window": window} for u in night.units]

        @task(
            pool=src.pool,
            pool_slots=slots,
            execution_timeout=TIMEOUTS["transfer"],
            map_index_template="{{ unit_label }}",
            max_active_tis_per_dagrun=1,  # tonight's units one after another, in plan order
            outlets=[ARCHIVE],
        )
        def migrate(item: dict, *, outlet_events=None) -> dict:
            """One unit of tonight's plan: its own task instance (state, log,
            retries), named after the unit. It does not start once the window has
            closed (``deferred``, still pending); at the window's end it asks for no
            further series (``window_closed``: what is done is recorded, the rest
            stays pending for a later night)."""
            from include.pacs_migration.partition import Partition
            from include.pacs_migration.plan import Unit, UnitResult, UnitState
            from include.pacs_migration.steps import migrate_unit
            from include.pacs_migration_airflow import recorded_failure, services, window_deadline_missed

            unit = Unit.from_json(item["unit"])
            ctx = get_current_context()
            ctx["unit_label"] = unit.key + (" delta" if unit.kind == "delta" else "")
            end = dt.datetime.fromisoformat(item["window_end"]) if item["window_end"] else None

            def window_closed() -> bool:  # on the plan's clock (params.now shifts it)
                return end is not None and dt.datetime.now(dt.UTC) + dt.timedelta(seconds=item["offset"]) >= end

            if window_closed():
                return UnitResult.deferred(unit).to_json()
            with recorded_failure(unit.key):
                io = services(slots).for_source(src.name)
                lease = io.lease(unit.study_date, f"{dag_id}/{ctx['run_id']}")  # one writer per date
                try:
                    result = migrate_unit(io, unit, ctx["run_id"], dag_id, window_closed)
                finally:
                    lease.release()
            if result.state is UnitState.WINDOW_CLOSED:  # the night runs past its window: the operators hear now
                window_deadline_missed(ctx, window=item.get("window") or "")
            validated = [p.partition for p in result.partitions if p.validation_passed and p.counts is not None]
            if validated:  # the Assets view: these partitions of the archive are validated
                keys = [Partition.parse(k) for k in validated]
                outlet_events[ARCHIVE].add_partitions(
                    [asset_partition_key(k.study_date.isoformat(), k.modality, k.source) for k in keys]
                )
            return result.to_json()

        @task(trigger_rule="all_done", execution_timeout=TIMEOUTS["report"])
        def progress(items: list[dict] | None) -> dict:
            """Tonight into the ledger, and the progress mail (the units are the night plan's)."""
            import tempfile
            from pathlib import Path

            from include.pacs_migration.nightly import record_progress
            from include.pacs_migration.plan import NightPlan, UnitResult
            from include.pacs_migration_airflow import send_report, services

            ctx = get_current_context()
            night = ctx["ti"].xcom_pull(task_ids="plan", key="night")
            if night is None:
                raise RuntimeError("the plan task left no night plan")
            night_plan = NightPlan.from_json(night)
            done = [r for r in ctx["ti"].xcom_pull(task_ids="migrate") or [] if r]  # a failed unit returned nothing
            by_unit = {(r.unit.key, r.unit.kind): r for r in map(UnitResult.from_json, done)}
            failures = {
                f["partition"]: f["error"] for f in ctx["ti"].xcom_pull(task_ids="migrate", key="failure") or [] if f
            }
            # No result: the unit's task failed for good (its error class, from recorded_failure).
            results = [
                by_unit.get((u.key, u.kind)) or UnitResult.failed(u, failures.get(u.key, "task failed"))
                for u in night_plan.units
            ]
            io = services().for_source(src.name)
            progress = record_progress(io, night_plan, results, _now(), ctx["run_id"])
            with tempfile.TemporaryDirectory() as tmp:
                ledger_path = Path(tmp) / "ledger.json"
                ledger_path.write_bytes(progress.ledger)
                send_report(io.config, progress.subject, progress.html, [str(ledger_path)])
            return progress.entry

        @task(trigger_rule="all_done", retries=0, execution_timeout=TIMEOUTS["report"])
        def gate(entry: dict) -> None:
            """Fail the run when a unit failed tonight (it is retried on a later night)."""
            from airflow.sdk.exceptions import AirflowFailException

            if entry is None:
                raise AirflowFailException("the night was not recorded")
            if entry["failed"]:
                raise AirflowFailException(f"{entry['failed']} unit(s) failed tonight")

        planned = plan()
        entry = progress(planned)
        migrate.expand(item=planned) >> entry
        gate(entry)

    return pacs_nightly()


for _src in source_tasks():
    globals()[_src.task_id(DAG_ID)] = nightly(_src)
