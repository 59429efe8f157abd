"""Airflow's own overhead (issue #8, item 3): the same study date moved by the
``pacs_migration`` DAG under ``dag.test()`` and by the same steps called as
plain Python, each in a fresh process, against the same Orthanc, a fresh moto
and a real SMTP sink.

- steps: :func:`include.pacs_migration.steps.migrate_unit` for the date: census,
  then per partition transfer, validate (GX) and lineage; one process.
- dag: ``DagBag`` + ``dag.test()`` of ``pacs_migration`` (serial, in-process
  task runs; a scheduler with an executor would run partitions in parallel).
  Its task durations come from the run's task instances.

Airflow overhead = T_dag(census, transfer, validate, lineage) - T_steps, split
into time inside those tasks (task start, config and clients per task, XCom)
and time between them (parse, scheduling loop, database). The report and gate
tasks (the e-mail) have no counterpart in the steps run and are shown apart.

:func:`measure_scheduler` (issue 22, point 5) runs the date the way a backfill
does: ``airflow backfill create`` with api-server, scheduler and dag-processor
running and the LocalExecutor (each task a supervised process, partitions in
parallel), interleaved with the steps run; per task instance it reads from the
metadata database how long each task ran and how long it waited between being
scheduled and starting.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FLOOR_DAGS = ROOT / "benchmarks" / "floor_dags"  # pacs_floor: this DAG's shape, no work
SAME_STEPS = ("census", "transfer", "validate", "lineage")


def _env(home: Path, port: int, endpoint: str, bucket: str, mail_port: int, staging: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__OPENLINEAGE__DISABLED": "True",
        "AIRFLOW_CONN_PACS_SOURCE": json.dumps(
            {
                "conn_type": "generic",
                "host": "127.0.0.1",
                "port": port,
                "extra": {"called_ae_title": "ORTHANC", "calling_ae_title": "PACSMIGRATE"},
            }
        ),
        "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(
            {
                "conn_type": "aws",
                "login": "bench",
                "password": "bench",
                "extra": {"endpoint_url": endpoint, "region_name": "us-east-1"},
            }
        ),
        "AIRFLOW_CONN_SMTP_DEFAULT": json.dumps(
            {
                "conn_type": "smtp",
                "host": "127.0.0.1",
                "port": mail_port,
                "extra": {"disable_tls": True, "disable_ssl": True},
            }
        ),
        "AIRFLOW_VAR_PACS_MIGRATION_BUCKET": bucket,
        "AIRFLOW_VAR_PACS_MIGRATION_RECIPIENTS": "compliance@hospital.example",
        "AIRFLOW_VAR_PACS_MIGRATION_STAGING_DIR": str(staging),
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "GX_ANALYTICS_ENABLED": "False",
    }


def prepare_home(home: Path) -> None:
    """A fresh Airflow home with its database and the PACS pool."""
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    for args in (["db", "migrate"], ["pools", "set", "pacs_source_associations", "4", "legacy PACS"]):
        subprocess.run([sys.executable, "-m", "airflow", *args], env=env, check=True, capture_output=True, timeout=900)


def run_dag(date: str) -> dict[str, Any]:
    """In the child process: dag.test() of pacs_migration for ``date``."""
    from airflow.dag_processing.dagbag import DagBag

    t0 = time.perf_counter()
    bag = DagBag(dag_folder=str(ROOT / "dags"))
    if bag.import_errors:
        raise RuntimeError(f"DAG import errors: {list(bag.import_errors)}")
    dag = bag.dags["pacs_migration"]
    parsed = time.perf_counter() - t0
    day = dt.date.fromisoformat(date)
    run = dag.test(logical_date=dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC))
    seconds = time.perf_counter() - t0
    tasks: dict[str, float] = {}
    for ti in run.get_task_instances():
        name = ti.task_id.split(".")[-1]
        tasks[name] = tasks.get(name, 0.0) + float(ti.duration or 0.0)
    return {"state": str(run.state), "seconds": seconds, "parse_s": parsed, "task_s": tasks}


def run_steps(date: str, port: int, endpoint: str, bucket: str, staging: str) -> dict[str, Any]:
    """In the child process: the same steps as plain Python, no Airflow."""
    t0 = time.perf_counter()  # imports included, as the DAG's first task pays them
    import boto3

    from include.pacs_migration.config import deep_merge, load_config, read_yaml
    from include.pacs_migration.plan import Unit
    from include.pacs_migration.steps import Services, migrate_unit
    from include.pacs_migration.store import ObjectStore

    path = ROOT / "include" / "config" / "migration.yaml"
    cfg = load_config(
        deep_merge(
            read_yaml(path),
            {
                "source": {
                    "host": "127.0.0.1",
                    "port": port,
                    "called_ae_title": "ORTHANC",
                    "calling_ae_title": "PACSMIGRATE",
                },
                "target": {"bucket": bucket},
                "report": {"recipients": ["compliance@hospital.example"]},
                "staging_dir": staging,
            },
        ),
        path.parent,
    )
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", config=cfg.target.client_config())
    store = ObjectStore(client, cfg.target)
    services = Services(cfg, store, cfg.source.max_associations, endpoint, patient_secret=secrets.token_hex(32))
    result = migrate_unit(services, Unit(dt.date.fromisoformat(date), None, "bench"), "bench-steps", "pacs_migration")
    return {
        "state": result.state.value,
        "seconds": time.perf_counter() - t0,
        "partitions": len(result.partitions),
        "migrated": result.migrated,
    }


def measure(port: int, date: str, work: Path, repeats: int, moto_factory: Any) -> dict[str, Any]:
    """Interleaved runs of both; a fresh moto (and bucket) for every run."""
    from peers.smtp import MailSink

    home = work / "airflow-home"
    prepare_home(home)
    mail = MailSink(work / "mail")
    runs: dict[str, list[dict[str, Any]]] = {"dag": [], "steps": []}
    try:
        for r in range(repeats):
            for kind in ("dag", "steps") if r % 2 == 0 else ("steps", "dag"):
                moto = moto_factory(work)
                try:
                    moto.client().create_bucket(Bucket="airflow-bench")
                    staging = work / "staging-airflow"
                    env = _env(home, port, moto.url, "airflow-bench", mail.port, staging)
                    args = [
                        sys.executable,
                        "-m",
                        "benchmarks.airflow_overhead",
                        kind,
                        "--date",
                        date,
                        "--port",
                        str(port),
                        "--endpoint",
                        moto.url,
                        "--bucket",
                        "airflow-bench",
                        "--staging",
                        str(staging),
                    ]
                    t0 = time.perf_counter()
                    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=3600)
                    if proc.returncode != 0:
                        raise RuntimeError(f"{kind}: {proc.stderr[-3000:]}")
                    result = json.loads(proc.stdout.strip().splitlines()[-1])
                    result["seconds_with_process_start"] = time.perf_counter() - t0
                    if result["state"] not in ("success", "DagRunState.SUCCESS", "done"):
                        raise RuntimeError(f"{kind} run ended {result['state']}")
                    runs[kind].append(result)
                    print(f"airflow overhead, repeat {r + 1}: {kind} {result['seconds']:.1f} s", file=sys.stderr)
                finally:
                    moto.stop()
    finally:
        mail.stop()
    return summarize(runs)


def _scheduler_env(env: dict[str, str], home: Path, api_port: int) -> dict[str, str]:
    from peers.processes import local_services_env

    return {**env, **local_services_env(home, api_port), "AIRFLOW_VAR_PACS_PATIENT_KEY_SECRET": secrets.token_hex(32)}


def _when(value: Any) -> dt.datetime:
    """A timestamp column as either database returns it (SQLite: text)."""
    return value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value))


def _machine_busy_s() -> float:
    """CPU-seconds the whole machine has been busy (not idle, not waiting for I/O)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _stat(path: Path) -> tuple[int, float] | None:
    """(process group, CPU-seconds with its reaped children's) from a /proc/<pid>/stat; None when gone."""
    try:
        fields = path.read_text().rsplit(")", 1)[1].split()
        return int(fields[2]), sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime..cstime
    except (OSError, IndexError, ValueError):
        return None


