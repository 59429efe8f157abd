"""Failure alerts: every migration task that fails for good (its retries
spent) tells the operators at once, by e-mail through the SMTP Connection;
a site adds its own notifiers (Slack, a pager) in the YAML:
``alerts.notifiers: ["mysite.alerts:slack_notifier"]`` (each a callable
returning an Airflow notifier). The alert names the DAG, task, partition,
run, try and the error's class: never the error's message, which may quote
a value from an instance."""

from __future__ import annotations

import html
import importlib
from typing import Any

from airflow.sdk import BaseNotifier


class FailureAlert(BaseNotifier):
    """E-mails ``report.operators`` (else ``report.recipients``)."""

    def notify(self, context: Any) -> None:
        from include.pacs_migration_airflow import error_label, fallback_report_config, send_email

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
    from include.pacs_migration_airflow import fallback_report_config, send_email

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
