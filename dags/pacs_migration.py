"""pacs_migration: one run per study date (the run's logical date), or, on
request, just some studies (``study_uids`` or ``accession_numbers``: a
clinician needs a patient's priors), into the same partitions.

census (C-FIND) -> per modality: transfer (retrieve, normalize, load) ->
validate (GX, then the lineage record; a lineage task only when validate
fails) -> the date's reports from the RIS and the references of its
non-image objects -> one report e-mail per run -> gate (fails the run if any
partition or the reports failed validation). Task bodies only wire the core
together.

Several legacy archives (``sources`` in the config, a consolidation): each
has its own census (``census_<name>``) and partition group
(``partition_<name>``), in its own pool (``pacs_source_associations_<name>``);
the reports, the e-mail and the gate cover them all.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

from airflow.sdk import Param, dag, get_current_context, task, task_group
from airflow.timetables.trigger import CronTriggerTimetable

from include.pacs_migration_airflow import archive_asset, default_args
from include.pacs_migration_dags import (
    ACCESS_CONTROL,
    SourceTasks,
    asset_partition_key,
    source_tasks,
    task_timeouts,
)

DAG_ID = "pacs_migration"
ARCHIVE = archive_asset()
BY_PARTITION = "{{ partition_key_label }}"  # mapped task instances are named by partition, not 0, 1, 2
LINEAGE_WRITTEN = "lineage_written"  # validate's XCom: the lineage record's key, once written


def _named(part: dict) -> None:
    """Name this mapped task instance after its partition (map_index_template)."""
    get_current_context()["partition_key_label"] = f"{part['study_date']}/{part['modality']}"


SOURCES = source_tasks()  # the legacy archives: `source`, then each of `sources`
TIMEOUTS = task_timeouts()


def _request():
    """What this run moves (a date, or requested studies); fails naming the bad param."""
    from include.pacs_migration.request import RunRequest

    ctx = get_current_context()
    logical = ctx.get("logical_date")
    return RunRequest.from_params(ctx["params"] or {}, logical.date() if logical else None)


def _source_branch(src: SourceTasks):
    """One legacy archive's census and partitions, in its own pool."""

    @task(
        task_id=src.task_id("census"), pool=src.pool, pool_slots=src.census_slots, execution_timeout=TIMEOUTS["census"]
    )
    def census() -> list[dict[str, str]]:
        from include.pacs_migration.steps import census_step, run_started
        from include.pacs_migration_airflow import date_held, recorded_failure, services

        with recorded_failure():
            io = services().for_source(src.name)
            if src is SOURCES[0]:
                run_started(io)  # audit: 110100 start (once per run)
            # One writer per date (a second run waits, then fails naming us). Each
            # partition travels with its census hash: later tasks refuse any other census.
            return census_step(io, _request(), lambda day: date_held(io, day))

    @task_group(group_id=src.task_id("partition"))
    def partition(part: dict[str, str]):
        @task(
            pool=src.pool,
            pool_slots=src.slots,
            execution_timeout=TIMEOUTS["transfer"],
            map_index_template=BY_PARTITION,
        )
        def transfer(part: dict[str, str]) -> dict:
            from include.pacs_migration.partition import Partition
            from include.pacs_migration.steps import transfer_step
            from include.pacs_migration_airflow import date_held, recorded_failure, services

            _named(part)
            p = Partition.from_json(part)
            with recorded_failure(p.key):
                # never more associations than the pool slots this task holds
                io = services(src.slots).for_source(p.source)
                with date_held(io, p.study_date):
                    run_id = get_current_context()["run_id"]
                    counts = transfer_step(
                        io, p, run_id, census_sha256=part["census_sha256"], studies=part.get("studies")
                    )
            return {"partition": p.key, **counts.to_json()}

        @task(retries=0, execution_timeout=TIMEOUTS["validate"], map_index_template=BY_PARTITION, outlets=[ARCHIVE])
        def validate(part: dict[str, str], *, outlet_events=None) -> dict:
            from airflow.sdk.exceptions import AirflowFailException

            from include.pacs_migration.manifest import LINEAGE
            from include.pacs_migration.partition import Partition
            from include.pacs_migration.steps import lineage_step, validate_step
            from include.pacs_migration_airflow import date_held, recorded_failure, services

            _named(part)
            p = Partition.from_json(part)
            run_id = get_current_context()["run_id"]
            with recorded_failure(p.key):
                io = services()
                with date_held(io, p.study_date):
                    result = validate_step(io, p, run_id, part["census_sha256"])
                    # the verdict's lineage record in this task: one task process less per partition
                    # (README, Scaling: "Scheduling"); the lineage task writes it when this one fails
                    lineage_step(io, p, run_id, DAG_ID, part.get("studies"))
                get_current_context()["ti"].xcom_push(LINEAGE_WRITTEN, io.manifests(p).key(LINEAGE))
                if not result.success:
                    failed = ", ".join(o.label for o in result.failed)
                    raise AirflowFailException(f"partition {p.key} failed validation: {failed}")
            # the Assets view: this partition of the archive is validated
            outlet_events[ARCHIVE].add_partitions(asset_partition_key(part["study_date"], part["modality"], p.source))
            return {"partition": p.key, "success": True}

        @task(trigger_rule="one_failed", execution_timeout=TIMEOUTS["report"], map_index_template=BY_PARTITION)
        def lineage(part: dict[str, str]) -> str:
            """The run's lineage record when validate did not finish (the transfer, the
            validation or the record failed); skipped when validate passed, which wrote it."""
            from include.pacs_migration.manifest import LINEAGE
            from include.pacs_migration.partition import Partition
            from include.pacs_migration.steps import lineage_step
            from include.pacs_migration_airflow import date_held, recorded_failure, services

            _named(part)
            p = Partition.from_json(part)
            with recorded_failure(p.key):
                io = services()
                key = io.manifests(p).key(LINEAGE)
                # every partition's, not this map index's alone: a missing one would log an error
                written = get_current_context()["ti"].xcom_pull(
                    f"{src.task_id('partition')}.validate", key=LINEAGE_WRITTEN
                )
                if key in ([written] if isinstance(written, str) else written or []):
                    return key  # validate wrote it, then failed the partition: one record, one event
                with date_held(io, p.study_date):
                    lineage_step(io, p, get_current_context()["run_id"], DAG_ID, part.get("studies"))
            return key

        transfer(part) >> validate(part) >> lineage(part)

    return partition.expand(part=census())