def _group_cpu_s(pgid: int) -> float:
    """CPU-seconds of a process group's live processes, with their reaped children's."""
    total = 0.0
    for path in Path("/proc").glob("[0-9]*/stat"):
        stat = _stat(path)
        if stat is not None and stat[0] == pgid:
            total += stat[1]
    return total


def _pid_cpu_s(pid: int | None) -> float:
    """CPU-seconds of one process (its threads and reaped children); 0 when gone or not given."""
    stat = _stat(Path(f"/proc/{pid}/stat")) if pid else None
    return stat[1] if stat else 0.0


def _cpu_now(groups: dict[str, int], peers: dict[str, int] | None = None) -> dict[str, float]:
    """The machine's, each process group's and each peer process's (``peers``: name -> pid) CPU-seconds."""
    return {
        "machine": _machine_busy_s(),
        **{name: _group_cpu_s(pgid) for name, pgid in groups.items()},
        **{name: _pid_cpu_s(pid) for name, pid in (peers or {}).items()},
    }


def run_scheduler(
    date: str,
    env: dict[str, str],
    home: Path,
    timeout_s: float = 1800,
    groups: dict[str, int] | None = None,
    dag_id: str = "pacs_migration",
    peers: dict[str, int] | None = None,
) -> dict[str, Any]:
    """One backfill of ``date`` through the scheduler (services already started
    and the DAG registered); wall seconds from ``backfill create`` to the run's end,
    per task instance its run time and its wait from scheduled to started, and the
    CPU-seconds spent meanwhile by the machine and by each service's process group
    (``groups``: name -> pgid; tasks count in the group of the process that forked them) and by
    each peer (``peers``: name -> pid, moto and the PACS).
    The metadata database is the deployment's (SQLite, or PostgreSQL under Celery)."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    cpu0 = _cpu_now(groups or {}, peers)
    t0 = _backfill(env, dag_id, date)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                row = conn.execute(
                    sqlalchemy.text("SELECT run_id, state FROM dag_run WHERE dag_id = :dag"), {"dag": dag_id}
                ).fetchone()
            if row and row[1] in ("success", "failed"):
                break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"backfill of {date} not finished in {timeout_s} s")
        seconds = time.perf_counter() - t0
        cpu = {k: v - cpu0[k] for k, v in _cpu_now(groups or {}, peers).items()}
        with engine.connect() as conn:
            tis = conn.execute(
                sqlalchemy.text(
                    "SELECT task_id, duration, start_date, scheduled_dttm FROM task_instance WHERE run_id = :run"
                ),
                {"run": row[0]},
            ).fetchall()
    finally:
        engine.dispose()
    tasks: dict[str, float] = {}
    for task_id, duration, _start, _scheduled in tis:
        name = task_id.split(".")[-1]
        tasks[name] = tasks.get(name, 0.0) + float(duration or 0.0)
    waits = [(_when(start) - _when(at)).total_seconds() for _t, _d, start, at in tis if start and at]
    return {
        "state": str(row[1]),
        "seconds": seconds,
        "task_instances": len(tis),
        "task_s": tasks,
        "wait_s": {"total": sum(waits), "median": statistics.median(waits), "max": max(waits)},
        "cpu_s": cpu,
    }


def _backfill(env: dict[str, str], dag_id: str, date: str, attempts: int = 3) -> float:
    """``airflow backfill create`` for ``date``; the ``perf_counter`` at the call that
    succeeded. On SQLite it can meet the scheduler's write and fail at once with "database
    is locked" (its transaction rolled back: nothing created): tried again, ``attempts``
    times at most, the run's time counted from the last call."""
    from peers.processes import airflow_cli

    for attempt in range(attempts):
        t0 = time.perf_counter()
        try:
            airflow_cli(env, "backfill", "create", "--dag-id", dag_id, "--from-date", date, "--to-date", date)
            return t0
        except RuntimeError as exc:
            if "database is locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(1)


