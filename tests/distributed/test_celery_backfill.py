"""Airflow's own distributed engine, without Docker: CeleryExecutor with its
metadata database on the PostgreSQL server at 127.0.0.1:5432 (a database this
test creates) and Redis at 127.0.0.1:6379 as broker; api-server, scheduler,
dag-processor and two Celery workers started as local processes. A backfill
over six study dates of the demo archive, retrieved by C-MOVE from Orthanc,
must succeed on both workers, hold DESIGN.md 6's invariants, keep concurrent
associations to the PACS within the `pacs_source_associations` pool, and
(issue 15, point 6) run several transfer tasks on one worker at once through
the worker's one Storage SCP, every store routed by its Move Originator
Message ID."""

from __future__ import annotations

import csv
import datetime as dt
import email
import hashlib
import io
import json
import os
import secrets
import socket
import subprocess
import time

import pytest
import yaml

from tests.conftest import PATIENT_SECRET, ROOT

DATES = [dt.date(2019, 3, 1) + dt.timedelta(days=d) for d in range(6)]
POOL_SIZE = 4
REDIS_DB = 11
TIMEOUT_S = 20 * 60


def _reachable(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def services():
    missing = [name for name, port in (("PostgreSQL", 5432), ("Redis", 6379)) if not _reachable(port)]
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{', '.join(missing)} not reachable on 127.0.0.1 (.ci/run starts them)")
        pytest.skip(f"{', '.join(missing)} not running")
    from peers.processes import celery_backends

    with celery_backends("pacs_celery", REDIS_DB) as (db, dsn):
        yield {"db": db, "dsn": dsn}


def _runs(db: str) -> list[dict]:
    import psycopg2

    with psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname=db) as conn:
        cur = conn.cursor()
        cur.execute("SELECT run_id, state FROM dag_run WHERE dag_id = 'pacs_migration'")
        return [{"run_id": r, "state": st} for r, st in cur.fetchall()]


def _transfer_running_on(db: str, host: str) -> tuple | None:
    """A transfer running on ``host`` for 2 s or more (retrieving, uploading)."""
    import psycopg2

    with psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname=db) as conn:
        cur = conn.cursor()
        cur.execute(
            "SELECT run_id, map_index FROM task_instance WHERE task_id = 'partition.transfer' AND state = 'running' "
            "AND hostname = %s AND start_date < now() - interval '2 seconds' LIMIT 1",
            (host,),
        )
        return cur.fetchone()


def _upload(orthanc, root) -> dict[str, int]:
    import urllib.error

    held: dict[str, int] = {}
    for path in sorted(root.rglob("*.dcm")):
        day, study = path.relative_to(root).parts[:2]
        try:
            orthanc.upload(path.read_bytes())
        except urllib.error.HTTPError:
            continue
        key = f"{dt.datetime.strptime(day, '%Y%m%d').date().isoformat()}/{study[:-2]}"
        held[key] = held.get(key, 0) + 1
    return held


