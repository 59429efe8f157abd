"""pacs_digest: one mail per day (or week) across all runs, to
``report.digest.recipients``: what the period validated, every partition that
failed, was partly quarantined or rolled back (reasons in plain language,
where its proof is), the rule sets that ran, the archive's totals so far.
Scheduled only when ``report.digest`` is configured; runs that are not
PASSED still mail those recipients at once. ``now`` (param): as if it were then."""

from __future__ import annotations

import datetime as dt

from airflow.sdk import Param, dag, get_current_context, task
from airflow.timetables.trigger import CronTriggerTimetable

from include.pacs_migration_airflow import default_args
from include.pacs_migration_dags import ACCESS_CONTROL, digest_cron, task_timeouts

DAG_ID = "pacs_digest"
CRON = digest_cron()


@dag(
    dag_id=DAG_ID,
    schedule=CronTriggerTimetable(CRON, timezone="UTC") if CRON else None,
    start_date=dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(),
    params={"now": Param(None, type=["null", "string"], description="ISO datetime with offset; default: now")},
    access_control=ACCESS_CONTROL,
    tags=["pacs", "report"],
    doc_md=__doc__,
)
def pacs_digest():
    @task(execution_timeout=task_timeouts()["report"])
    def digest() -> dict:
        from include.pacs_migration_airflow import send_digest

        override = (get_current_context()["params"] or {}).get("now")
        return send_digest(dt.datetime.fromisoformat(override) if override else dt.datetime.now(dt.UTC))

    digest()


pacs_digest()