def _findscu(port: int, files: list[Path]) -> None:
    """All ``files`` (query keys) over one association: the native tool's best case."""
    proc = subprocess.run(
        ["findscu", "-S", "-aet", "PACSMIGRATE", "-aec", "ORTHANC", "127.0.0.1", str(port), *map(str, files)],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        timeout=1800,
    )
    if proc.returncode:
        raise RuntimeError(f"findscu: {proc.stderr.decode(errors='replace')[-800:]}")


def _queries(port: int, date: str, folder: Path) -> tuple[list[list[Path]], list[str]]:
    """The census's C-FIND queries of ``date`` as findscu query files, by level
    (made from our own census, untimed: the native run is spared parsing answers)."""
    import pydicom

    from include.pacs_migration.census import _series_query, _study_query, take_census
    from include.pacs_migration.config import SourceConfig
    from include.pacs_migration.dimse import FindSession

    source = SourceConfig(host="127.0.0.1", port=port, called_ae_title="ORTHANC", calling_ae_title="PACSMIGRATE")
    with FindSession(source) as session:
        census = take_census(session.find, dt.date.fromisoformat(date))
    folder.mkdir(parents=True, exist_ok=True)

    def save(ds: Any, name: str) -> Path:
        pydicom.dcmwrite(folder / name, ds, implicit_vr=False, little_endian=True)
        return folder / name

    studies = sorted({s.study_instance_uid for s in census.series})
    images = []
    for n, s in enumerate(census.series):
        q = pydicom.Dataset()
        q.QueryRetrieveLevel, q.StudyInstanceUID, q.SeriesInstanceUID = (
            "IMAGE",
            s.study_instance_uid,
            s.series_instance_uid,
        )
        q.SOPInstanceUID = q.SOPClassUID = ""
        images.append(save(q, f"image-{n}.dcm"))
    levels = [
        [save(_study_query(date.replace("-", ""), None), "study.dcm")],
        [save(_series_query(uid), f"series-{n}.dcm") for n, uid in enumerate(studies)],
        images,
    ]
    return levels, studies


