"""Airflow glue: turns Connections, Variables and the YAML file into the
core's plain config and clients, and gives Airflow what it asks of a project:
the DAGs' default args and assets, failure alerts, the ``dicom`` connection
type's hook and the migration dashboard's app. The core itself never imports
Airflow; this module is the only place that joins the two. DAG files import
it at parse time: its own imports stay light (the core's heavy parts are
imported where they are used)."""

from __future__ import annotations

import html
import json
import mimetypes
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import Asset, BaseHook, BaseNotifier, Variable

from include.pacs_migration.config import (
    ConfigError,
    MigrationConfig,
    ReportConfig,
    deep_merge,
    load_config,
    read_yaml,
    source_overlay,
)
from include.pacs_migration.privacy import SECRET_CONNECTION, SECRET_VARIABLE
from include.pacs_migration_dags import CONFIG_ENV, alert_notifiers, asset_uris, config_path, source_tasks

if TYPE_CHECKING:
    from include.pacs_migration.steps import Services
    from include.pacs_migration.store import ObjectStore

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
    overlay: dict[str, Any] = {
        # a `dicom` Connection (its form's AE titles and TLS files) or a generic one with the same extra keys
        "source": _connection_overlay(SOURCE_CONN_ID),
        "target": {"bucket": _variable("pacs_migration_bucket")},
        "report": {"recipients": _variable("pacs_migration_recipients")},
        "staging_dir": _variable("pacs_migration_staging_dir"),
    }
    if isinstance(data.get("sources"), list):  # each further archive: its own Connection pacs_source_<name>
        overlay["sources"] = [
            deep_merge(src, _connection_overlay(f"{SOURCE_CONN_ID}_{src['name']}"))
            if isinstance(src, dict) and isinstance(src.get("name"), str)
            else src
            for src in data["sources"]
        ]
    return load_config(deep_merge(data, overlay), path.parent)


def _connection_overlay(conn_id: str) -> dict[str, Any]:
    """The ``source`` keys a PACS Connection gives; a missing one fails naming it."""
    try:
        conn = BaseHook.get_connection(conn_id)
    except Exception as exc:
        raise ConfigError(f"connection {conn_id}", f"not found ({type(exc).__name__})") from None
    return source_overlay(conn.host, conn.port, conn.extra_dejson or {})


def send_report(cfg: MigrationConfig, subject: str, html: str, files: list[str]) -> None:
    """E-mail ``html`` with attachments to the report's recipients."""
    send_email(cfg.report, list(cfg.report.recipients), subject, html, files)


def send_email(report: ReportConfig, to: list[str], subject: str, html: str, files: list[str]) -> None:
    """E-mail ``html`` with attachments through the configured SMTP connection."""
    from airflow.providers.smtp.hooks.smtp import SmtpHook

    with SmtpHook(smtp_conn_id=report.smtp_connection_id) as hook:
        hook.send_email_smtp(to=to, from_email=report.from_address, subject=subject, html_content=html, files=files)


@cache
def _s3_hook_class() -> type:
    """S3Hook naming its caller: the stock hook finds the operator for its user agent with
    ``inspect.stack()``, which reads the source of every frame and rescans ``sys.modules``
    (0.6 s of each task in a profile of the benchmark date, with the preloaded libraries)."""
    import boto3.session
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    class PacsS3Hook(S3Hook):
        def _get_caller(self, target_function_name: str = "execute") -> str:
            return "PacsMigration"

        def get_session(self, region_name: str | None = None, deferrable: bool = False) -> Any:
            # botocore's models parsed once per worker (store.warm_up, preloaded), not per task
            from include.pacs_migration.store import share_models

            session = super().get_session(region_name, deferrable)
            if isinstance(session, boto3.session.Session):
                share_models(session._session)  # the botocore session boto3 wraps (register_component is public)
            return session

    return PacsS3Hook


def object_store(cfg: MigrationConfig, conn_id: str = AWS_CONN_ID) -> ObjectStore:
    from include.pacs_migration.store import ObjectStore

    client = _s3_hook_class()(aws_conn_id=conn_id, config=cfg.target.client_config()).get_conn()
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
    from include.pacs_migration.steps import Services

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

    from include.pacs_migration.logs import configure_logging

    configure_logging()
    try:
        yield
    except AirflowFailException:
        raise
    except Exception as exc:
        ti = get_current_context()["ti"]
        ti.xcom_push(FAILURE_KEY, {"task": ti.task_id, "error": error_label(exc), "partition": partition})
        raise


def failing_tasks() -> list[str]:
    """Every task of ``pacs_migration`` that records its failure: each source's census and
    partition group, and the reports."""
    out = []
    for src in source_tasks():
        group = src.task_id("partition")
        out += [src.task_id("census"), f"{group}.transfer", f"{group}.validate", f"{group}.lineage"]
    return [*out, "reports"]


