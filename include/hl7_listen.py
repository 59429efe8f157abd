"""``python -m include.hl7_listen`` (``make hl7-listen``, the compose service
``hl7``): the MLLP listener the RIS pushes its ORU^R01 reports to. Each
message is kept in the bucket's report inbox, then acknowledged (AA, AE or
AR: see ``include/pacs_migration/reports/mllp.py``); the next run of its
study date places it in its study. Outside Airflow, it reads what the
workers read, from the environment: ``--config`` or
``$AIRFLOW_VAR_PACS_MIGRATION_CONFIG_PATH``, ``$AIRFLOW_CONN_PACS_SOURCE``,
``$AIRFLOW_VAR_PACS_MIGRATION_BUCKET``, the AWS credentials (writing only
``_reports/inbox/``: ``docs/iam/hl7-listener.json``).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from include.dicomweb_serve import BUCKET_ENV, SOURCE_ENV, source_from_connection
from include.pacs_migration.config import ConfigError, MigrationConfig, load_config, read_yaml
from include.pacs_migration_dags import config_path


def runtime_config(path: Path) -> MigrationConfig:
    data = read_yaml(path)
    if uri := os.environ.get(SOURCE_ENV):
        data["source"] = {**data.get("source", {}), **{k: v for k, v in source_from_connection(uri).items() if v}}
    if bucket := os.environ.get(BUCKET_ENV):
        data["target"] = {**data.get("target", {}), "bucket": bucket}
    return load_config(data, path.parent)


def build(args: argparse.Namespace) -> Any:
    import boto3

    from include.pacs_migration.logs import configure_logging
    from include.pacs_migration.reports.mllp import MllpListener
    from include.pacs_migration.store import ObjectStore

    configure_logging()
    cfg = runtime_config(args.config or config_path())
    client = boto3.client("s3", endpoint_url=args.endpoint_url, config=cfg.target.client_config())
    store = ObjectStore(client, cfg.target)
    r = cfg.reports
    return MllpListener(store, r.accession_field, r.default_charset, r.max_message_kb << 10, r.mllp_idle_seconds), r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hl7-listen", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--host", default=None, help="default: reports.mllp_host")
    ap.add_argument("--port", type=int, default=None, help="default: reports.mllp_port")
    ap.add_argument("--endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL_S3"))
    args = ap.parse_args(argv)
    try:
        listener, r = build(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    listener.start(args.host or r.mllp_host, args.port if args.port is not None else r.mllp_port)
    print(f"hl7: listening on {args.host or r.mllp_host}:{listener.port}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    listener.stop()
    s = listener.stats
    print(f"hl7: stopped ({s.accepted} AA, {s.errors} AE, {s.rejected} AR)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
