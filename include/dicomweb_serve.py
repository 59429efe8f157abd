"""``python -m include.dicomweb_serve`` (``make serve``, the compose service
``dicomweb``): the DICOMweb service over the archive, with fallback to the
legacy PACS. Outside Airflow, it reads what the workers read, from the
environment:

- the configuration file: ``--config``, else ``$AIRFLOW_VAR_PACS_MIGRATION_CONFIG_PATH``, else the bundled one;
- the legacy PACS: ``$AIRFLOW_CONN_PACS_SOURCE`` (the Airflow Connection, JSON as in ``.env``
  or a URI ``dicom://host:port?called_ae_title=…&calling_ae_title=…``); without it, no fallback;
- the bucket: ``$AIRFLOW_VAR_PACS_MIGRATION_BUCKET`` over the file's ``target.bucket``;
- the credentials: the AWS environment (``AWS_ACCESS_KEY_ID``… or the instance role;
  ``--endpoint-url`` for MinIO or a test server), reading only (``docs/iam/dicomweb.json``);
- the bearer tokens: ``$PACS_DICOMWEB_TOKENS_FILE``, one ``user token`` per line;
- the audit trail's patient keys: ``$PACS_PATIENT_KEY_SECRET``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import urllib.parse
from pathlib import Path
from typing import Any

from include.pacs_migration.config import ConfigError, load_config, read_yaml, source_overlay
from include.pacs_migration_dags import config_path

TOKENS_ENV = "PACS_DICOMWEB_TOKENS_FILE"
SOURCE_ENV = "AIRFLOW_CONN_PACS_SOURCE"
BUCKET_ENV = "AIRFLOW_VAR_PACS_MIGRATION_BUCKET"


def read_tokens(path: Path) -> dict[str, str]:
    """``user token`` per line (# comments); a bad line is named, its token never shown."""
    tokens: dict[str, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 2 or len(fields[1]) < 16:
            raise ConfigError(f"{path}:{n}", "expected 'user token' with a token of 16 characters or more")
        tokens[fields[1]] = fields[0]
    if not tokens:
        raise ConfigError(str(path), "no tokens: nobody could use the service")
    return tokens


def source_from_connection(value: str) -> dict[str, Any]:
    """The ``source`` keys from the PACS's Airflow Connection as the
    environment holds it: JSON (as in .env) or a URI (``dicom://host:port?called_ae_title=…``)."""
    if value.lstrip().startswith("{"):
        conn = json.loads(value)
        extra = conn.get("extra") or {}
        extra = json.loads(extra) if isinstance(extra, str) else extra
        return source_overlay(conn.get("host"), conn.get("port"), extra)
    parsed = urllib.parse.urlsplit(value)
    extra = {k: v[-1] for k, v in urllib.parse.parse_qs(parsed.query).items()}
    return source_overlay(parsed.hostname, parsed.port, extra)


def build(args: argparse.Namespace) -> Any:
    import boto3

    from include.pacs_migration.audit import AuditTrail
    from include.pacs_migration.dicomweb.legacy import LegacyArchive
    from include.pacs_migration.dicomweb.service import AccessLog, Parts, create_app
    from include.pacs_migration.logs import configure_logging
    from include.pacs_migration.privacy import PatientKeyer
    from include.pacs_migration.store import ObjectStore

    configure_logging()
    path = args.config or config_path()
    data = read_yaml(path)
    uri = os.environ.get(SOURCE_ENV)
    if uri:
        data["source"] = {**data.get("source", {}), **{k: v for k, v in source_from_connection(uri).items() if v}}
    if bucket := os.environ.get(BUCKET_ENV):  # the Variable the workers read, as the environment holds it
        data["target"] = {**data.get("target", {}), "bucket": bucket}
    cfg = load_config(data, path.parent)
    client = boto3.client("s3", endpoint_url=args.endpoint_url, config=cfg.target.client_config())
    store = ObjectStore(client, cfg.target)
    tokens_file = args.tokens_file or os.environ.get(TOKENS_ENV)
    if not tokens_file:
        raise ConfigError(TOKENS_ENV, "set it to a file of 'user token' lines")
    dw = cfg.dicomweb
    legacy = None
    if uri and dw.legacy_fallback:
        legacy = LegacyArchive(
            cfg.source,
            dw.legacy_associations,
            dw.legacy_max_study_mb << 20,
            dw.legacy_cache_mb << 20,
            dw.legacy_cache_seconds,
        )
    secret = os.environ.get("PACS_PATIENT_KEY_SECRET")
    keyer = PatientKeyer.from_secret(secret) if secret else None
    audit = AccessLog(AuditTrail(store, cfg.audit, cfg.source, "dicomweb"), keyer, dw.audit_flush_seconds)
    viewer = args.viewer or None
    app = create_app(Parts(store, dw, read_tokens(Path(tokens_file)), legacy, audit, viewer))
    _flush_every(audit, dw.audit_flush_seconds)
    return app


def _flush_every(audit: Any, seconds: float) -> None:
    def loop() -> None:
        while not stop.wait(seconds):
            audit.flush()

    stop = threading.Event()
    threading.Thread(target=loop, name="audit-flush", daemon=True).start()
    import atexit

    atexit.register(lambda: (stop.set(), audit.flush()))


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    ap = argparse.ArgumentParser(prog="dicomweb-serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8042)
    ap.add_argument("--endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL_S3"))
    ap.add_argument("--tokens-file", default=None)
    ap.add_argument("--viewer", type=Path, default=None, help="OHIF's dist/ folder, served at / (make viewer)")
    args = ap.parse_args(argv)
    try:
        app = build(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    # No access log: request paths carry study UIDs and query strings may carry patient names.
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
