"""pacs_migration: one run per study date (the run's logical date).

census (C-FIND) -> per modality: transfer (retrieve, normalize, load) ->
validate (GX) -> lineage -> one report e-mail per run -> gate (fails the run
if any partition failed validation). Task bodies only wire the core together.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import tempfile
from pathlib import Path

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

from airflow.sdk import Param, dag, get_current_context, task, task_group
from airflow.timetables.trigger import CronTriggerTimetable

DAG_ID = "pacs_migration"
# Every task that talks to the legacy PACS takes slots of this pool, one per
# association it may open: the pool's size bounds the PACS's load cluster-wide.
PACS_POOL = "pacs_source_associations"


def _associations_per_task() -> int:
    """source.max_associations from the YAML (one small file read at parse time, no DB, no
    heavy imports): the transfer task's pool slots."""
    import yaml

    try:
        data = yaml.safe_load((Path(__file__).parents[1] / "include/config/migration.yaml").read_text())
        return max(1, int(data["source"].get("max_associations", 2)))
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return 2


ASSOCIATIONS_PER_TASK = _associations_per_task()


def _study_date() -> dt.date:
    ctx = get_current_context()
    override = (ctx["params"] or {}).get("study_date")
    if override:
        return dt.date.fromisoformat(override)
    logical = ctx.get("logical_date")
    if logical is None:
        raise ValueError("params.study_date is required for a run without a logical date")
    return logical.date()


