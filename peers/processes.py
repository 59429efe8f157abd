"""Airflow services as local processes, for the demo and the distributed test."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path


def local_services_env(home: Path, api_port: int, parallelism: int = 4) -> dict[str, str]:
    """What api-server, scheduler, dag-processor and their tasks share in a local
    deployment on loopback: LocalExecutor, SQLite (waiting for its lock, not
    failing), nothing paused or scheduled but what the caller backfills."""
    import secrets

    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": str(parallelism),
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.25",  # as the demo (README, Scaling)
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db?timeout=60",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "60",  # two cores shared by several services
        **SUPERVISOR_ENV,
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(16),
    }


# A task's supervisor can miss its process's exit and wait this long (Airflow's default: 5 s)
# before it looks again, holding the task's executor slot (README, Scaling: "Task ends").
SUPERVISOR_ENV = {"AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1"}
_WORKLOAD = re.compile(r"Workload finished\s+\[supervisor\] duration=([0-9.]+).*?workload_id=(\S+)")
_FINISHED = re.compile(r"TaskInstance Finished:.*?ti_id=([^,\s]+),.*?run_duration=([0-9.]+)")


def supervisor_overhangs(scheduler_log: str, worker_log: str | None = None) -> dict[str, float]:
    """Per task instance (its id): seconds its supervisor went on after the task's run
    had ended (the supervisor's "Workload finished" duration less the run's duration
    the scheduler logs). Under Celery the supervisors log in ``worker_log``."""
    runs = {m.group(1): float(m.group(2)) for m in _FINISHED.finditer(scheduler_log)}
    workloads = {m.group(2): float(m.group(1)) for m in _WORKLOAD.finditer(worker_log or scheduler_log)}
    return {ti: workloads[ti] - run for ti, run in runs.items() if ti in workloads}


def start_airflow(name: str, args: list[str], env: dict[str, str], logs: Path) -> subprocess.Popen:
    """`python -m airflow <args>` in its own session, output to ``logs/<name>.log``."""
    logs.mkdir(parents=True, exist_ok=True)
    fh = open(logs / f"{name}.log", "wb")  # noqa: SIM115 - the child keeps it open
    return subprocess.Popen(
        [sys.executable, "-m", "airflow", *args], env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
    )


def kill_tree(pid: int) -> int:
    """SIGKILL a process and every descendant, as losing its machine would: Airflow
    3.3 runs each task in a process group of its own, out of reach of ``killpg``
    on the worker's. Returns how many processes were killed."""
    import psutil

    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]  # listed before any dies: orphans are re-parented
    except psutil.NoSuchProcess:
        return 0
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(tree, timeout=30)
    return len(tree)


def stop_all(procs: list[subprocess.Popen], timeout: float = 60) -> None:
    """SIGTERM every process group, then SIGKILL what is still there after ``timeout``."""
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)


def airflow_cli(env: dict[str, str], *args: str, timeout: float = 600) -> str:
    """Run one ``airflow`` CLI command; its stdout, or RuntimeError with its output."""
    proc = subprocess.run(
        [sys.executable, "-m", "airflow", *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(f"airflow {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout


def json_rows(text: str) -> list[dict]:
    """The JSON list an ``airflow ... -o json`` command printed (it may print warnings first)."""
    for line in reversed(text.splitlines()):
        if line.startswith("[") and not line.startswith("[warning"):
            return json.loads(line)
    return []


@contextlib.contextmanager
def celery_backends(prefix: str, redis_db: int):
    """A fresh database on the local PostgreSQL (127.0.0.1:5432) and a flushed
    database of the local Redis (127.0.0.1:6379) for a CeleryExecutor deployment;
    yields (database name, SQLAlchemy DSN); both emptied and removed afterwards."""
    import secrets

    import psycopg2
    import redis

    db = f"{prefix}_{secrets.token_hex(4)}"
    admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
    admin.autocommit = True
    admin.cursor().execute(f"CREATE DATABASE {db}")
    broker = redis.Redis(host="127.0.0.1", port=6379, db=redis_db)
    broker.flushdb()
    try:
        yield db, f"postgresql+psycopg2://postgres@127.0.0.1:5432/{db}"
    finally:
        broker.flushdb()
        admin.cursor().execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        admin.close()
