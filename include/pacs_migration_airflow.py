"""Airflow glue for the DAGs: turns Connections, Variables and the YAML file
into the core's plain config and clients. The core itself never imports
Airflow; this module is the only place that joins the two."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from airflow.sdk import BaseHook, Variable

from include.pacs_migration.config import ConfigError, MigrationConfig, ReportConfig, deep_merge, load_config, read_yaml
from include.pacs_migration.logs import configure_logging
from include.pacs_migration.privacy import SECRET_CONNECTION, SECRET_VARIABLE
from include.pacs_migration.steps import Services
from include.pacs_migration.store import ObjectStore
from include.pacs_migration_dags import CONFIG_ENV, config_path

SOURCE_CONN_ID = "pacs_source"
FAILURE_KEY = "failure"
AWS_CONN_ID = "aws_default"
# The rollback's own S3 principal (docs/iam/rollback.json): the migration's may never delete a live object.
ROLLBACK_AWS_CONN_ID = "aws_rollback"


def _variable(name: str) -> str | None:
    try:
        return Variable.get(name, default=None)
    except Exception:  # no metadata DB reachable: treat as unset
        return None


def runtime_config() -> MigrationConfig:
    """YAML + Connection ``pacs_source`` + Variables, validated; fails naming the field."""
    path = config_path()
    stored = _variable("pacs_migration_config_path")
    if stored and Path(stored) != path:
        # Only the environment reaches DAG parsing (pool slots, the nightly schedule).
        raise ConfigError(
            "pacs_migration_config_path",
            f"set it as the environment variable {CONFIG_ENV}, "
            "not in the metadata database: DAG parsing must read the same file as tasks",
        )
    data = read_yaml(path)
    try:
        conn = BaseHook.get_connection(SOURCE_CONN_ID)
    except Exception as exc:
        raise ConfigError(f"connection {SOURCE_CONN_ID}", f"not found ({type(exc).__name__})") from None
    from include.pacs_migration_hook import source_overlay

    overlay: dict[str, Any] = {
        # a `dicom` Connection (its form's AE titles and TLS files) or a generic one with the same extra keys
        "source": source_overlay(conn.host, conn.port, conn.extra_dejson or {}),
        "target": {"bucket": _variable("pacs_migration_bucket")},
        "report": {"recipients": _variable("pacs_migration_recipients")},
        "staging_dir": _variable("pacs_migration_staging_dir"),
    }
    return load_config(deep_merge(data, overlay), path.parent)


def send_report(cfg: MigrationConfig, subject: str, html: str, files: list[str]) -> None:
    """E-mail ``html`` with attachments to the report's recipients."""
    send_email(cfg.report, list(cfg.report.recipients), subject, html, files)


def send_email(report: ReportConfig, to: list[str], subject: str, html: str, files: list[str]) -> None:
    """E-mail ``html`` with attachments through the configured SMTP connection."""
    from airflow.providers.smtp.hooks.smtp import SmtpHook

    with SmtpHook(smtp_conn_id=report.smtp_connection_id) as hook:
        hook.send_email_smtp(to=to, from_email=report.from_address, subject=subject, html_content=html, files=files)


def object_store(cfg: MigrationConfig, conn_id: str = AWS_CONN_ID) -> ObjectStore:
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    client = S3Hook(aws_conn_id=conn_id, config=cfg.target.client_config()).get_conn()
    return ObjectStore(client, cfg.target)


def rollback_store(cfg: MigrationConfig) -> ObjectStore:
    """The store as the rollback's principal (Connection ``aws_rollback``);
    where there is none (a demo, a single-principal lab), ``aws_default``."""
    try:
        BaseHook.get_connection(ROLLBACK_AWS_CONN_ID)
    except Exception:
        import logging

        logging.getLogger(__name__).warning("no Connection %s: rolling back as %s", ROLLBACK_AWS_CONN_ID, AWS_CONN_ID)
        return object_store(cfg)
    return object_store(cfg, ROLLBACK_AWS_CONN_ID)