def test_celery_backfill_on_postgres_and_redis(services, tmp_path, s3_server, mail):
    from include.demo.archive import build_archive
    from include.pacs_migration.config import TargetConfig
    from include.pacs_migration.counts import counts_from_frame
    from include.pacs_migration.manifest import read_transfer
    from include.pacs_migration.partition import Partition
    from include.pacs_migration.store import ObjectStore
    from peers.ports import free_port
    from peers.processes import SUPERVISOR_ENV, airflow_cli, kill_tree, start_airflow, stop_all
    from tests.peers import ConnectionCounter, Orthanc

    archive = build_archive(tmp_path / "archive", DATES[0], len(DATES))
    move_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", calling_aes={"PACSMIGRATE": move_port})
    pacs = ConnectionCounter(orthanc.dicom_port)  # counts our associations to the PACS
    held = _upload(orthanc, archive.root)  # partition -> instances Orthanc accepted
    bucket = "celery-archive"
    s3_server.create_bucket(bucket)
    home = tmp_path / "airflow-home"
    home.mkdir()
    # Every transfer task normalizes in a spawned process here (default: partitions of 200+ instances), so the
    # process path runs under real Celery workers and the task supervisor.
    config = yaml.safe_load((ROOT / "include/config/migration.yaml").read_text())
    config["normalization"]["ruleset"] = str(ROOT / "include/config" / config["normalization"]["ruleset"])
    config["normalization"]["processes_from_instances"] = 1
    # One association per transfer task: four transfer tasks fit the pool at once, so each worker runs two.
    config["source"].update(
        retrieve_method="C-MOVE", move_listen_host="127.0.0.1", move_listen_port=move_port, max_associations=1
    )
    (tmp_path / "migration.yaml").write_text(yaml.safe_dump(config))
    api_port = free_port()
    env = dict(os.environ)
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__PARALLELISM": "8",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "tests.distributed.hostname.worker_hostname",
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.25",  # as docker-compose.yml
            # A lost worker's task is found within ~30 s (default: 5 min).
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": services["dsn"],
            "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:6379/{REDIS_DB}",
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + services["dsn"],
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
            # Two cores shared by five services: give the execution API time to answer.
            "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "60",
            **SUPERVISOR_ENV,  # as docker-compose.yml: a task's slot free when it ends
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(api_port),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(16),
            "AIRFLOW__OPENLINEAGE__DISABLED": "True",
            "PYTHONPATH": str(ROOT),
            "GX_ANALYTICS_ENABLED": "False",
            "AIRFLOW_CONN_PACS_SOURCE": json.dumps(
                {
                    "conn_type": "generic",
                    "host": "127.0.0.1",
                    "port": pacs.port,
                    "extra": {"called_ae_title": orthanc.ae_title, "calling_ae_title": "PACSMIGRATE"},
                }
            ),
            "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(
                {
                    "conn_type": "aws",
                    "login": "testing",
                    "password": "testing",
                    "extra": {"endpoint_url": s3_server.endpoint_url, "region_name": "us-east-1"},
                }
            ),
            "AIRFLOW_CONN_SMTP_DEFAULT": json.dumps(
                {
                    "conn_type": "smtp",
                    "host": "127.0.0.1",
                    "port": mail.port,
                    "extra": {"disable_tls": True, "disable_ssl": True},
                }
            ),
            "AIRFLOW_VAR_PACS_MIGRATION_BUCKET": bucket,
            "AIRFLOW_VAR_PACS_MIGRATION_RECIPIENTS": "compliance@hospital.example",
            "AIRFLOW_VAR_PACS_MIGRATION_STAGING_DIR": str(tmp_path / "staging"),
            "AIRFLOW_VAR_PACS_PATIENT_KEY_SECRET": PATIENT_SECRET,
            "AIRFLOW_VAR_PACS_MIGRATION_CONFIG_PATH": str(tmp_path / "migration.yaml"),
        }
    )
    airflow_cli(env, "db", "migrate")
    airflow_cli(env, "pools", "set", "pacs_source_associations", str(POOL_SIZE), "legacy PACS associations")
    airflow_cli(env, "dags", "reserialize")
    airflow_cli(env, "dags", "unpause", "pacs_migration")
    airflow_cli(
        env,
        "backfill",
        "create",
        "--dag-id",
        "pacs_migration",
        "--from-date",
        DATES[0].isoformat(),
        "--to-date",
        DATES[-1].isoformat(),
        "--max-active-runs",
        "3",
    )

    logs = tmp_path / "service-logs"
    procs: list[subprocess.Popen] = []
    commands = {
        "api-server": (["api-server"], {}),
        "scheduler": (["scheduler"], {}),
        "dag-processor": (["dag-processor"], {}),
        "worker-1": (
            ["celery", "worker", "--celery-hostname", "worker-1@%h", "--skip-serve-logs"],
            {"PACS_WORKER_NAME": "worker-1"},
        ),
        "worker-2": (
            ["celery", "worker", "--celery-hostname", "worker-2@%h", "--skip-serve-logs"],
            {"PACS_WORKER_NAME": "worker-2"},
        ),
    }
    runs: list[dict] = []
    try:
        for name, (args, extra) in commands.items():
            procs.append(start_airflow(name, args, {**env, **extra}, logs))
        deadline = time.monotonic() + TIMEOUT_S - 120
        lost: tuple | None = None  # (dag run, map index) of the transfer whose worker was killed
        while time.monotonic() < deadline:
            runs = _runs(services["db"])  # the metadata DB, not the CLI: each CLI call costs a core for seconds
            if len(runs) == len(DATES) and all(r["state"] in ("success", "failed") for r in runs):
                break
            if lost is None and (lost := _transfer_running_on(services["db"], "worker-1")):
                # Worker loss (issue 15.7): SIGKILL the whole worker mid-transfer, then start it again. The
                # scheduler finds the task's heartbeat gone and retries it, same run id, on a live worker.
                kill_tree(procs[3].pid)  # the worker, its task supervisors and the tasks (own process groups)
                procs[3].wait(timeout=30)
                procs[3] = start_airflow(
                    "worker-1-restarted", commands["worker-1"][0], {**env, **commands["worker-1"][1]}, logs
                )
            dead = [p.args for p in procs if p.poll() is not None]
            assert not dead, f"an Airflow service exited: {dead}; logs in {logs}"
            time.sleep(1)
        else:
            pytest.fail(f"backfill not finished in time: {runs}; logs in {logs}")

        import psycopg2

        with psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname=services["db"]) as conn:
            cur = conn.cursor()
            cur.execute("SELECT hostname, count(*) FROM task_instance WHERE state = 'success' GROUP BY hostname")
            by_host = dict(cur.fetchall())
            cur.execute(
                "SELECT hostname, start_date, end_date FROM task_instance WHERE task_id = 'partition.transfer' "
                "AND state = 'success'"
            )
            transfers = cur.fetchall()
            cur.execute(
                "SELECT try_number, state FROM task_instance WHERE task_id = 'partition.transfer' "
                "AND run_id = %s AND map_index = %s",
                lost or ("", -1),
            )
            retried = cur.fetchone()
    finally:
        stop_all(procs)
        pacs.stop()
        orthanc.stop()

    print(
        f"\ncelery backfill: {len(runs)} runs, task instances by worker {by_host}, "
        f"max concurrent PACS associations {pacs.max_active} (pool {POOL_SIZE})"
    )
    assert {r["state"] for r in runs} == {"success"}, runs
    assert lost is not None, "no transfer ran on worker-1 to kill"
    assert retried and retried[0] >= 2, retried  # the lost try, then Airflow's retry of the same run id
    assert not [p for p in (tmp_path / "staging").rglob("*") if p.is_file() and ".move-router" not in str(p)]
    # Both workers executed tasks.
    assert by_host.get("worker-1", 0) > 0 and by_host.get("worker-2", 0) > 0, by_host
    # The pool kept the PACS within its association budget.
    assert 0 < pacs.max_active <= POOL_SIZE, pacs.max_active
    # The transfer tasks normalized in their spawned processes.
    transfer_logs = [
        p.read_text(errors="replace") for p in (home / "logs").rglob("*.log") if "task_id=partition.transfer" in str(p)
    ]
    assert "normalized in 1 normalize process(es)" in "\n".join(transfer_logs), f"task logs under {home / 'logs'}"
    # Each worker imported GX and the core once (airflow_local_settings.py): no validate task imported GX again.
    for name in ("worker-1", "worker-2"):
        assert "pacs-migration: modules for tasks preloaded" in (logs / f"{name}.log").read_text(errors="replace")
    validate_logs = [p.read_text(errors="replace") for p in (home / "logs").rglob("*.log") if "validate" in str(p)]
    chatter = '"logger":"great_expectations'  # GX's INFO lines at import (hundreds) and per run
    assert validate_logs and not [t for t in validate_logs if chatter in t], "GX imported or chattering in a task"
    # Several transfer tasks at once on one worker, through the one Storage SCP, every store routed by message ID.
    overlaps = sum(
        1
        for i, (host, start, end) in enumerate(transfers)
        for other_host, other_start, other_end in transfers[i + 1 :]
        if host == other_host and start < other_end and other_start < end
    )
    routed = [line for text in transfer_logs for line in text.splitlines() if "C-MOVE router:" in line]
    print(f"transfer tasks overlapping on one worker: {overlaps} pair(s); router lines: {len(routed)}")
    print(f"worker-1 killed during transfer {lost}; that task ended as try {retried}")
    assert overlaps > 0, transfers
    assert routed and all("by study, 0 unrouted" in line and " 0 by message ID" not in line for line in routed)

    store = ObjectStore(s3_server.client(), TargetConfig(bucket=bucket))
    figures = {}
    assert sum(held.values()) >= sum(archive.by_partition.values()) - 2  # Orthanc may refuse the two broken files
    for key, expected in held.items():
        p = Partition.parse(key)
        df = read_transfer(store, p)
        c = counts_from_frame(df)
        assert c.expected == expected and c.expected == c.migrated + c.quarantined + c.unresolved  # 1
        for obj_key, sha in zip(
            df[df.state == "migrated"].object_key, df[df.state == "migrated"].object_sha256, strict=True
        ):
            assert hashlib.sha256(store.get(obj_key)).hexdigest() == sha  # 2
        figures[key] = c
    assert s3_server.count(bucket, "studies/") == sum(c.migrated for c in figures.values())  # 3
    # 5: one report per run, its CSV equal to the manifests.
    mails = mail.messages()
    assert len(mails) == len(DATES)
    seen = set()
    for path in mails:
        msg = email.message_from_bytes(path.read_bytes())
        for part in msg.walk():
            if (part.get_filename() or "").endswith(".csv"):
                for row in csv.DictReader(io.StringIO(part.get_payload(decode=True).decode())):
                    c = figures[row["partition"]]
                    assert (int(row["expected"]), int(row["migrated"]), int(row["quarantined"])) == (
                        c.expected,
                        c.migrated,
                        c.quarantined,
                    )
                    seen.add(row["partition"])
    assert seen == set(figures)
