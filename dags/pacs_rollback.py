"""pacs_rollback: take what migration runs wrote out of the live archive,
by partition, by study or by run (admin only: no other role is granted it).

roll_back -> report. ``dry_run`` (the default) lists the counts per partition
and writes nothing. A real rollback moves every selected object to
``rolled-back/<rollback id>/`` (copy, re-read, checksum-verify, then delete the
live object), marks the partitions not migrated (manifests, nightly ledger),
records who, why, when and what, and e-mails compliance the rollback report.
A retried task resumes the same rollback. A date another run is writing is
refused, naming the run.
"""

from __future__ import annotations

import datetime as dt
import os

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

from airflow.sdk import Param, dag, task

from include.pacs_migration_airflow import default_args
from include.pacs_migration_dags import task_timeouts

DAG_ID = "pacs_rollback"
TIMEOUTS = task_timeouts()


def _list(description: str) -> Param:
    return Param([], type="array", items={"type": "string"}, description=description)


@dag(
    dag_id=DAG_ID,
    schedule=None,
    start_date=dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    default_args={**default_args(), "retry_exponential_backoff": False},
    params={
        "partitions": _list("YYYY-MM-DD/MODALITY, one per line"),
        "study_uids": _list("StudyInstanceUIDs, one per line"),
        "run_ids": _list("run ids of the runs whose writes to undo"),
        "reason": Param(None, type=["null", "string"], description="why (recorded, e-mailed; no patient data)"),
        "dry_run": Param(True, type="boolean", description="only count what would be rolled back"),
    },
    # No access_control: only migration-admin (which holds every DAG) sees or triggers it.
    tags=["pacs", "rollback"],
    doc_md=__doc__,
)
def pacs_rollback():
    @task(execution_timeout=TIMEOUTS["transfer"])
    def roll_back() -> dict:
        from include.pacs_migration_airflow import rollback_task

        return rollback_task(DAG_ID)

    @task(trigger_rule="all_done", retries=0, execution_timeout=TIMEOUTS["report"])
    def report(result: dict | None) -> dict:
        """The rollback report to compliance; an unfinished rollback is reported INCOMPLETE."""
        from airflow.sdk.exceptions import AirflowFailException

        from include.pacs_migration_airflow import rollback_report

        sent = rollback_report(DAG_ID, result)
        if result is None:  # the run must not look successful: roll_back failed
            raise AirflowFailException(f"the rollback did not complete (reported to {sent['emailed_to']} recipient(s))")
        return sent

    report(roll_back())


pacs_rollback()
