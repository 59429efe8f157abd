"""DAG integrity (after the Astro project template): every DAG imports, has
retries, and its file stem is its dag_id."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

DAGS = Path(__file__).resolve().parents[2] / "dags"


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


def test_no_import_errors(dagbag):
    assert not dagbag.import_errors, dagbag.import_errors


def test_every_dag_file_defines_its_dag(dagbag):
    """A file defines the DAG of its stem (``pacs_nightly.py`` also one per further
    source archive, ``pacs_nightly_<name>``: none in the bundled config)."""
    stems = {p.stem for p in DAGS.glob("*.py") if not p.name.startswith("_")}
    assert stems == set(dagbag.dag_ids)
    for dag_id in dagbag.dag_ids:
        assert Path(dagbag.dags[dag_id].fileloc).stem in (dag_id, "pacs_nightly"), dag_id


def test_retries_and_schedule(dagbag):
    dag = dagbag.dags["pacs_migration"]
    assert dag.timetable.summary  # time-based: backfill needs it
    for t in dag.tasks:
        if t.task_id.endswith(("validate", "gate")):
            continue  # a failed verification must not be retried into a pass
        assert t.retries >= 1, t.task_id
    assert {"census", "report", "gate"} <= {t.task_id for t in dag.tasks}


def test_pacs_tasks_take_pool_slots(dagbag):
    """Every task that talks to the legacy PACS holds slots of its pool."""
    talks_to_pacs = {
        ("pacs_migration", "census"),
        ("pacs_migration", "partition.transfer"),
        ("pacs_assessment", "assess"),
        ("pacs_nightly", "migrate"),
    }
    for dag_id, task_id in talks_to_pacs:
        task = dagbag.dags[dag_id].get_task(task_id)
        assert task.pool == "pacs_source_associations" and task.pool_slots >= 1, (dag_id, task_id)


def test_nightly_starts_when_the_window_opens(dagbag):
    from include.pacs_migration_dags import nightly_cron

    dag = dagbag.dags["pacs_nightly"]
    cron, tz = nightly_cron()
    assert cron == "0 20 * * *" and tz == "Europe/Brussels"
    assert dag.max_active_runs == 1 and not dag.catchup
    assert {t.task_id for t in dag.tasks} == {"plan", "migrate", "progress", "gate"}


def test_every_task_has_an_execution_timeout_from_the_config(dagbag):
    """Issue 15.5: no task can hold a worker and a pool slot for ever; the
    bounds come from the config's ``timeouts`` (the models' defaults here)."""
    from include.pacs_migration.config import TimeoutsConfig

    bounds = {dt.timedelta(minutes=m) for k, m in TimeoutsConfig().model_dump().items() if k.endswith("_minutes")}
    for dag in dagbag.dags.values():
        for t in dag.tasks:
            assert t.execution_timeout in bounds, (dag.dag_id, t.task_id, t.execution_timeout)
    transfer = dagbag.dags["pacs_migration"].get_task("partition.transfer")
    assert transfer.execution_timeout == dt.timedelta(minutes=TimeoutsConfig().transfer_minutes)


def test_rollback_is_for_the_admin_alone_and_retries_resume(dagbag):
    from include.pacs_migration.roles import COMPLIANCE, OPERATOR

    dag = dagbag.dags["pacs_rollback"]
    assert not {OPERATOR, COMPLIANCE} & set(dag.access_control or {})
    assert dag.schedule is None and dag.max_active_runs == 1
    assert dag.params["dry_run"] is True  # a trigger without thinking writes nothing
    assert dag.get_task("roll_back").retries >= 1  # a retry resumes the same rollback (its id is the run's)


def test_every_task_alerts_on_failure(dagbag):
    from include.pacs_migration_airflow import FailureAlert

    for dag in dagbag.dags.values():
        for t in dag.tasks:
            callbacks = t.on_failure_callback if isinstance(t.on_failure_callback, list) else [t.on_failure_callback]
            assert any(isinstance(c, FailureAlert) for c in callbacks), (dag.dag_id, t.task_id)


def test_each_source_archive_has_its_tasks_pool_and_nightly(tmp_path, monkeypatch):
    """Issue 21: a second archive (``sources``) gets its own census, partition
    group, assess task and nightly DAG, each in its own pool with its own slots
    and window; the first source's tasks keep their ids."""
    import yaml
    from airflow.dag_processing.dagbag import DagBag

    cfg = yaml.safe_load((DAGS.parent / "include/config/migration.yaml").read_text())
    north = {**cfg["source"], "name": "north", "host": "pacs-north", "port": 104, "max_associations": 3}
    north["census_associations"] = 2  # the census and the assessment ask two studies at once
    cfg["sources"] = [{**north, "window": {"start": "22:30", "end": "04:00"}}]
    path = tmp_path / "migration.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("AIRFLOW_VAR_PACS_MIGRATION_CONFIG_PATH", str(path))
    bag = DagBag(dag_folder=str(DAGS))
    assert not bag.import_errors, bag.import_errors
    migration = bag.dags["pacs_migration"]
    pools = {t.task_id: (t.pool, t.pool_slots) for t in migration.tasks}
    assert pools["census"] == ("pacs_source_associations", 1)
    assert pools["partition.transfer"] == ("pacs_source_associations", 2)
    assert pools["census_north"] == ("pacs_source_associations_north", 2)
    assert pools["partition_north.transfer"] == ("pacs_source_associations_north", 3)
    assert migration.get_task("reports").upstream_task_ids >= {"partition.lineage", "partition_north.lineage"}
    assess = bag.dags["pacs_assessment"].get_task("assess_north")
    assert (assess.pool, assess.pool_slots) == ("pacs_source_associations_north", 2)
    nightly = bag.dags["pacs_nightly_north"]
    assert nightly.timetable.summary.startswith("30 22 * * *") and nightly.max_active_runs == 1
    migrate = nightly.get_task("migrate")
    assert (migrate.pool, migrate.pool_slots) == ("pacs_source_associations_north", 3)
    assert bag.dags["pacs_nightly"].timetable.summary.startswith("0 20 * * *")  # the first source's window