def services(
    max_associations: int = 1, cfg: MigrationConfig | None = None, store: ObjectStore | None = None
) -> Services:
    """Every I/O the steps use, from this deployment's config, Connections and
    OpenLineage transport. ``max_associations``: the PACS pool slots the task holds."""
    cfg = cfg or runtime_config()
    store = store or object_store(cfg)
    return Services(cfg, store, max_associations, endpoint_of(store), emit_openlineage, patient_secret=patient_secret())


def patient_secret() -> str | None:
    """The patient-key secret: Variable ``pacs_patient_key_secret``, else the
    password of Connection ``pacs_patient_key`` (a secrets backend serves either)."""
    if value := _variable(SECRET_VARIABLE):
        return value
    try:
        return BaseHook.get_connection(SECRET_CONNECTION).password or None
    except Exception:  # absent: the transfer fails naming both
        return None


@contextmanager
def date_held(io: Services, study_date: Any) -> Iterator[None]:
    """The task works on ``study_date`` under its run's lease (taken or taken
    again; renewed while the task runs, kept for the run's next task)."""
    from airflow.sdk import get_current_context

    ctx = get_current_context()
    with io.lease(study_date, f"{ctx['dag'].dag_id}/{ctx['run_id']}"):
        yield


def release_date(io: Services, study_date: Any) -> None:
    """The run is over: give the date back (if the run still holds it)."""
    from airflow.sdk import get_current_context

    from include.pacs_migration.lease import DateLease

    ctx = get_current_context()
    DateLease(io.store, study_date, f"{ctx['dag'].dag_id}/{ctx['run_id']}").release()


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


def error_label(exc: BaseException) -> str:
    """An exception's class (and the config field it names, or S3's error
    code): never its message, which may quote a value."""
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code") or exc.response.get("ResponseMetadata", {}).get(
            "HTTPStatusCode"
        )
        return f"S3 {code} ({type(exc).__name__})"
    if isinstance(exc, BotoCoreError):
        return f"S3 unreachable ({type(exc).__name__})"
    field = getattr(exc, "field", None)
    return f"{type(exc).__name__}" + (f" at {field}" if field else "")


@contextmanager
def recorded_failure(partition: str | None = None) -> Iterator[None]:
    """Run a task body; if it fails, leave the failure in XCom for the report
    (class and task only) and fail the task. A proof that fails
    (AirflowFailException) is the verdict, not a task failure."""
    from airflow.sdk import get_current_context
    from airflow.sdk.exceptions import AirflowFailException

    configure_logging()
    try:
        yield
    except AirflowFailException:
        raise
    except Exception as exc:
        ti = get_current_context()["ti"]
        ti.xcom_push(FAILURE_KEY, {"task": ti.task_id, "error": error_label(exc), "partition": partition})
        raise


FAILING_TASKS = ("census", "partition.transfer", "partition.validate", "partition.lineage")


def run_failures(ti: Any) -> tuple[Any, ...]:
    """The task failures of this run that :func:`recorded_failure` left in XCom."""
    from include.pacs_migration.report import TaskFailure

    pulled = ti.xcom_pull(task_ids=list(FAILING_TASKS), key=FAILURE_KEY) or []
    return tuple(TaskFailure.from_json(f) for f in pulled if isinstance(f, dict))


def fallback_report_config() -> ReportConfig:
    """Where to send a report when the configuration itself is broken: the
    recipients Variable or what the YAML's report section holds, leniently."""
    try:
        rep = (read_yaml(config_path()) or {}).get("report") or {}
    except Exception:
        rep = {}
    raw = _variable("pacs_migration_recipients") or rep.get("recipients") or []
    recipients = [r for r in (re.split(r"[,;\s]+", raw) if isinstance(raw, str) else raw) if isinstance(r, str) and r]
    ops = rep.get("operators") or []
    return ReportConfig(
        recipients=tuple(recipients),
        from_address=str(rep.get("from_address") or "pacs-migration@localhost"),
        smtp_connection_id=str(rep.get("smtp_connection_id") or "smtp_default"),
        subject_prefix=str(rep.get("subject_prefix") or "[PACS migration]"),
        operators=tuple(o for o in ops if isinstance(o, str)),
    )