@dag(
    dag_id=DAG_ID,
    schedule=CronTriggerTimetable("0 0 * * *", timezone="UTC"),
    start_date=dt.datetime(1990, 1, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    max_active_runs=2,
    default_args={"retries": 2, "retry_delay": dt.timedelta(seconds=20), "retry_exponential_backoff": True},
    params={"study_date": Param(None, type=["null", "string"], format="date", description="YYYY-MM-DD; default: the logical date")},
    tags=["pacs", "migration"],
    doc_md=__doc__,
)
def pacs_migration():
    @task(pool=PACS_POOL, pool_slots=1)
    def census() -> list[dict[str, str]]:
        from include.pacs_migration_airflow import object_store, runtime_config
        from include.pacs_migration.census import census_hash, take_census
        from include.pacs_migration.dimse import FindSession
        from include.pacs_migration.manifest import write_census, write_json

        cfg = runtime_config()
        store = object_store(cfg)
        with FindSession(cfg.source) as session:
            result = take_census(session.find, _study_date(), cfg.source.find_limit, cfg.source.census_split_depth)
        for partition in result.partitions():
            series = result.for_partition(partition)
            write_census(store, partition, series)
            write_json(store, partition, "census.json", {
                "census_sha256": census_hash(series),
                "series": len(series),
                "instances": sum(len(s.instances) for s in series),
                "warnings": [w.code for w in result.warnings_for(partition)],
            })
        return [p.to_json() for p in result.partitions()]

    @task_group
    def partition(part: dict[str, str]):
        @task(pool=PACS_POOL, pool_slots=ASSOCIATIONS_PER_TASK)
        def transfer(part: dict[str, str]) -> dict:
            from include.pacs_migration_airflow import object_store, runtime_config
            from include.pacs_migration.dimse import retriever
            from include.pacs_migration.manifest import read_census
            from include.pacs_migration.partition import Partition
            from include.pacs_migration.transfer import transfer_partition

            cfg = runtime_config()
            store = object_store(cfg)
            p = Partition.from_json(part)
            with retriever(cfg.source) as get:
                counts = transfer_partition(
                    get=get,
                    store=store,
                    partition=p,
                    series=read_census(store, p),
                    staging_root=cfg.staging_dir,
                    run_id=get_current_context()["run_id"],
                    attempts=cfg.source.retrieve_attempts,
                    # never more associations than the pool slots this task holds
                    max_associations=min(cfg.source.max_associations, ASSOCIATIONS_PER_TASK),
                    upload_threads=cfg.target.upload_threads,
                    ruleset=cfg.ruleset,
                    source_ae=cfg.source.called_ae_title,
                )
            return {"partition": p.key, **counts.to_json()}

        @task(retries=0)
        def validate(part: dict[str, str]) -> dict:
            from airflow.sdk.exceptions import AirflowFailException

            from include.pacs_migration_airflow import object_store, runtime_config
            from include.pacs_migration.manifest import VALIDATION, read_census, read_json, read_transfer, write_json
            from include.pacs_migration.partition import Partition
            from include.pacs_migration.validate import validate_partition

            cfg = runtime_config()
            store = object_store(cfg)
            p = Partition.from_json(part)
            census_warnings = (read_json(store, p, "census.json") or {}).get("warnings", [])
            result = validate_partition(
                store, p, read_census(store, p), read_transfer(store, p), cfg.validation,
                census_warnings=census_warnings,
            )
            write_json(store, p, VALIDATION, {**result.to_json(), "run_id": get_current_context()["run_id"]})
            if not result.success:
                failed = ", ".join(o.label for o in result.failed)
                raise AirflowFailException(f"partition {p.key} failed validation: {failed}")
            return {"partition": p.key, "success": True}

        @task(trigger_rule="all_done")
        def lineage(part: dict[str, str]) -> str:
            from include.pacs_migration_airflow import emit_openlineage, endpoint_of, object_store, runtime_config
            from include.pacs_migration.lineage import lineage_record
            from include.pacs_migration.manifest import LINEAGE, VALIDATION, read_json, read_transfer, write_json
            from include.pacs_migration.partition import Partition
            from include.pacs_migration.transfer import counts_from_frame

            cfg = runtime_config()
            store = object_store(cfg)
            p = Partition.from_json(part)
            run_id = get_current_context()["run_id"]
            transfer_df = read_transfer(store, p)
            validation = read_json(store, p, VALIDATION)
            if validation is not None and validation.get("run_id") != run_id:
                validation = None  # a previous run's verdict is not this run's
            record = lineage_record(
                run_id=run_id,
                dag_id=DAG_ID,
                partition=p,
                source=cfg.source,
                census_sha256=(read_json(store, p, "census.json") or {}).get("census_sha256", ""),
                counts=counts_from_frame(transfer_df).to_json(),
                transfer=transfer_df,
                validation=validation,
                bucket=cfg.target.bucket,
                prefix=cfg.target.prefix,
                endpoint=endpoint_of(store),
                ruleset=cfg.ruleset,
            )
            write_json(store, p, f"lineage/{hashlib.sha256(run_id.encode()).hexdigest()[:16]}.json", record)
            key = write_json(store, p, LINEAGE, record)
            emit_openlineage(record)
            return key

        transfer(part) >> validate(part) >> lineage(part)

    @task(trigger_rule="all_done")
    def report() -> dict:
        from airflow.providers.smtp.hooks.smtp import SmtpHook

        from include.pacs_migration_airflow import object_store, runtime_config
        from include.pacs_migration.partition import Partition
        from include.pacs_migration.report import (
            data_docs_zip, figures_csv, partition_figures, render_html, subject,
        )

        ctx = get_current_context()
        cfg = runtime_config()
        store = object_store(cfg)
        partitions = [Partition.from_json(p) for p in ctx["ti"].xcom_pull(task_ids="census") or []]
        figures = [partition_figures(store, p, ctx["run_id"]) for p in partitions]
        study_date = _study_date().isoformat()
        html = render_html(ctx["run_id"], study_date, figures, f"s3://{cfg.target.bucket}/{cfg.target.prefix}")
        with tempfile.TemporaryDirectory() as tmp:
            csv_path = Path(tmp) / f"pacs-migration-{study_date}.csv"
            csv_path.write_text(figures_csv(figures), encoding="utf-8")
            files = [str(csv_path)]
            if partitions:
                docs = Path(tmp) / f"gx-data-docs-{study_date}.zip"
                docs.write_bytes(data_docs_zip(store, partitions))
                files.append(str(docs))
            with SmtpHook(smtp_conn_id=cfg.report.smtp_connection_id) as hook:
                hook.send_email_smtp(
                    to=list(cfg.report.recipients),
                    from_email=cfg.report.from_address,
                    subject=subject(cfg.report.subject_prefix, study_date, figures),
                    html_content=html,
                    files=files,
                )
        return {"partitions": len(figures), "emailed_to": len(cfg.report.recipients)}

    @task(trigger_rule="all_done", retries=0)
    def gate() -> None:
        """Fail the run unless every partition passed this run's validation."""
        from airflow.sdk.exceptions import AirflowFailException

        from include.pacs_migration_airflow import object_store, runtime_config
        from include.pacs_migration.manifest import VALIDATION, read_json
        from include.pacs_migration.partition import Partition

        ctx = get_current_context()
        store = object_store(runtime_config())
        parts = ctx["ti"].xcom_pull(task_ids="census")
        if parts is None:
            raise AirflowFailException("census did not complete")
        bad = []
        for part in parts:
            p = Partition.from_json(part)
            v = read_json(store, p, VALIDATION) or {}
            if v.get("run_id") != ctx["run_id"] or not v.get("success"):
                bad.append(p.key)
        if bad:
            raise AirflowFailException(f"partitions not validated: {', '.join(bad)}")

    parts = census()
    groups = partition.expand(part=parts)
    r = report()
    groups >> r >> gate()


pacs_migration()
