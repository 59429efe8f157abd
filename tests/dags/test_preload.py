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


@pytest.mark.parametrize(
    ("argv", "executor", "expected"),
    [
        (["airflow", "dag-processor"], "LocalExecutor", True),  # a fork per DAG file parse
        (["airflow", "scheduler"], "LocalExecutor", True),  # its tasks parse their DAG file
        (["airflow", "celery", "worker"], "CeleryExecutor", True),
        (["airflow", "scheduler"], "CeleryExecutor", False),
        (["airflow", "api-server"], "LocalExecutor", False),
        (["airflow", "dags", "reserialize"], "LocalExecutor", False),
        (["pytest"], "LocalExecutor", False),
    ],
)
def test_the_processes_whose_forks_parse_dags_warm_parsing(argv, executor, expected):
    from airflow_local_settings import parses_dags

    assert parses_dags(argv, executor) is expected


@pytest.mark.parametrize("argv", [["airflow", "dag-processor"], ["airflow", "scheduler"]])
def test_a_fork_that_parses_finds_imported_what_every_parse_would_import_again(tmp_path, argv):
    """Each parse is a fork (the DAG processor's per file, a task's of its DAG file):
    before its first fork the process imports Airflow's DagBag module and lazily
    loaded decorators, the ``s3://`` asset handlers (the Amazon provider's module,
    boto3) and our DAG-side modules, so a parse does not; the parse still sees the
    configuration file as it is then, and finds every DAG."""
    config = tmp_path / "migration.yaml"
    config.write_text((ROOT / "include" / "config" / "migration.yaml").read_text())
    code = """
import os, sys, json, time
sys.argv = ARGV
import airflow, airflow_local_settings as A
WATCHED = ("airflow.providers.amazon.aws.assets.s3", "include.pacs_migration_dags", "include.pacs_migration_airflow",
           "airflow.dag_processing.dagbag")

def in_a_fork():
    r, w = os.pipe()
    if os.fork() == 0:  # as the DAG processor forks a parse
        try:
            held = {m: m in sys.modules for m in WATCHED}
            from airflow.dag_processing.dagbag import DagBag
            bag = DagBag(dag_folder=os.path.join(os.environ["ROOT"], "dags"))
            from include.pacs_migration_dags import asset_uris
            os.write(w, json.dumps({"held": held, "dags": len(bag.dags), "errors": sorted(bag.import_errors),
                                     "uri": asset_uris()["pacs_archive"]}).encode())
        except BaseException:
            import traceback
            os.write(w, json.dumps({"failed": traceback.format_exc()}).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.wait()
    return json.loads(data)

before = {m: m in sys.modules for m in WATCHED}
first = in_a_fork()
path = os.environ["AIRFLOW_VAR_PACS_MIGRATION_CONFIG_PATH"]
text = open(path).read()
assert "bucket: pacs-archive" in text
open(path, "w").write(text.replace("bucket: pacs-archive", "bucket: another-bucket"))
os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
second = in_a_fork()
A._PRELOADED[next(f for f in A._PRELOADED if f.endswith("pacs_migration_dags.py"))] -= 1  # as if it changed
third = in_a_fork()
print(json.dumps({"before": before, "first": first, "second": second, "third": third,
                  "parent": {m: m in sys.modules for m in WATCHED}}))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code.replace("ARGV", repr(argv))],
        env={**os.environ, "PYTHONPATH": str(ROOT), "ROOT": str(ROOT), "AIRFLOW_HOME": str(tmp_path),
             "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
             "AIRFLOW_VAR_PACS_MIGRATION_CONFIG_PATH": str(config)},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not any(out["before"].values()), out["before"]  # nothing of it while Airflow initializes
    assert "failed" not in out["first"], out["first"].get("failed")
    assert all(out["first"]["held"].values()), out["first"]["held"]  # the parse found it imported
    assert all(out["parent"].values())
    assert out["first"]["errors"] == [] and out["first"]["dags"] >= 5, out["first"]
    # The parse after the file changed reads the file as it is now, not a copy the processor kept.
    assert out["first"]["uri"].startswith("s3://pacs-archive/"), out["first"]["uri"]
    assert out["second"]["uri"].startswith("s3://another-bucket/"), out["second"]["uri"]
    # A DAG-side module of ours changed on disk since: the parse imports the code now there.
    assert out["third"]["held"]["include.pacs_migration_dags"] is False, out["third"]
    assert out["third"]["errors"] == [] and out["third"]["dags"] == out["first"]["dags"]
    assert "not warmed up" not in proc.stderr


def test_no_warm_parsing_when_turned_off(tmp_path):
    code = (
        "import os, sys; sys.argv = ['airflow', 'dag-processor']; import airflow, airflow_local_settings as A; "
        "pid = os.fork()\nif pid == 0: os._exit(0)\nos.waitpid(pid, 0); "
        "print('include.pacs_migration_dags' in sys.modules, A._PARSING_WARM)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT), "AIRFLOW_HOME": str(tmp_path), "PACS_PRELOAD": "0"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["False", "False"]