def test_a_named_first_source_keeps_the_single_source_ids(tmp_path, monkeypatch):
    """Naming the first source (for its keys: ``source=south/``) changes no task, pool or DAG id."""
    import yaml
    from airflow.dag_processing.dagbag import DagBag

    cfg = yaml.safe_load((DAGS.parent / "include/config/migration.yaml").read_text())
    cfg["source"]["name"] = "south"
    path = tmp_path / "migration.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("AIRFLOW_VAR_PACS_MIGRATION_CONFIG_PATH", str(path))
    bag = DagBag(dag_folder=str(DAGS))
    assert not bag.import_errors and "pacs_nightly" in bag.dag_ids and "pacs_nightly_south" not in bag.dag_ids
    census = bag.dags["pacs_migration"].get_task("census")
    assert census.pool == "pacs_source_associations"


def test_the_benchmarks_floor_has_the_migration_dags_shape(dagbag):
    """``make bench-scheduler`` measures Airflow's floor with ``pacs_floor``: this DAG's shape
    doing nothing. Task for task the same ids, upstreams, pools, slots, trigger rules, retries and
    timeouts, or the floor measures some other DAG."""
    from airflow.dag_processing.dagbag import DagBag

    floor = DagBag(dag_folder=str(DAGS.parent / "benchmarks" / "floor_dags"))
    assert not floor.import_errors, floor.import_errors

    def shape(dag):
        return {
            t.task_id: (
                sorted(t.upstream_task_ids),
                t.trigger_rule,
                t.pool,
                t.pool_slots,
                t.retries,
                t.execution_timeout,
                getattr(t, "map_index_template", None),
            )
            for t in dag.tasks
        }

    assert shape(floor.dags["pacs_floor"]) == shape(dagbag.dags["pacs_migration"])
