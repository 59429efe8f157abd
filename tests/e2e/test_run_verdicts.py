"""Issue 13.1: the report never claims more than was checked. Each task of
pacs_migration is failed in turn (dag.test, in-process, so the step the task
calls is replaced by one that raises); the mail must not say PASSED, must
name the task and the error class, and must not carry the error's message."""

from __future__ import annotations

import datetime as dt
import email
import json

import pytest

from tests.e2e.test_pacs_migration_dag import _dag, _is_alert, _mail_parts, _reports, _run, _task_states

pytestmark = pytest.mark.e2e
DATE = dt.date(2019, 3, 1)
CANARY = "CANARY^SECRET-MESSAGE"


def _no_retries():
    """The DAG, its tasks without retries: each failure here is deterministic,
    waiting out the retry delays (20 s, then 40 s) would prove nothing."""
    dag = _dag()
    for t in dag.tasks:
        t.retries = 0
    return dag


def _boom(*args, **kwargs):
    raise RuntimeError(CANARY)


@pytest.mark.parametrize(
    "step, failed",
    [
        ("take_date_census", ("census",)),
        ("transfer_step", ("partition.transfer",)),
        ("validate_step", ("partition.validate",)),
        # validate writes the lineage record: it fails, then the lineage task fails writing it
        ("lineage_step", ("partition.validate", "partition.lineage")),
    ],
)
def test_each_failed_task_makes_the_report_incomplete(airflow_db, airflow_connections, monkeypatch, step, failed):
    from include.pacs_migration import steps

    monkeypatch.setattr(steps, step, _boom)
    run = _run(_no_retries(), DATE)
    assert run.state == "failed"
    mails = _reports(airflow_connections["mail"])
    assert len(mails) == 1
    msg, html, _ = _mail_parts(mails[0])
    assert "PASSED" not in msg["Subject"]
    assert "validation INCOMPLETE" in msg["Subject"], msg["Subject"]
    assert f"{failed[0]} failed (RuntimeError)" in msg["Subject"]
    assert all(f'data-failure="{task_id}"' in html for task_id in failed)
    assert CANARY not in str(msg) + html
    if failed == ("census",):
        assert "The census did not complete" in html and "found no studies" not in html
    # the operators were alerted at once, naming the task and the error class, never its message
    alerts = [m for m in airflow_connections["mail"].messages() if _is_alert(m)]
    subjects = [email.message_from_bytes(m.read_bytes())["Subject"] for m in alerts]
    for task_id in failed:
        assert any(f"ALERT pacs_migration.{task_id}" in s and s.endswith("failed: RuntimeError") for s in subjects)
    assert not any(CANARY in m.read_text(errors="replace") for m in alerts)
    lineage = {st for (task, _p), st in _task_states(run).items() if task == "partition.lineage"}
    if step == "validate_step":  # validate wrote no lineage record: the lineage task did, for every partition
        assert lineage == {"success"}
    elif step == "transfer_step":  # it tried (a transfer that wrote no manifest leaves nothing to record)
        assert lineage == {"failed"}


def test_unreachable_pacs_still_mails_incomplete(airflow_db, airflow_connections, monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_PACS_SOURCE",
        json.dumps(
            {
                "conn_type": "generic",
                "host": "127.0.0.1",
                "port": 9,  # discard: nothing listens
                "extra": {"called_ae_title": "LEGACYPACS", "calling_ae_title": "PACSMIGRATE"},
            }
        ),
    )
    run = _run(_no_retries(), DATE)
    assert run.state == "failed"
    msg = email.message_from_bytes(_reports(airflow_connections["mail"])[-1].read_bytes())
    assert msg["Subject"].endswith("validation INCOMPLETE: census failed (DicomNetworkError)"), msg["Subject"]


def test_broken_config_still_mails_compliance_and_operators(airflow_db, airflow_connections, tmp_path, monkeypatch):
    import yaml

    from include.pacs_migration.config import read_yaml
    from include.pacs_migration_dags import DEFAULT_CONFIG

    data = read_yaml(DEFAULT_CONFIG)
    data["normalisation"] = data.pop("normalization")  # misspelt: must not fall back to defaults silently
    data["report"]["operators"] = ["pacs-team@hospital.example"]
    path = tmp_path / "migration.yaml"
    path.write_text(yaml.safe_dump(data))
    (tmp_path / "rules").symlink_to(DEFAULT_CONFIG.parent / "rules")
    monkeypatch.setenv("AIRFLOW_VAR_PACS_MIGRATION_CONFIG_PATH", str(path))
    run = _run(_no_retries(), DATE)
    assert run.state == "failed"
    msg, html, _ = _mail_parts(_reports(airflow_connections["mail"])[-1])
    assert "validation INCOMPLETE: census failed (ConfigError at normalisation)" in msg["Subject"]
    assert "compliance@hospital.example" in msg["To"] and "pacs-team@hospital.example" in msg["To"]


def test_the_nightly_window_deadline_alerts_the_operators(airflow_db, airflow_connections):
    """What the nightly run's DeadlineAlert calls when the window ends with the run still going."""
    from include.pacs_migration_airflow import window_deadline_missed

    window_deadline_missed({"run_id": "scheduled__2019-03-03T19:00:00+00:00"}, window="20:00-06:00 Europe/Brussels")
    msg = email.message_from_bytes(airflow_connections["mail"].messages()[-1].read_bytes())
    assert msg["Subject"].endswith(
        "ALERT pacs_nightly run scheduled__2019-03-03T19:00:00+00:00 will not finish inside the window "
        "20:00-06:00 Europe/Brussels"
    )
    assert "compliance@hospital.example" in msg["To"]