def run_failures(ti: Any) -> tuple[Any, ...]:
    """The task failures of this run that :func:`recorded_failure` left in XCom."""
    from include.pacs_migration.report import TaskFailure

    pulled = ti.xcom_pull(task_ids=failing_tasks(), key=FAILURE_KEY) or []
    return tuple(TaskFailure.from_json(f) for f in pulled if isinstance(f, dict))


def run_census(ti: Any) -> tuple[list[dict[str, Any]], bool]:
    """(every source's partitions of this run, whether every source's census completed)."""
    parts, complete = [], True
    for src in source_tasks():
        found = ti.xcom_pull(task_ids=src.task_id("census"))
        complete &= found is not None
        parts += found or []
    return parts, complete


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
        reports_csv,
        reports_figures,
        run_verdict,
        shared_studies,
        subject,
    )

    ctx = get_current_context()
    ti, run_id = ctx["ti"], ctx["run_id"]
    failures = run_failures(ti)
    parts, census_completed = run_census(ti)
    partitions = [Partition.from_json(p) for p in parts]
    try:
        cfg: MigrationConfig | None = runtime_config()
        report_cfg = cfg.report
        store = object_store(cfg)
        figures = [partition_figures(store, p, run_id) for p in partitions]
        reports = [reports_figures(store, d, run_id) for d in sorted({p.study_date for p in partitions})]
        shared = shared_studies(store, partitions) if any(p.source for p in partitions) else []
        bucket_uri = f"s3://{cfg.target.bucket}/{cfg.target.prefix}"
    except Exception as exc:
        cfg, store, figures, reports, shared, bucket_uri = None, None, [], [], [], "(configuration not readable)"
        failures += (TaskFailure("report", error_label(exc)),)
        report_cfg = fallback_report_config()
    verdict = run_verdict(figures, failures, census_completed, reports)
    html = render_html(
        run_id,
        study_date,
        figures,
        bucket_uri,
        failures,
        census_completed,
        cfg.ruleset.label if cfg else None,
        reports=reports,
        shared=shared,
    )
    name = re.sub(r"[^0-9A-Za-z_-]+", "-", study_date).strip("-")  # a date, or "3 requested studies"
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / f"pacs-migration-{name}.csv"
        csv_path.write_text(figures_csv(figures), encoding="utf-8")
        files = [str(csv_path)]
        if any(r.expected for r in reports):
            reports_path = Path(tmp) / f"pacs-migration-{name}-reports.csv"
            reports_path.write_text(reports_csv(reports), encoding="utf-8")
            files.append(str(reports_path))
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
            subject(report_cfg.subject_prefix, study_date, figures, failures, census_completed, reports),
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

    from include.pacs_migration.logs import configure_logging
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


# ---------------------------------------------------------------- what the DAG files take at parse time


def default_args() -> dict[str, Any]:
    """Every migration DAG's task defaults: retries with backoff, and failure
    alerts (e-mail to the operators, plus ``alerts.notifiers`` of the YAML)."""
    import datetime as dt

    return {
        "retries": 2,
        "retry_delay": dt.timedelta(seconds=20),
        "retry_exponential_backoff": True,
        "on_failure_callback": failure_notifiers(alert_notifiers()),
    }


def archive_asset() -> Asset:
    """The migrated archive as an Airflow asset: each validated partition adds an
    event with the partition key ``YYYY-MM-DD|MODALITY`` (the Assets view lists them;
    downstream DAGs can be scheduled per partition with ``PartitionedAssetTimetable``)."""
    return Asset(name="pacs_archive", uri=asset_uris()["pacs_archive"], group="pacs")


def assessment_asset() -> Asset:
    """The archive's assessment (``_assessment/``): ``pacs_assessment`` produces it, ``pacs_nightly`` plans from it."""
    return Asset(name="pacs_assessment", uri=asset_uris()["pacs_assessment"], group="pacs")


# ---------------------------------------------------------------- failure alerts
# Every migration task that fails for good (its retries spent) tells the operators at once, by
# e-mail through the SMTP Connection; a site adds its own notifiers (Slack, a pager) in the YAML:
# ``alerts.notifiers: ["mysite.alerts:slack_notifier"]``. An alert names the DAG, task, partition,
# run, try and the error's class: never the error's message, which may quote a value from an instance.


