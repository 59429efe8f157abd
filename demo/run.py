"""`make demo`: migrate the demo archive through Airflow, as a user would.

Starts a simulated legacy PACS, moto's S3 server and an SMTP sink on loopback,
an Airflow home (SQLite, LocalExecutor) with api-server, scheduler and
dag-processor, then `airflow backfill create` over the archive's dates; waits,
prints a summary table and writes demo-output/summary.json. Everything it
started is stopped when it ends (``--keep``, ``make demo KEEP=1``: the UI stays
up until Ctrl-C, with its URL and login printed; ``--screenshots DIR``, ``make
ui-screenshots``: the dashboard, the grid and the Assets view rendered in
headless Chromium). The bucket is kept in .demo/s3-snapshot so a second run
sees what the first one wrote (and writes nothing new).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from include.demo.archive import build_archive
from include.demo.clinical import add_clinical, ris_export
from include.pacs_migration.manifest import STUDIES
from peers.pacs import SimulatedPACS
from peers.ports import free_port
from peers.processes import SUPERVISOR_ENV, airflow_cli, json_rows, start_airflow, stop_all
from peers.s3 import S3Server
from peers.smtp import MailSink

ROOT = Path(__file__).resolve().parents[1]
STATE = ROOT / ".demo"
HOME = ROOT / ".airflow"
OUT = ROOT / "demo-output"
BUCKET = "pacs-archive"
DAG_ID = "pacs_migration"
FIRST_DATE = dt.date(2019, 3, 1)
DAYS = 5
TIMEOUT_S = 12 * 60
DEMO_USER = "admin"
FIRST_RUN = f"backfill__{FIRST_DATE.isoformat()}T00:00:00+00:00"


def airflow_env(pacs_port: int, s3_endpoint: str, smtp_port: int, api_port: int, staging: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "AIRFLOW_HOME": str(HOME),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            # The demo runs only its backfill: no run for "today" from the schedule.
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            # The next task of a date sooner (README, Scaling: LocalExecutor only).
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.25",
            # SQLite serializes writers: wait for the lock instead of failing at once.
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{HOME}/airflow.db?timeout=60",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(api_port),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
            # SQLite behind the API server on a small machine: allow slow answers.
            "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "60",
            # A task's executor slot free when the task ends, not up to 5 s later (README, Scaling).
            **SUPERVISOR_ENV,
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(16),
            # One demo user, its password in .airflow/passwords.json (printed with --keep).
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{DEMO_USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(HOME / "passwords.json"),
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(
                {"type": "file", "log_file_path": str(OUT / "openlineage.jsonl"), "append": True}
            ),
            "AIRFLOW__OPENLINEAGE__NAMESPACE": "pacs-migration-demo",
            "PYTHONPATH": str(ROOT),
            "GX_ANALYTICS_ENABLED": "False",
            "AIRFLOW_CONN_PACS_SOURCE": json.dumps(
                {
                    "conn_type": "generic",
                    "host": "127.0.0.1",
                    "port": pacs_port,
                    "extra": {"called_ae_title": "LEGACYPACS", "calling_ae_title": "PACSMIGRATE"},
                }
            ),
            "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(
                {
                    "conn_type": "aws",
                    "login": "testing",
                    "password": "testing",
                    "extra": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"},
                }
            ),
            "AIRFLOW_CONN_SMTP_DEFAULT": json.dumps(
                {
                    "conn_type": "smtp",
                    "host": "127.0.0.1",
                    "port": smtp_port,
                    "extra": {"disable_tls": True, "disable_ssl": True, "timeout": 30, "retry_limit": 2},
                }
            ),
            "AIRFLOW_VAR_PACS_MIGRATION_RECIPIENTS": "compliance@hospital.example",
            "AIRFLOW_VAR_PACS_MIGRATION_STAGING_DIR": str(staging),
            # The demo's own patient-key secret (a hospital keeps its own in a secrets backend).
            "AIRFLOW_VAR_PACS_PATIENT_KEY_SECRET": secrets.token_hex(32),
        }
    )
    return env


def demo_config() -> Path:
    """The bundled configuration, reading the demo RIS's export folder."""
    import yaml

    from include.pacs_migration.config import read_yaml
    from include.pacs_migration_dags import DEFAULT_CONFIG

    data = read_yaml(DEFAULT_CONFIG)
    data["normalization"]["ruleset"] = str(DEFAULT_CONFIG.parent / data["normalization"]["ruleset"])
    data["reports"] = {**data.get("reports", {}), "export_dir": str(STATE / "ris")}
    path = HOME / "migration.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def collect_summary(s3: S3Server, dates: list[dt.date], emails: list[Path], objects_before: int) -> dict:
    from include.pacs_migration.config import TargetConfig
    from include.pacs_migration.counts import counts_from_frame
    from include.pacs_migration.manifest import PartitionManifests, transferred_partitions
    from include.pacs_migration.store import ObjectStore

    store = ObjectStore(s3.client(), TargetConfig(bucket=BUCKET))
    rows = []
    for p in transferred_partitions(store):
        if p.study_date not in dates:
            continue
        manifests = PartitionManifests(store, p)
        df = manifests.transfer()
        c = counts_from_frame(df)
        run_id = str(df["run_id"].dropna().max())
        # A verdict counts only for the run that reached it (the demo's last run of this date).
        rows.append({"partition": p.key, **c.to_json(), "validation_passed": manifests.passed(run_id)})
    objects = s3.count(BUCKET, STUDIES + "/")
    total = lambda f: sum(r[f] for r in rows)  # noqa: E731
    return {
        "partitions": len(rows),
        "expected": total("expected"),
        "migrated": total("migrated"),
        "quarantined": total("quarantined"),
        "unresolved": total("unresolved"),
        "unsolicited": total("unsolicited"),
        "written_this_run": total("written"),
        "validation_passed": bool(rows) and all(r["validation_passed"] for r in rows),
        "objects_in_bucket": objects,
        "objects_before_run": objects_before,
        "new_objects_this_run": objects - objects_before,
        "emails": [str(e) for e in emails],
        "by_partition": rows,
        "reports": _reports(store, dates),
    }