def run_native(port: int, date: str, work: Path, moto: Any, peers: dict[str, int] | None = None) -> dict[str, Any]:
    """The same work as the DAG's run of ``date`` with native tools on the same
    peers: the census's queries with findscu, getscu per study (two at once; a
    compressed study by C-MOVE to storescp, in its stored syntax) and the best
    uploader (s5cmd), then every object read back and its SHA-256 taken (16
    threads), as validation's re-read does. ``peers`` (name -> pid: moto, the PACS):
    their CPU-seconds too, in the same window as the machine's."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    from benchmarks.bench import COMPRESSED_MODALITIES, retrieve_native, s5cmd_upload, study_modalities

    levels, study_uids = _queries(port, date, work / "native-queries")
    compressed = {s for s, m in study_modalities(port).items() if m in COMPRESSED_MODALITIES}
    out = work / "native"
    shutil.rmtree(out, ignore_errors=True)
    client = moto.client()
    cpu0 = _cpu_now({}, peers)
    t0 = time.perf_counter()
    for files in levels:
        _findscu(port, files)
    t1 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda uid: retrieve_native(port, uid, out / uid, uid in compressed), study_uids))
    s5cmd_upload(out, moto, "airflow-bench", "native/")
    t2 = time.perf_counter()
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket="airflow-bench")
            for o in page.get("Contents", [])]  # fmt: skip

    def reread(key: str) -> str:
        digest = hashlib.sha256()
        for chunk in client.get_object(Bucket="airflow-bench", Key=key)["Body"].iter_chunks(1 << 20):
            digest.update(chunk)
        return digest.hexdigest()

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(reread, keys))
    t3 = time.perf_counter()
    cpu = {k: v - cpu0[k] for k, v in _cpu_now({}, peers).items()}
    shutil.rmtree(out, ignore_errors=True)
    return {
        "state": "done",
        "seconds": t3 - t0,
        "cpu_s": cpu,
        "census_s": t1 - t0,
        "transfer_s": t2 - t1,
        "reread_s": t3 - t2,
        "queries": sum(len(f) for f in levels),
        "objects": len(keys),
    }


CELERY_REDIS_DB = 13  # a database of the local Redis of its own, flushed before each run


@contextlib.contextmanager
def celery_deployment(env: dict[str, str]) -> Iterator[dict[str, str]]:
    """``env`` for the CeleryExecutor: a fresh PostgreSQL database (the local server)
    and a flushed Redis database as broker; both removed afterwards."""
    from peers.processes import celery_backends

    with celery_backends("pacs_bench", CELERY_REDIS_DB) as (_db, dsn):
        yield {
            **env,
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": dsn,
            "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:6379/{CELERY_REDIS_DB}",
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + dsn,
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": env.get("AIRFLOW__CORE__PARALLELISM", "4"),
            # the scheduler's idle sleep 0.25 s, as docker-compose.yml (from local_services_env)
        }


def _warm_api_server(env: dict[str, str]) -> None:
    """A deployment's api-server has answered before: its first database query
    (the ORM set up, ~3.5 s here) is not charged to the first task of the run."""
    import urllib.request

    base = env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"].removesuffix("/execution/")
    for path in ("/api/v2/monitor/health", "/execution/health/ping"):
        with contextlib.suppress(OSError):
            urllib.request.urlopen(base + path, timeout=60).read()


def _through_scheduler(
    date: str,
    env: dict[str, str],
    home: Path,
    logs: Path,
    executor: str,
    dag_id: str = "pacs_migration",
    peers: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Services up (the database migrated, the PACS pool set), one backfill of ``dag_id``, services down."""
    from peers.ports import free_port
    from peers.processes import airflow_cli, start_airflow, stop_all

    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    env = _scheduler_env(env, home, free_port())
    with contextlib.ExitStack() as stack:
        if executor == "celery":
            env = stack.enter_context(celery_deployment(env))
        airflow_cli(env, "db", "migrate", timeout=900)
        airflow_cli(env, "pools", "set", "pacs_source_associations", "4", "legacy PACS")
        airflow_cli(env, "dags", "reserialize")
        airflow_cli(env, "dags", "unpause", dag_id)
        names = ["api-server", "scheduler", "dag-processor", *(["celery"] if executor == "celery" else [])]
        args = {"celery": ["celery", "worker", "--skip-serve-logs"]}
        procs = [start_airflow(n, args.get(n, [n]), env, logs) for n in names]
        try:
            time.sleep(15)  # the services up (not part of any run's time)
            _warm_api_server(env)
            groups = dict(zip(names, (p.pid for p in procs), strict=True))
            result = run_scheduler(date, env, home, groups=groups, dag_id=dag_id, peers=peers)
        finally:
            stop_all(procs)
    return {**result, "overhang_s": _overhangs(logs, executor)}