def run_report(dag_id: str, study_date: str) -> dict[str, Any]:
    """The report task: this run's figures and verdict, e-mailed whatever
    happened before (a failed census or a broken config still mail)."""
    import tempfile

    from airflow.sdk import get_current_context

    from include.pacs_migration.partition import Partition
    from include.pacs_migration.report import (
        RunVerdict,
        TaskFailure,
        data_docs_zip,
        figures_csv,
        partition_figures,
        render_html,
        run_verdict,
        subject,
    )

    ctx = get_current_context()
    ti, run_id = ctx["ti"], ctx["run_id"]
    failures = run_failures(ti)
    parts = ti.xcom_pull(task_ids="census")
    census_completed = parts is not None
    partitions = [Partition.from_json(p) for p in parts or []]
    try:
        cfg: MigrationConfig | None = runtime_config()
        report_cfg = cfg.report
        store = object_store(cfg)
        figures = [partition_figures(store, p, run_id) for p in partitions]
        bucket_uri = f"s3://{cfg.target.bucket}/{cfg.target.prefix}"
    except Exception as exc:
        cfg, store, figures, bucket_uri = None, None, [], "(configuration not readable)"
        failures += (TaskFailure("report", error_label(exc)),)
        report_cfg = fallback_report_config()
    verdict = run_verdict(figures, failures, census_completed)
    html = render_html(
        run_id, study_date, figures, bucket_uri, failures, census_completed, cfg.ruleset.label if cfg else None
    )
    name = re.sub(r"[^0-9A-Za-z_-]+", "-", study_date).strip("-")  # a date, or "3 requested studies"
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / f"pacs-migration-{name}.csv"
        csv_path.write_text(figures_csv(figures), encoding="utf-8")
        files = [str(csv_path)]
        if partitions and store is not None:
            docs = Path(tmp) / f"gx-data-docs-{name}.zip"
            docs.write_bytes(data_docs_zip(store, partitions))
            files.append(str(docs))
        # not PASSED: the operators, and the digest's readers at once too
        urgent = [*report_cfg.operators, *(report_cfg.digest.recipients if report_cfg.digest else ())]
        to = list(dict.fromkeys([*report_cfg.recipients, *([] if verdict is RunVerdict.PASSED else urgent)]))
        send_email(
            report_cfg,
            to,
            subject(report_cfg.subject_prefix, study_date, figures, failures, census_completed),
            html,
            files,
        )
    return {"partitions": len(figures), "verdict": verdict.value, "emailed_to": len(to)}


def sync_roles() -> dict[str, int]:
    """Create or update the roles of :mod:`include.pacs_migration.roles` in the
    FAB auth manager (idempotent); how many permissions each holds. DAG-level
    grants (``DAG:<id>``, from the DAGs' access_control) are kept."""
    from airflow.providers.fab.auth_manager.cli_commands.utils import get_application_builder

    from include.pacs_migration.roles import BASE, wanted

    counts = {}
    with get_application_builder() as appbuilder:
        sm = appbuilder.sm
        for role_name, base_name in BASE.items():
            base = sm.find_role(base_name)
            pairs = wanted(role_name, {(p.action.name, p.resource.name) for p in base.permissions})
            role = sm.find_role(role_name) or sm.add_role(role_name)
            dag_level = [p for p in role.permissions if p.resource.name.startswith(("DAG:", "DAG Run:"))]
            perms = [sm.get_permission(a, r) for a, r in sorted(pairs)]
            role.permissions = [p for p in perms if p is not None] + dag_level
            sm.session.commit()
            counts[role_name] = len(role.permissions)
    return counts