def _reports(store, dates: list[dt.date]) -> dict:
    """The RIS's reports of the dates: expected, migrated (amended), not matched, rejected."""
    from include.pacs_migration.reports.ledger import ReportLedger
    from include.pacs_migration.reports.place import ReportCounts

    counts = [ReportCounts.of(ReportLedger(store, d).read()).to_json() for d in dates]
    keys = ("expected", "migrated", "amended", "unmatched", "rejected")
    return {k: sum(c[k] for c in counts) for k in keys}


def write_trace_example(s3: S3Server) -> None:
    """Trace one instance a rule changed (the big-endian MR) into demo-output/."""
    from include.pacs_migration.config import TargetConfig
    from include.pacs_migration.manifest import read_transfer
    from include.pacs_migration.partition import Partition
    from include.pacs_migration.store import ObjectStore
    from include.pacs_migration.trace import render_trace, trace_instance

    store = ObjectStore(s3.client(), TargetConfig(bucket=BUCKET))
    df = read_transfer(store, Partition(FIRST_DATE, "MR"))
    changed = df[df["changes"].fillna("").str.contains("1.2.840.10008.1.2.2->")]
    if changed.empty:
        return
    text = render_trace(trace_instance(store, changed.iloc[0]["sop_instance_uid"], FIRST_DATE))
    (OUT / "trace-example.txt").write_text(text + "\n")
    print(f"\ntrace of one instance (demo-output/trace-example.txt):\n{text}")


