"""``airflow_local_settings.py``: the processes that fork tasks (the scheduler
under the LocalExecutor, a Celery worker) import GX and the core once, so no
task imports them again; no other Airflow process does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from airflow_local_settings import forks_tasks  # noqa: E402 - the module Airflow loads from PYTHONPATH


@pytest.mark.parametrize(
    ("argv", "executor", "expected"),
    [
        (["airflow", "scheduler"], "LocalExecutor", True),
        (["airflow", "scheduler"], "airflow.executors.local_executor.LocalExecutor", True),
        (["airflow", "scheduler"], "CeleryExecutor,LocalExecutor", True),
        (["airflow", "scheduler"], "CeleryExecutor", False),  # its tasks run on the workers
        (["airflow", "celery", "worker", "--skip-serve-logs"], "CeleryExecutor", True),
        (["airflow", "celery", "flower"], "CeleryExecutor", False),
        (["airflow", "api-server"], "LocalExecutor", False),
        (["airflow", "dag-processor"], "LocalExecutor", False),
        (["airflow", "dags", "test", "pacs_migration"], "LocalExecutor", False),
        (["pytest"], "LocalExecutor", False),
    ],
)
def test_only_the_processes_that_fork_tasks_preload(argv, executor, expected):
    assert forks_tasks(argv, executor) is expected


def _airflow_imported_as(argv: list[str], **env: str) -> tuple[dict, str]:
    """``import airflow`` in a fresh process whose command line is ``argv``:
    which heavy modules it then holds, and its stderr."""
    code = (
        f"import sys; sys.argv = {argv!r}; import airflow, json; "
        "held = {m: m in sys.modules for m in ('great_expectations', 'pydicom', 'pynetdicom', "
        "'include.pacs_migration.steps', 'include.pacs_migration.validate')}; "
        "held['warmed'] = len(getattr(sys.modules.get('include.pacs_migration.gx_views'), 'TEMPLATES', ())); "
        "print(json.dumps(held))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_airflow_loads_the_preload_in_a_local_scheduler(tmp_path):
    held, err = _airflow_imported_as(
        ["airflow", "scheduler"], AIRFLOW__CORE__EXECUTOR="LocalExecutor", AIRFLOW_HOME=str(tmp_path)
    )
    warmed = held.pop("warmed")
    assert all(held.values()), held
    assert warmed >= 10, warmed  # Data Docs' templates compiled once here, for every validate task
    assert "pacs-migration: modules for tasks preloaded in" in err
    assert "not warmed up" not in err
    assert "Skipping registering function" not in err  # GX's import chatter kept out of the logs


def test_no_preload_elsewhere_or_when_turned_off(tmp_path):
    home = {"AIRFLOW_HOME": str(tmp_path)}
    held, err = _airflow_imported_as(["airflow", "api-server"], AIRFLOW__CORE__EXECUTOR="LocalExecutor", **home)
    assert not held["great_expectations"] and not held["include.pacs_migration.steps"], held
    held, err = _airflow_imported_as(["airflow", "scheduler"], AIRFLOW__CORE__EXECUTOR="CeleryExecutor", **home)
    assert not held["great_expectations"], held
    held, err = _airflow_imported_as(
        ["airflow", "celery", "worker"], AIRFLOW__CORE__EXECUTOR="CeleryExecutor", PACS_PRELOAD="0", **home
    )
    assert not held["great_expectations"] and "preloaded" not in err, held


def test_a_fork_forgets_preloaded_core_modules_whose_files_changed(tmp_path):
    """A worker keeps running while ``include/`` changes (a new checkout): its next
    task must import the code on disk, not run the preloaded version beside a new
    DAG file. Unchanged files: the task keeps the preloaded modules."""
    code = """
import os, sys, json
sys.argv = ["airflow", "scheduler"]
import airflow, airflow_local_settings as A

def child_holds():
    r, w = os.pipe()
    if os.fork() == 0:
        held = "include.pacs_migration.steps" in sys.modules
        import include.pacs_migration.steps, include.pacs_migration.validate  # what a task then imports
        os.write(w, json.dumps(held).encode())
        os._exit(0)
    os.close(w)
    answer = json.loads(os.read(r, 100))
    os.wait()
    return answer

unchanged = child_holds()
some = next(iter(A._PRELOADED))
A._PRELOADED[some] -= 1  # as if that file had changed since the preload
changed = child_holds()
print(json.dumps({"unchanged": unchanged, "changed": changed, "parent": "include.pacs_migration.steps" in sys.modules}))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT), "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
             "AIRFLOW_HOME": str(tmp_path)},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    held = json.loads(proc.stdout.strip().splitlines()[-1])
    assert held == {"unchanged": True, "changed": False, "parent": True}, held