def _overhangs(logs: Path, executor: str) -> dict[str, float]:
    """How long task supervisors went on after their tasks ended (README, Scaling: "Task ends")."""
    from peers.processes import supervisor_overhangs

    def read(name: str) -> str:
        return (logs / f"{name}.log").read_text(errors="replace")

    over = supervisor_overhangs(read("scheduler"), read("celery") if executor == "celery" else None)
    values = list(over.values()) or [0.0]
    return {"max": max(values), "total": sum(values), "over_2s": float(sum(v > 2 for v in values))}


def measure_scheduler(
    port: int,
    date: str,
    work: Path,
    repeats: int,
    moto_factory: Any,
    executor: str = "local",
    partitions: int = 0,
    pacs_pid: int | None = None,
) -> dict[str, Any]:
    """The date through the scheduler and ``executor`` (local: LocalExecutor on
    SQLite; celery: CeleryExecutor, PostgreSQL and Redis), interleaved with the
    steps run (fresh moto each), the native tools and, given the date's
    ``partitions``, Airflow's floor: the same DAG shape doing nothing (``pacs_floor``).
    The scheduler's and the native tools' runs also count moto's and the PACS's
    (``pacs_pid``) CPU: both serve nearly the same requests to either, a gauge of the host's speed."""
    from peers.smtp import MailSink

    mail = MailSink(work / "mail-scheduler")
    runs: dict[str, list[dict[str, Any]]] = {"scheduler": [], "steps": [], "native": [], "floor": []}
    try:
        for r in range(repeats):
            kinds = ("scheduler", "steps", "native", *(("floor",) if partitions else ()))
            for kind in kinds if r % 2 == 0 else kinds[::-1]:
                moto = moto_factory(work)
                staging = work / "staging-scheduler"
                try:
                    moto.client().create_bucket(Bucket="airflow-bench")
                    home = work / f"airflow-home-scheduler-{r}"
                    env = _env(home, port, moto.url, "airflow-bench", mail.port, staging)
                    peers = {"moto": moto.proc.pid, "pacs": pacs_pid} if pacs_pid else None
                    if kind == "native":
                        result = run_native(port, date, work, moto, peers)
                    elif kind == "steps":
                        args = ["steps", "--date", date, "--port", str(port), "--endpoint", moto.url]
                        args += ["--bucket", "airflow-bench", "--staging", str(staging)]
                        proc = subprocess.run(
                            [sys.executable, "-m", "benchmarks.airflow_overhead", *args],
                            env=env, capture_output=True, text=True, timeout=3600,
                        )  # fmt: skip
                        if proc.returncode != 0:
                            raise RuntimeError(f"steps: {proc.stderr[-3000:]}")
                        result = json.loads(proc.stdout.strip().splitlines()[-1])
                    elif kind == "floor":
                        env = {**env, "AIRFLOW__CORE__DAGS_FOLDER": str(FLOOR_DAGS)}
                        env["PACS_FLOOR_PARTITIONS"] = str(partitions)
                        result = _through_scheduler(date, env, home, work / f"floor-logs-{r}", executor, "pacs_floor")
                    else:
                        logs = work / f"scheduler-logs-{r}"
                        result = _through_scheduler(date, env, home, logs, executor, peers=peers)
                    if result["state"] not in ("success", "done"):
                        raise RuntimeError(f"{kind} run ended {result['state']}")
                    runs[kind].append(result)
                    print(f"scheduler overhead, repeat {r + 1}: {kind} {result['seconds']:.1f} s", file=sys.stderr)
                finally:
                    moto.stop()
                    shutil.rmtree(staging, ignore_errors=True)
    finally:
        mail.stop()
    return summarize_scheduler(runs)