@dag(
    dag_id=DAG_ID,
    schedule=CronTriggerTimetable("0 0 * * *", timezone="UTC"),
    start_date=dt.datetime(1990, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=2,
    default_args=default_args(),
    params={
        "study_date": Param(
            None, type=["null", "string"], format="date", description="YYYY-MM-DD; default: the logical date"
        ),
        "study_uids": Param(
            [], type="array", items={"type": "string"}, description="instead of a date: these StudyInstanceUIDs"
        ),
        "accession_numbers": Param(
            [], type="array", items={"type": "string"}, description="instead of a date: these accession numbers"
        ),
        "modalities": Param([], type="array", items={"type": "string"}, description="only these; default: all"),
    },
    access_control=ACCESS_CONTROL,
    tags=["pacs", "migration"],
    doc_md=__doc__,
)
def pacs_migration():
    groups = [_source_branch(src) for src in SOURCES]

    @task(trigger_rule="all_done", execution_timeout=TIMEOUTS["validate"])
    def reports() -> list[dict]:
        """The RIS's reports of the run's dates placed in their studies, and the
        references of the dates' presentation states, KOS and SRs checked."""
        from include.pacs_migration.partition import Partition
        from include.pacs_migration.steps import reports_step
        from include.pacs_migration_airflow import date_held, recorded_failure, run_census, services

        ctx = get_current_context()
        partitions = [Partition.from_json(p) for p in run_census(ctx["ti"])[0]]
        days = {p.study_date for p in partitions}
        with contextlib.suppress(ValueError):  # (the census failed naming the parameter)
            days |= {d} if (d := _request().study_date) else set()  # a date without studies may still have reports
        out = []
        with recorded_failure():
            io = services()
            for day in sorted(days):
                with date_held(io, day):
                    out.append(reports_step(io, day, ctx["run_id"], partitions))
        return out

    @task(trigger_rule="all_done", execution_timeout=TIMEOUTS["report"])
    def report() -> dict:
        """Mails this run's figures and verdict, whatever failed before."""
        from include.pacs_migration_airflow import run_report

        try:
            label = _request().label()
        except ValueError:
            label = "(parameters not usable)"  # the census failed naming the parameter; the report says so
        return run_report(DAG_ID, label)

    @task(trigger_rule="all_done", retries=0, execution_timeout=TIMEOUTS["report"])
    def gate() -> None:
        """Fail the run unless every partition passed this run's validation and no task failed."""
        from airflow.sdk.exceptions import AirflowFailException

        from include.pacs_migration.partition import Partition
        from include.pacs_migration.reports.ledger import reports_failed
        from include.pacs_migration.steps import requested_not_found, run_ended
        from include.pacs_migration_airflow import release_date, run_census, run_failures, services

        ctx = get_current_context()
        io = services()
        found, complete = run_census(ctx["ti"])  # every source's census must have completed
        parts = [Partition.from_json(p) for p in found]
        try:
            days = {_request().study_date}
        except ValueError:
            days = set()
        for day in sorted(d for d in days | {p.study_date for p in parts} if d):
            release_date(io, day)  # the run is over, whatever it proved
        failures = run_failures(ctx["ti"])
        bad = [p.key for p in parts if not io.manifests(p).passed(ctx["run_id"])]
        bad += reports_failed(io.store, {p.study_date for p in parts}, ctx["run_id"])
        missing: list[str] = []
        with contextlib.suppress(ValueError):  # (a bad parameter failed the census, naming it)
            missing = requested_not_found(_request(), found) if complete else []
        run_ended(io, success=complete and not failures and not bad and not missing)  # audit: 110100 stop
        if not complete:
            raise AirflowFailException("census did not complete")
        if missing:
            raise AirflowFailException(f"not found at any source archive: {', '.join(missing)}")
        if failures:
            raise AirflowFailException(f"tasks failed: {'; '.join(f.label for f in failures)}")
        if bad:
            raise AirflowFailException(f"partitions not validated: {', '.join(bad)}")

    r = report()
    groups >> reports() >> r >> gate()


pacs_migration()
