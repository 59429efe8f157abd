"""Static test of docker-compose.yml (this machine has no Docker engine)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
AIRFLOW_SERVICES = {
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_services_present(compose):
    services = set(compose["services"])
    assert services >= AIRFLOW_SERVICES
    assert {"postgres", "redis", "orthanc", "orthanc-seed", "minio", "minio-init", "mailpit"} <= services


def test_every_service_has_a_pinned_image_and_a_healthcheck(compose):
    for name, svc in compose["services"].items():
        image = svc.get("image", "")
        assert re.fullmatch(r"[\w./-]+:[\w.\-]+", image), f"{name}: image {image!r} not pinned"
        assert not image.endswith(":latest"), name
        assert svc.get("healthcheck", {}).get("test"), f"{name}: no healthcheck"


def test_airflow_services_share_executor_database_and_broker(compose):
    envs = [compose["services"][s]["environment"] for s in AIRFLOW_SERVICES]
    for key in (
        "AIRFLOW__CORE__EXECUTOR",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
        "AIRFLOW__CELERY__BROKER_URL",
        "AIRFLOW__CELERY__RESULT_BACKEND",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL",
    ):
        values = {e[key] for e in envs}
        assert len(values) == 1, (key, values)
    assert envs[0]["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert envs[0]["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql")
    assert envs[0]["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://redis:")


def test_airflow_services_mount_the_project(compose):
    for name in AIRFLOW_SERVICES:
        mounts = {v.split(":")[1] for v in compose["services"][name]["volumes"] if v.startswith("./")}
        assert {"/opt/airflow/dags", "/opt/airflow/plugins", "/opt/airflow/include"} <= mounts, name


def test_env_example_defines_the_connections_the_dag_reads():
    env = (ROOT / ".env.example").read_text()
    for key in (
        "AIRFLOW_CONN_PACS_SOURCE",
        "AIRFLOW_CONN_AWS_DEFAULT",
        "AIRFLOW_CONN_SMTP_DEFAULT",
        "AIRFLOW_VAR_PACS_MIGRATION_BUCKET",
        "AIRFLOW_VAR_PACS_MIGRATION_RECIPIENTS",
    ):
        assert re.search(rf"^{key}=", env, re.M), key
    assert (ROOT / "Dockerfile").read_text().startswith("# ") and "apache/airflow:3.3.2" in (
        ROOT / "Dockerfile"
    ).read_text()
