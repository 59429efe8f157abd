"""Airflow glue for the DAGs: turns Connections, Variables and the YAML file
into the core's plain config and clients. The core itself never imports
Airflow; this module is the only place that joins the two."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from airflow.sdk import BaseHook, Variable

from include.pacs_migration.config import ConfigError, MigrationConfig, deep_merge, load_config, read_yaml
from include.pacs_migration.store import ObjectStore

DEFAULT_CONFIG = Path(__file__).parent / "config" / "migration.yaml"
SOURCE_CONN_ID = "pacs_source"
AWS_CONN_ID = "aws_default"


def _variable(name: str) -> str | None:
    try:
        return Variable.get(name, default=None)
    except Exception:  # no metadata DB reachable: treat as unset
        return None


def runtime_config() -> MigrationConfig:
    """YAML + Connection ``pacs_source`` + Variables, validated; fails naming the field."""
    path = Path(_variable("pacs_migration_config_path") or DEFAULT_CONFIG)
    data = read_yaml(path)
    try:
        conn = BaseHook.get_connection(SOURCE_CONN_ID)
    except Exception as exc:
        raise ConfigError(f"connection {SOURCE_CONN_ID}", f"not found ({type(exc).__name__})") from None
    extra: dict[str, Any] = conn.extra_dejson or {}
    overlay: dict[str, Any] = {
        "source": {
            "host": conn.host,
            "port": conn.port,
            "called_ae_title": extra.get("called_ae_title"),
            "calling_ae_title": extra.get("calling_ae_title"),
        },
        "target": {"bucket": _variable("pacs_migration_bucket")},
        "report": {"recipients": _variable("pacs_migration_recipients")},
        "staging_dir": _variable("pacs_migration_staging_dir"),
    }
    return load_config(deep_merge(data, overlay), path.parent)


def send_report(cfg: MigrationConfig, subject: str, html: str, files: list[str]) -> None:
    """E-mail ``html`` with attachments through the configured SMTP connection."""
    from airflow.providers.smtp.hooks.smtp import SmtpHook

    with SmtpHook(smtp_conn_id=cfg.report.smtp_connection_id) as hook:
        hook.send_email_smtp(to=list(cfg.report.recipients), from_email=cfg.report.from_address, subject=subject,
                             html_content=html, files=files)


def object_store(cfg: MigrationConfig) -> ObjectStore:
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    client = S3Hook(aws_conn_id=AWS_CONN_ID).get_conn()
    return ObjectStore(client, cfg.target)


def endpoint_of(store: ObjectStore) -> str | None:
    return getattr(store.client.meta, "endpoint_url", None)


def to_json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def emit_openlineage(record: dict[str, Any]) -> bool:
    """Emit the partition's OpenLineage event through the provider's transport.

    Returns False when OpenLineage is disabled in the Airflow configuration.
    """
    from airflow.providers.openlineage import conf
    from airflow.sdk import get_current_context

    if conf.is_disabled():
        return False
    from airflow.providers.openlineage.plugins.adapter import OpenLineageAdapter
    from airflow.providers.openlineage.plugins.listener import get_openlineage_listener

    from include.pacs_migration.openlineage import partition_run_event

    ctx = get_current_context()
    ti = ctx["ti"]
    dag_run = ctx["dag_run"]
    when = dag_run.logical_date or dag_run.run_after
    parent_id = OpenLineageAdapter.build_task_instance_run_id(
        dag_id=ti.dag_id, task_id=ti.task_id, try_number=ti.try_number, logical_date=when, map_index=ti.map_index
    )
    namespace = conf.namespace()
    event = partition_run_event(record, namespace, (namespace, f"{ti.dag_id}.{ti.task_id}", str(parent_id)))
    get_openlineage_listener().adapter.emit(event)
    return True