class FailureAlert(BaseNotifier):
    """E-mails ``report.operators`` (else ``report.recipients``)."""

    def notify(self, context: Any) -> None:
        ti = context["ti"]
        report = fallback_report_config()  # works even when the configuration is what broke
        to = list(report.operators or report.recipients)
        if not to:
            return
        partition = getattr(ti, "rendered_map_index", None) or (
            str(ti.map_index) if getattr(ti, "map_index", -1) >= 0 else None
        )
        error = error_label(context["exception"]) if context.get("exception") else "failed"
        where = f"{ti.dag_id}.{ti.task_id}" + (f" [{partition}]" if partition else "")
        subject = f"{report.subject_prefix} ALERT {where} failed: {error}"
        rows = [
            ("DAG", ti.dag_id),
            ("task", ti.task_id),
            ("partition", partition or "-"),
            ("run", ti.run_id),
            ("try", getattr(ti, "try_number", "?")),
            ("error", error),
        ]
        body = "".join(f"<tr><th>{k}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
        log = getattr(ti, "log_url", None)
        link = f'<p><a href="{html.escape(log)}">the task log</a></p>' if log else ""
        page = (
            f"<html><body><h1>{html.escape(where)} failed</h1><table>{body}</table>{link}"
            "<p>Its retries are spent. The run's report says what was proven; this alert says what to look at.</p>"
            "</body></html>"
        )
        send_email(report, to, subject, page, [])


def failure_notifiers(dotted: tuple[str, ...] = ()) -> list[Any]:
    """The e-mail alert, then the site's own (``module:callable`` returning a notifier)."""
    out: list[Any] = [FailureAlert()]
    import importlib

    for spec in dotted:
        module, _, name = spec.partition(":")
        out.append(getattr(importlib.import_module(module), name)())
    return out


def window_deadline_missed(context: Any = None, window: str = "", **_: Any) -> None:
    """The nightly run reached the end of its window with work left: a unit
    was stopped part-way (the rest of the night's units are deferred). Mails
    the operators at once. (Airflow 3.3.2's DeadlineAlert would say the same,
    but ``dag.test()`` cannot run a DAG that declares one: its deadline lookup
    fails with ``AttributeError: 'dict' object has no attribute 'hex'``.)"""
    report = fallback_report_config()
    to = list(report.operators or report.recipients)
    run = (context or {}).get("dag_run")
    run_id = getattr(run, "run_id", None) or (context or {}).get("run_id") or "?"
    subject = f"{report.subject_prefix} ALERT pacs_nightly run {run_id} will not finish inside the window {window}"
    body = (
        f"<html><body><p>The nightly run <code>{html.escape(str(run_id))}</code> is still going at the end of the "
        f"clinical window {html.escape(window)}. Its unit under way stops at its next series (what is done is "
        "recorded, the rest stays pending); units not started are deferred to the next night. Look at the night's "
        "budgets (<code>plan.budget</code>) if this repeats.</p></body></html>"
    )
    if to:
        send_email(report, to, subject, body, [])


# ---------------------------------------------------------------- the `dicom` connection type
# Registered by this project's provider entry point (include/pacs_migration_provider.py).


class DicomHook(BaseHook):
    """A DICOM peer (the legacy PACS): C-ECHO as the connection test."""

    conn_name_attr = "dicom_conn_id"
    default_conn_name = "pacs_source"
    conn_type = "dicom"
    hook_name = "DICOM (legacy PACS)"

    def __init__(self, dicom_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dicom_conn_id = dicom_conn_id

    def source(self, connection: Any = None) -> Any:
        from include.pacs_migration.config import SourceConfig

        conn = connection or self.get_connection(self.dicom_conn_id)
        values = {k: v for k, v in source_overlay(conn.host, conn.port, conn.extra_dejson or {}).items() if v}
        return SourceConfig.model_validate(values)

    def test_connection(self, connection: Any = None) -> tuple[bool, str]:
        """C-ECHO the peer: (True, who answered) or (False, why not, naming the field or the error class)."""
        from pydantic import ValidationError

        from include.pacs_migration.dimse import echo

        try:
            source = self.source(connection or self.get_connection(self.dicom_conn_id))
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(x) for x in first["loc"])
            return False, f"{field}: {first['msg']}"
        peer = f"{source.called_ae_title}@{source.host}:{source.port}"
        try:
            status = echo(source)
        except Exception as exc:  # the peer's answer, not a crash of the form
            return False, f"{peer} did not answer a C-ECHO from {source.calling_ae_title}: {type(exc).__name__}: {exc}"
        if status != 0:
            return False, f"{peer} answered the C-ECHO with status 0x{status:04X}"
        return True, f"{peer} answered a C-ECHO from {source.calling_ae_title}" + (" over TLS" if source.tls else "")


# ---------------------------------------------------------------- the migration dashboard


READ_AS = "pacs_migration"  # who may read this DAG may read the dashboard
ARTIFACTS = ("validation.json", "lineage.json", "census.json")  # what a partition's links may open, and gx/...


def create_app() -> Any:
    """The migration dashboard, a FastAPI app the plugin mounts at ``/pacs-migration``
    in the api-server (plugins/pacs_migration_dashboard.py). Airflow does not
    authenticate plugin apps: every route needs a user the auth manager lets read
    ``pacs_migration`` (all three roles), through the api-server's own ``get_user``."""
    from airflow.api_fastapi.core_api.security import get_user
    from fastapi import Depends, FastAPI, HTTPException, Query, Request
    from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

    app = FastAPI(title="PACS migration dashboard", docs_url=None, redoc_url=None, openapi_url=None)

    # A default, not Annotated[...]: with postponed annotations FastAPI could not resolve this local name.
    async def reader(user: Any = Depends(get_user)) -> Any:  # noqa: B008
        from airflow.api_fastapi.app import get_auth_manager
        from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails

        if not get_auth_manager().is_authorized_dag(method="GET", details=DagDetails(id=READ_AS), user=user):
            raise HTTPException(403, f"not allowed to read {READ_AS}")
        return user

    app.state.reader = reader  # the one gate of every route (tests override it)

    @app.exception_handler(HTTPException)
    async def to_login(request: Request, exc: HTTPException) -> Response:
        """A person without a session is sent to Airflow's login; an API caller gets the status."""
        if exc.status_code == 401 and "text/html" in request.headers.get("accept", ""):
            from airflow.api_fastapi.app import get_auth_manager

            try:
                return RedirectResponse(get_auth_manager().get_url_login(next_url=str(request.url)))
            except RuntimeError:  # no auth manager here (not inside the api-server): say 401
                pass
        return JSONResponse({"detail": exc.detail}, exc.status_code)

    @app.get("/", response_class=HTMLResponse, dependencies=[Depends(reader)])
    def page() -> str:
        from include.pacs_migration.templates import render

        cfg, _store = dashboard_sources()
        return render("dashboard.html.j2", bucket_uri=f"s3://{cfg.target.bucket}/{cfg.target.prefix}")

    @app.get("/api/overview", dependencies=[Depends(reader)])
    def overview() -> dict[str, Any]:
        return _answer("overview")

    @app.get("/api/heatmap", dependencies=[Depends(reader)])
    def heatmap(
        granularity: str = Query("month", pattern="^(month|day)$"), year: int | None = Query(None, ge=1900, le=2100)
    ) -> dict[str, Any]:
        return _answer("heatmap", granularity=granularity, year=year)

    @app.get("/api/worklist", dependencies=[Depends(reader)])
    def worklist() -> dict[str, Any]:
        return _answer("worklist")

    @app.get("/api/quarantine.csv", dependencies=[Depends(reader)])
    def quarantine_csv() -> Response:
        from include.pacs_migration import coverage, dashboard

        _cfg, store = dashboard_sources()
        body = dashboard.quarantine_csv(coverage.read(store))
        headers = {"Content-Disposition": 'attachment; filename="quarantine-by-reason.csv"'}
        return Response(body, media_type="text/csv", headers=headers)

    @app.get("/partition/{study_date}/{modality}/{name:path}", dependencies=[Depends(reader)])
    def artifact(study_date: str, modality: str, name: str) -> Response:
        """A partition's proof: its verdict, lineage, census summary, GX Data Docs."""
        return source_artifact("", study_date, modality, name)

    @app.get("/source/{source}/partition/{study_date}/{modality}/{name:path}", dependencies=[Depends(reader)])
    def source_artifact(source: str, study_date: str, modality: str, name: str) -> Response:
        """The same, of a further source archive's partition."""
        from include.pacs_migration.manifest import PartitionManifests
        from include.pacs_migration.partition import Partition

        try:
            partition = Partition.parse(f"{source}/{study_date}/{modality}" if source else f"{study_date}/{modality}")
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        if name not in ARTIFACTS and not (name.startswith("gx/") and ".." not in name):
            raise HTTPException(404, "not an artifact of a partition")
        _cfg, store = dashboard_sources()
        data = store.get_or_none(PartitionManifests(store, partition).key(name))
        if data is None:
            raise HTTPException(404, f"{partition.key} has no {name}")
        return Response(data, media_type=mimetypes.guess_type(name)[0] or "application/octet-stream")

    return app


def dashboard_sources() -> tuple[Any, Any]:
    """The configuration and the bucket the dashboard reads (tests and the benchmark replace it)."""
    cfg = runtime_config()
    return cfg, object_store(cfg)


def _answer(what: str, **args: Any) -> dict[str, Any]:
    import datetime as dt

    from include.pacs_migration.dashboard import answer

    cfg, store = dashboard_sources()
    return answer(what, cfg, store, dt.datetime.now(dt.UTC), **args)
