"""pacs_floor (benchmark only): ``pacs_migration``'s shape for one study date with
no work in it. Through the same scheduler and executor, its wall time is what
Airflow alone costs a date of ``PACS_FLOOR_PARTITIONS`` partitions: the floor
under R_date for this DAG shape on this machine.

Same as pacs_migration: the imports and defaults of its DAG file, census in the
source pool, per partition a mapped group transfer (pool slots) -> validate
(retries 0) -> lineage (one_failed: skipped when validate passed) named by
partition, then reports -> report -> gate (all_done), each passing its small
XCom on; the tasks do nothing else.
"""

from __future__ import annotations

import datetime as dt
import os

from airflow.sdk import dag, get_current_context, task, task_group
from airflow.timetables.trigger import CronTriggerTimetable

from include.pacs_migration_airflow import default_args
from include.pacs_migration_dags import source_tasks, task_timeouts

PARTITIONS = int(os.environ.get("PACS_FLOOR_PARTITIONS", "7"))
BY_PARTITION = "{{ partition_key_label }}"
SRC = source_tasks()[0]
TIMEOUTS = task_timeouts()


def _named(part: dict) -> None:
    get_current_context()["partition_key_label"] = f"{part['study_date']}/{part['modality']}"


@dag(
    dag_id="pacs_floor",
    schedule=CronTriggerTimetable("0 0 * * *", timezone="UTC"),
    start_date=dt.datetime(1990, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    default_args=default_args(),
    tags=["benchmark"],
)
def pacs_floor():
    @task(task_id="census", pool=SRC.pool, pool_slots=SRC.census_slots, execution_timeout=TIMEOUTS["census"])
    def census() -> list[dict[str, str]]:
        day = get_current_context()["logical_date"].date().isoformat()
        return [{"study_date": day, "modality": f"M{i}", "census_sha256": "0" * 64} for i in range(PARTITIONS)]

    @task_group(group_id="partition")
    def partition(part: dict[str, str]):
        @task(
            pool=SRC.pool, pool_slots=SRC.slots, execution_timeout=TIMEOUTS["transfer"], map_index_template=BY_PARTITION
        )
        def transfer(part: dict[str, str]) -> dict:
            _named(part)
            return {"partition": part["modality"], "written": 0}

        @task(retries=0, execution_timeout=TIMEOUTS["validate"], map_index_template=BY_PARTITION)
        def validate(part: dict[str, str]) -> dict:
            _named(part)
            return {"partition": part["modality"], "success": True}

        @task(trigger_rule="one_failed", execution_timeout=TIMEOUTS["report"], map_index_template=BY_PARTITION)
        def lineage(part: dict[str, str]) -> str:
            _named(part)
            return part["modality"]

        transfer(part) >> validate(part) >> lineage(part)

    @task(trigger_rule="all_done", execution_timeout=TIMEOUTS["validate"])
    def reports() -> list[dict]:
        return []

    @task(trigger_rule="all_done", execution_timeout=TIMEOUTS["report"])
    def report() -> dict:
        return {}

    @task(trigger_rule="all_done", retries=0, execution_timeout=TIMEOUTS["report"])
    def gate() -> None:
        return None

    partition.expand(part=census()) >> reports() >> report() >> gate()


pacs_floor()