def rollback_task(dag_id: str) -> dict[str, Any]:
    """The rollback DAG's work: the params as a selection, the triggering
    user as who asked, an id stable across the task's retries (a retry resumes)."""
    import logging

    from airflow.sdk import get_current_context
    from airflow.sdk.exceptions import AirflowFailException

    from include.pacs_migration.rollback import Selection, SelectionError
    from include.pacs_migration.steps import roll_back

    configure_logging()
    ctx = get_current_context()
    params, dag_run = ctx["params"] or {}, ctx["dag_run"]
    who = getattr(dag_run, "triggering_user_name", None) or "unknown"
    rid = _rollback_id(dag_id, ctx)
    cfg = runtime_config()
    io = replace(services(cfg=cfg, store=rollback_store(cfg)), actor=f"{dag_id}/{ctx['run_id']} by {who}")
    try:
        selection = Selection.parse(
            params.get("partitions") or [], params.get("study_uids") or [], params.get("run_ids") or []
        )
        result = roll_back(io, selection, params.get("reason") or "", who, rid, bool(params.get("dry_run", True)))
    except SelectionError as exc:
        raise AirflowFailException(f"params.{exc}") from None  # a request to correct, not a fault to retry
    for p in result["partitions"]:
        logging.getLogger(__name__).info(
            "%s %s: %d instance(s), %d object(s), %d bytes%s",
            "dry run" if result["dry_run"] else rid,
            p["partition"],
            p["instances"],
            p["objects"],
            p["bytes"],
            " (whole partition)" if p["whole"] else "",
        )
    return result


def _rollback_id(dag_id: str, ctx: Any) -> str:
    """The run's rollback id: the same for every try of the run (a retry, a cleared task), so they resume it."""
    from include.pacs_migration.rollback import rollback_id

    run = ctx["dag_run"]
    when = getattr(run, "logical_date", None) or run.run_after
    return rollback_id(f"{dag_id}/{when.isoformat() if getattr(run, 'logical_date', None) else ctx['run_id']}", when)


def rollback_report(dag_id: str, result: dict[str, Any] | None) -> dict[str, Any]:
    """E-mail compliance the rollback report (a dry run mails nobody). When the
    rollback task failed for good, a rollback that had begun is reported
    INCOMPLETE from its journal (clearing the task resumes it)."""
    from airflow.sdk import get_current_context

    from include.pacs_migration.report import render_rollback_html, rollback_subject
    from include.pacs_migration.rollback import read_record

    if result is not None and result.get("dry_run"):
        return {"emailed_to": 0}
    ctx = get_current_context()
    rid = result["rollback_id"] if result else _rollback_id(dag_id, ctx)
    cfg = runtime_config()
    record = read_record(rollback_store(cfg), rid)
    if record is None:
        if result is None:
            return {"emailed_to": 0}  # refused or failed before it wrote anything: the failure alert says why
        raise RuntimeError(f"rollback {rid}: no record in the bucket")
    html = render_rollback_html(record, f"s3://{cfg.target.bucket}/{cfg.target.prefix}", cfg.rollback.retention_days)
    to = list(cfg.report.recipients) + list(cfg.report.operators)
    send_email(cfg.report, to, rollback_subject(cfg.report.subject_prefix, record), html, [])
    return {"emailed_to": len(to)}


def send_digest(now: Any) -> dict[str, Any]:
    """The digest task: the period's figures across all runs, to ``report.digest.recipients``."""
    from include.pacs_migration import coverage
    from include.pacs_migration.digest import digest, digest_subject, period, render_digest_html

    cfg = runtime_config()
    wanted = cfg.report.digest
    if wanted is None:
        return {"emailed_to": 0, "why": "report.digest is not configured"}
    store = object_store(cfg)
    start, end = period(now, wanted.every)
    value = digest(coverage.read(store), start, end, cfg.target.prefix)
    html = render_digest_html(value, f"s3://{cfg.target.bucket}/{cfg.target.prefix}", now, wanted.every)
    send_email(
        cfg.report, list(wanted.recipients), digest_subject(cfg.report.subject_prefix, value, wanted.every), html, []
    )
    return {"emailed_to": len(wanted.recipients), "partitions": value["period"]["partitions"]}