def print_table(summary: dict, runs: list[dict], wall: float) -> None:
    df = pd.DataFrame(summary["by_partition"])
    if not df.empty:
        cols = ["partition", "expected", "migrated", "quarantined", "unresolved", "written", "validation_passed"]
        print(df[cols].to_string(index=False))
    print()
    listed = ", ".join(f"{r['logical_date'][:10]}={r['state']}" for r in runs)
    print(f"runs: {listed}")
    for k in (
        "partitions",
        "expected",
        "migrated",
        "quarantined",
        "unresolved",
        "validation_passed",
        "objects_in_bucket",
        "new_objects_this_run",
    ):
        print(f"{k:>22}: {summary[k]}")
    print(f"{'reports':>22}: {summary['reports']}")
    print(f"{'emails':>22}: {len(summary['emails'])} in {OUT / 'emails'}")
    print(f"{'wall time':>22}: {wall:.0f} s")


def keep_ui(url: str) -> None:
    """Leave the UI up until Ctrl-C."""
    password = json.loads((HOME / "passwords.json").read_text())[DEMO_USER]
    print(f"\nAirflow UI: {url}/  (login {DEMO_USER} / {password})")
    print(f"the migration dashboard: {url}/pacs-migration/   (also 'Migration' in the navigation)")
    print("Ctrl-C stops everything.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def screenshots(url: str, folder: Path) -> list[Path]:
    """The dashboard, the migration's grid (partitions named by partition) and the Assets view."""
    import urllib.request
    from urllib.parse import quote

    from playwright.sync_api import sync_playwright

    from demo.render import chromium_binary

    password = json.loads((HOME / "passwords.json").read_text())[DEMO_USER]
    body = json.dumps({"username": DEMO_USER, "password": password}).encode()
    req = urllib.request.Request(f"{url}/auth/token", body, {"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=60) as rsp:
        token = json.loads(rsp.read())["access_token"]
    pages = {
        "ui-dashboard.png": ("/pacs-migration/", "body[data-loaded=true]"),
        # the mapped transfers of one run, each named by its partition
        "ui-grid.png": (f"/dags/{DAG_ID}/runs/{quote(FIRST_RUN, safe='')}/tasks/partition.transfer/mapped", None),
        "ui-assets.png": ("/assets", None),
    }
    out = []
    folder.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_binary(), args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        context.add_cookies([{"name": "_token", "value": token, "url": url}])
        page = context.new_page()
        for name, (path, ready) in pages.items():
            page.goto(url + path, wait_until="networkidle")
            if ready:
                page.wait_for_selector(ready, timeout=60_000)
            page.wait_for_timeout(1500)  # the React UI settles after its last request
            page.screenshot(path=str(folder / name))
            out.append(folder / name)
        browser.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="make demo")
    ap.add_argument("--keep", action="store_true", help="leave the Airflow UI up until Ctrl-C")
    ap.add_argument("--screenshots", type=Path, default=None, help="render the UI's main pages into this folder")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    dates = [FIRST_DATE + dt.timedelta(days=d) for d in range(DAYS)]
    archive = STATE / "archive"
    if not (archive / "archive.json").exists() or not (STATE / "ris").is_dir():
        print("building the demo archive ...", flush=True)
        shutil.rmtree(archive, ignore_errors=True)
        build_archive(archive, FIRST_DATE, DAYS)
        # more than pixels: a GSPS and a KOS on a CT study, and the RIS's export of its reports
        add_clinical(archive, dates[1].strftime("%Y%m%d"), dangling=False)
        shutil.rmtree(STATE / "ris", ignore_errors=True)
        ris_export(archive, STATE / "ris", [d.strftime("%Y%m%d") for d in dates], quirks_on=dates[1].strftime("%Y%m%d"))
    shutil.rmtree(HOME, ignore_errors=True)  # a fresh Airflow DB: the bucket is what persists
    shutil.rmtree(OUT, ignore_errors=True)
    HOME.mkdir(parents=True)
    OUT.mkdir(parents=True)
    (HOME / "passwords.json").write_text(json.dumps({DEMO_USER: secrets.token_urlsafe(12)}))
    staging = STATE / "staging"

    pacs = SimulatedPACS(archive)
    s3 = S3Server()
    mail = MailSink(OUT / "emails")
    procs: list[subprocess.Popen] = []
    try:
        s3.create_bucket(BUCKET)
        restored = s3.restore(BUCKET, STATE / "s3-snapshot")
        objects_before = s3.count(BUCKET, STUDIES + "/")
        print(
            f"simulated PACS on 127.0.0.1:{pacs.port} ({len(pacs.records)} instances); "
            f"S3 at {s3.endpoint_url} ({restored} objects restored); SMTP on {mail.port}",
            flush=True,
        )
        api_port = free_port()
        env = airflow_env(pacs.port, s3.endpoint_url, mail.port, api_port, staging)
        env["AIRFLOW_VAR_PACS_MIGRATION_CONFIG_PATH"] = str(demo_config())
        print("airflow db migrate ...", flush=True)
        airflow_cli(env, "db", "migrate", timeout=600)
        # Register the DAG and queue the backfill before any service writes to SQLite.
        airflow_cli(env, "pools", "set", "pacs_source_associations", "4", "Concurrent associations to the legacy PACS")
        airflow_cli(env, "dags", "reserialize")
        listed = json_rows(airflow_cli(env, "dags", "list", "-o", "json"))
        if not any(d.get("dag_id") == DAG_ID for d in listed):
            raise RuntimeError(f"DAG not registered: {airflow_cli(env, 'dags', 'list-import-errors')}")
        airflow_cli(env, "dags", "unpause", DAG_ID)  # backfill runs stay queued while paused
        print("backfill", dates[0], "->", dates[-1], flush=True)
        airflow_cli(
            env,
            "backfill",
            "create",
            "--dag-id",
            DAG_ID,
            "--from-date",
            dates[0].isoformat(),
            "--to-date",
            dates[-1].isoformat(),
            "--max-active-runs",
            "2",
        )
        logs = HOME / "service-logs"
        for service in ("api-server", "scheduler", "dag-processor"):
            procs.append(start_airflow(service, [service], env, logs))
        deadline = time.monotonic() + TIMEOUT_S
        runs: list[dict] = []
        while time.monotonic() < deadline:
            runs = [
                r
                for r in json_rows(airflow_cli(env, "dags", "list-runs", DAG_ID, "-o", "json"))
                if r.get("logical_date") and dt.date.fromisoformat(r["logical_date"][:10]) in dates
            ]
            done = [r for r in runs if r["state"] in ("success", "failed")]
            print(f"  {len(done)}/{len(dates)} runs finished", flush=True)
            if len(done) == len(dates) and len(runs) == len(dates):
                break
            for p in procs:
                if p.poll() is not None:
                    raise RuntimeError(f"an Airflow service exited early ({p.args}); see {logs}")
            time.sleep(10)
        else:
            raise RuntimeError(f"backfill did not finish within {TIMEOUT_S} s; see {logs}")
        time.sleep(2)  # the last report mail is flushed before the run is marked done; be safe
        summary = collect_summary(s3, dates, mail.messages(), objects_before)
        summary["runs"] = [{"logical_date": r["logical_date"], "state": r["state"]} for r in runs]
        summary["wall_time_s"] = round(time.monotonic() - t0, 1)
        (OUT / "summary.json").write_text(json.dumps(summary, indent=2))
        print_table(summary, runs, time.monotonic() - t0)
        write_trace_example(s3)
        s3.save(BUCKET, STATE / "s3-snapshot.new")
        shutil.rmtree(STATE / "s3-snapshot", ignore_errors=True)
        (STATE / "s3-snapshot.new").rename(STATE / "s3-snapshot")
        ok = (
            all(r["state"] == "success" for r in runs)
            and summary["validation_passed"]
            and summary["expected"] == summary["migrated"] + summary["quarantined"] + summary["unresolved"]
        )
        url = f"http://127.0.0.1:{api_port}"
        if args.screenshots:
            for path in screenshots(url, args.screenshots):
                print(f"screenshot: {path}", flush=True)
        if args.keep or os.environ.get("KEEP") == "1":
            keep_ui(url)
        return 0 if ok else 1
    finally:
        stop_all(procs)
        mail.stop()
        s3.stop()
        pacs.stop()


if __name__ == "__main__":
    sys.exit(main())