def summarize_scheduler(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    steps = statistics.median(r["seconds"] for r in runs["steps"])
    wall = statistics.median(r["seconds"] for r in runs["scheduler"])
    n_ti = statistics.median(r["task_instances"] for r in runs["scheduler"])
    tasks = {
        name: statistics.median(r["task_s"].get(name, 0.0) for r in runs["scheduler"])
        for name in sorted({n for r in runs["scheduler"] for n in r["task_s"]})
    }
    inside = sum(tasks.get(k, 0.0) for k in SAME_STEPS)
    return {
        "steps_s": steps,
        "scheduler_wall_s": wall,
        "task_instances": n_ti,
        "task_s": tasks,
        "task_seconds_same_steps": inside,
        "inside_overhead_s": inside - steps,  # task-seconds beyond the steps' own time
        "inside_overhead_per_task_instance_s": (inside - steps) / n_ti,
        "wait_median_s": statistics.median(r["wait_s"]["median"] for r in runs["scheduler"]),
        "wait_total_s": statistics.median(r["wait_s"]["total"] for r in runs["scheduler"]),
        "wall_ratio": wall / steps,
        "overhang_s": {
            k: statistics.median(r.get("overhang_s", {}).get(k, 0.0) for r in runs["scheduler"])
            for k in ("max", "total", "over_2s")
        },
        "cpu_s": {
            k: statistics.median(r.get("cpu_s", {}).get(k, 0.0) for r in runs["scheduler"])
            for k in sorted({k for r in runs["scheduler"] for k in r.get("cpu_s", {})})
        },
        **_native_figures(runs, wall, tasks),
        **_floor_figures(runs, wall),
        "runs": runs,
    }


def _floor_figures(runs: dict[str, list[dict[str, Any]]], wall: float) -> dict[str, Any]:
    """Airflow's floor: the same DAG shape with no work, through the same services; and what
    R_date could at best be with this shape here (the floor over the native tools)."""
    if not runs.get("floor") or not runs.get("native"):
        return {}
    floor, med = runs["floor"], statistics.median
    seconds = med(r["seconds"] for r in floor)
    return {
        "floor": {
            "seconds": seconds,
            "task_s": med(sum(r["task_s"].values()) for r in floor),
            "task_instances": med(r["task_instances"] for r in floor),
            "wait_median_s": med(r["wait_s"]["median"] for r in floor),
            "cpu_machine_s": med(r.get("cpu_s", {}).get("machine", 0.0) for r in floor),
            "r": seconds / med(r["seconds"] for r in runs["native"]),  # as R_date: medians' ratio
            "share_of_wall": seconds / wall,
        }
    }


def _native_figures(runs: dict[str, list[dict[str, Any]]], wall: float, tasks: dict[str, float]) -> dict[str, Any]:
    """R_date: the date through the scheduler / the same work with native tools; and by stage."""
    if not runs.get("native"):
        return {}
    native = {
        k: statistics.median(r[k] for r in runs["native"]) for k in ("seconds", "census_s", "transfer_s", "reread_s")
    }
    native["cpu_machine_s"] = statistics.median(r.get("cpu_s", {}).get("machine", 0.0) for r in runs["native"])
    return {
        "native_s": native,
        "cpu_per_moto_cpu": {kind: _per_moto(runs[kind]) for kind in ("scheduler", "native")},
        "r_date": wall / native["seconds"],
        "r_by_stage": {
            "census": tasks.get("census", 0.0) / native["census_s"],
            "transfer": tasks.get("transfer", 0.0) / native["transfer_s"],
            "validate": tasks.get("validate", 0.0) / native["reread_s"],
        },
    }


def _per_moto(runs: list[dict[str, Any]]) -> float | None:
    """The machine's CPU less moto's and the PACS's, per CPU-second of moto's (median of runs):
    moto serves nearly the same requests on both sides (the pipeline's ~7 % more at scale 1, its
    manifests and Data Docs), so this compares the pipeline's CPU (Airflow's included) with the
    native tools' whatever the host's speed at the time."""
    ratios = [
        (c["machine"] - c["moto"] - c["pacs"]) / c["moto"]
        for r in runs
        if (c := r.get("cpu_s") or {}).get("moto", 0) > 0 and "machine" in c and "pacs" in c
    ]
    return statistics.median(ratios) if ratios else None


EXECUTORS = {
    "local": "LocalExecutor on SQLite",
    "celery": "CeleryExecutor on PostgreSQL and Redis, one worker of concurrency 4",
}


def markdown_scheduler(r: dict[str, Any], info: dict[str, Any], executor: str = "local") -> list[str]:
    n = r["task_instances"]
    return [
        f"Through the scheduler ({EXECUTORS[executor]}, parallelism 4, pool `pacs_source_associations` of 4; "
        f"study date {info['study_date']}, {info['instances']} instances, {len(r['runs']['scheduler'])} interleaved "
        "repeats, medians; this machine has 2 cores):",
        "",
        "| run | seconds |",
        "|---|---|",
        f"| the same steps as plain Python, one process, partitions one after another | {r['steps_s']:.1f} |",
        "| `airflow backfill create` → the run's end (all tasks; partitions in parallel) | "
        f"{r['scheduler_wall_s']:.1f} |",
        f"| task-seconds of census, transfer, validate, lineage ({n:g} task instances in the run) | "
        f"{r['task_seconds_same_steps']:.1f} |",
        f"| of which beyond the steps' own time | {r['inside_overhead_s']:+.1f} |",
        f"| wait from scheduled to started, per task instance (median; pool and parallelism included) | "
        f"{r['wait_median_s']:.2f} |",
        "| task supervisors' time after their tasks ended: total, longest, tasks over 2 s (medians of runs) | "
        f"{r['overhang_s']['total']:.1f}, {r['overhang_s']['max']:.1f}, {r['overhang_s']['over_2s']:g} |",
        "",
        f"**Wall time of one study date through the scheduler / the same steps: {r['wall_ratio']:.2f}.** Per task "
        f"instance: {r['inside_overhead_per_task_instance_s']:+.2f} task-seconds beyond the steps' own (a task "
        "process, its imports, config, clients and XCom, and the CPU that parallel tasks share on 2 cores) and "
        f"{r['wait_median_s']:.2f} s from scheduled to started (median). Task seconds: "
        + ", ".join(f"{k} {v:.1f}" for k, v in r["task_s"].items())
        + ".",
        *_cpu_rows(r),
        *_native_rows(r),
        *_floor_rows(r),
    ]


def _floor_rows(r: dict[str, Any]) -> list[str]:
    if "floor" not in r:
        return []
    f = r["floor"]
    return [
        "",
        f"**Airflow's floor** (`pacs_floor`: this DAG's shape, {f['task_instances']:g} task instances doing nothing, "
        f"same services): {f['seconds']:.1f} s wall, {f['task_s']:.1f} task-seconds, {f['wait_median_s']:.2f} s "
        f"scheduled → started (median), {f['cpu_machine_s']:.1f} CPU-seconds of the machine; "
        f"**{f['r']:.2f}x the native tools' time** (the best R_date this shape can reach here), "
        f"{100 * f['share_of_wall']:.0f} % of the date's wall time.",
    ]


def _cpu_rows(r: dict[str, Any]) -> list[str]:
    """Where the machine's CPU went during the run (n cores: at most n CPU-seconds a second)."""
    cpu = dict(r.get("cpu_s") or {})
    if not cpu:
        return []
    machine, cores = cpu.pop("machine", 0.0), os.cpu_count() or 1
    peers = {k: cpu.pop(k) for k in ("moto", "pacs") if k in cpu}
    native = (r.get("native_s") or {}).get("cpu_machine_s")
    parts = ", ".join(f"{k} {v:.1f}" for k, v in cpu.items())
    per_moto = r.get("cpu_per_moto_cpu") or {}
    ours, theirs = per_moto.get("scheduler"), per_moto.get("native")
    gauge = (
        [
            "",
            f"moto {peers['moto']:.1f} and the PACS {peers['pacs']:.1f} CPU-seconds. They serve nearly the same "
            "requests to both runs (the pipeline's also carry its manifests and Data Docs: moto's share is larger), "
            "so per CPU-second of moto's (a gauge of the host's speed while each ran) everything else "
            f"took {ours:.2f} in the pipeline's run (Airflow included) and {theirs:.2f} in the native tools': "
            f"**{ours / theirs:.2f}x**.",
        ]
        if ours and theirs and peers.keys() == {"moto", "pacs"}
        else []
    )
    return [
        "",
        f"CPU-seconds during the run: the machine {machine:.1f} (of {cores * r['scheduler_wall_s']:.1f} its "
        f"{cores} cores had); by process group (tasks count with the process that forked them): {parts}"
        + (f"; the native tools' run: {native:.1f}." if native else "."),
        *gauge,
    ]


def _native_rows(r: dict[str, Any]) -> list[str]:
    if "r_date" not in r:
        return []
    n, by = r["native_s"], r["r_by_stage"]
    return [
        "",
        "The same work with native tools on the same peers (findscu with the census's queries, one association a "
        "level; getscu per study, two at once; s5cmd; every object read back and hashed, 16 threads):",
        "",
        "| stage | pipeline task-seconds | native seconds | ratio |",
        "|---|---|---|---|",
        f"| census | {r['task_s'].get('census', 0):.1f} | {n['census_s']:.1f} | {by['census']:.2f} |",
        f"| transfer (retrieve, normalize, upload) | {r['task_s'].get('transfer', 0):.1f} | {n['transfer_s']:.1f} | "
        f"{by['transfer']:.2f} |",
        f"| validate (re-read and checksum, GX suites) | {r['task_s'].get('validate', 0):.1f} | {n['reread_s']:.1f} | "
        f"{by['validate']:.2f} |",
        f"| lineage, reports, report, gate | {sum(v for k, v in r['task_s'].items() if k not in SAME_STEPS[:3]):.1f} "
        "| — | — |",
        f"| **the date, wall** | {r['scheduler_wall_s']:.1f} | {n['seconds']:.1f} | **R_date {r['r_date']:.2f}** |",
    ]


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    steps = statistics.median(r["seconds"] for r in runs["steps"])
    dag_total = statistics.median(r["seconds"] for r in runs["dag"])
    tasks = {
        name: statistics.median(r["task_s"].get(name, 0.0) for r in runs["dag"])
        for name in sorted({n for r in runs["dag"] for n in r["task_s"]})
    }
    report_s = sum(v for k, v in tasks.items() if k not in SAME_STEPS)
    dag_same = dag_total - report_s  # the run without its report and gate tasks
    inside = sum(tasks.get(k, 0.0) for k in SAME_STEPS)
    return {
        "steps_s": steps,
        "dag_s": dag_total,
        "dag_same_steps_s": dag_same,
        "report_and_gate_s": report_s,
        "task_s": tasks,
        "parse_s": statistics.median(r["parse_s"] for r in runs["dag"]),
        "overhead_s": dag_same - steps,
        "overhead_fraction": (dag_same - steps) / steps,
        "overhead_inside_tasks_s": inside - steps,
        "overhead_between_tasks_s": dag_same - inside,
        "runs": runs,
    }


def markdown(result: dict[str, Any], info: dict[str, Any]) -> list[str]:
    r = result
    rows = [
        f"Airflow's own overhead (study date {info['study_date']}, {info['instances']} instances, "
        f"{info['bytes'] / 1e6:,.0f} MB, {len(r['runs']['dag'])} interleaved repeats, medians):",
        "",
        "| run | seconds |",
        "|---|---|",
        f"| the same steps as plain Python (census, transfer, validate, lineage) | {r['steps_s']:.1f} |",
        f"| `pacs_migration` under `dag.test()`, without report and gate | {r['dag_same_steps_s']:.1f} |",
        f"| of which inside those tasks | {sum(r['task_s'].get(k, 0) for k in SAME_STEPS):.1f} |",
        f"| of which between tasks (DAG parse {r['parse_s']:.1f} s, scheduling, database) | "
        f"{r['overhead_between_tasks_s']:.1f} |",
        f"| report and gate tasks (e-mail; no counterpart) | {r['report_and_gate_s']:.1f} |",
        "",
        f"**Airflow overhead: {r['overhead_s']:+.1f} s ({r['overhead_fraction'] * 100:+.0f} %)**, "
        f"{r['overhead_inside_tasks_s']:+.1f} s inside tasks, {r['overhead_between_tasks_s']:+.1f} s between them. "
        "Task seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in r["task_s"].items()) + ".",
    ]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one side of the Airflow-overhead measurement")
    parser.add_argument("kind", choices=["dag", "steps"])
    parser.add_argument("--date", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--staging", required=True)
    ns = parser.parse_args(argv)
    result = run_dag(ns.date) if ns.kind == "dag" else run_steps(ns.date, ns.port, ns.endpoint, ns.bucket, ns.staging)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
