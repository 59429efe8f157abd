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
        assert "/opt/airflow/airflow_local_settings.py" in mounts, name  # on PYTHONPATH: the workers' preload


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


# -- issue 16, point 6: safe as shipped ---------------------------------------

DEMO = {"orthanc", "orthanc-seed", "minio", "minio-init", "mailpit"}


def test_demo_peers_are_under_the_demo_profile_and_nothing_depends_on_them(compose):
    for name, svc in compose["services"].items():
        if name in DEMO:
            assert svc.get("profiles") == ["demo"], name
        else:
            assert not svc.get("profiles"), name
            assert not set(svc.get("depends_on", {})) & DEMO, f"{name} depends on a demo-only service"


def test_published_ports_bind_loopback_unless_told(compose):
    published = [(n, p) for n, s in compose["services"].items() for p in s.get("ports", [])]
    assert published
    for name, port in published:
        assert str(port).startswith("${BIND_ADDRESS:-127.0.0.1}:"), (name, port)


def test_secrets_are_required_and_no_default_credential_is_shipped(compose):
    env = compose["x-airflow-common"]["environment"]
    for key in ("AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__CORE__FERNET_KEY", "AIRFLOW_VAR_PACS_PATIENT_KEY_SECRET"):
        assert re.fullmatch(r"\$\{[A-Z_]+:\?.+\}", env[key]), key  # compose refuses to start without it
    assert env["AIRFLOW__CORE__AUTH_MANAGER"].endswith("FabAuthManager")
    text = (ROOT / "docker-compose.yml").read_text() + (ROOT / ".env.example").read_text()
    assert "minioadmin" not in text
    example = dict(
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if "=" in line and line[0] != "#"
    )
    for key in ("AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__CORE__FERNET_KEY", "PACS_PATIENT_KEY_SECRET",
                "_AIRFLOW_WWW_USER_PASSWORD", "MINIO_ROOT_PASSWORD"):  # fmt: skip
        assert example[key] == "", f"{key}: .env.example ships a value"
    init = " ".join(compose["services"]["airflow-init"]["command"])
    assert init.index("include.deploy_preflight") < init.index("airflow db migrate")  # refuses before touching anything
    assert "include.cli sync-roles" in init and "--role migration-admin" in init
    assert "_AIRFLOW_WWW_USER_USERNAME" in init and "_AIRFLOW_WWW_USER_PASSWORD" in init
    assert "MINIO_ROOT_PASSWORD" in " ".join(compose["services"]["minio"]["command"])


def test_preflight_refuses_empty_placeholder_and_weak_secrets():
    from cryptography.fernet import Fernet

    from include.deploy_preflight import problems

    good = {
        "AIRFLOW__API_AUTH__JWT_SECRET": "9f" * 32,
        "AIRFLOW_VAR_PACS_PATIENT_KEY_SECRET": "4e" * 32,
        "_AIRFLOW_WWW_USER_PASSWORD": "correct horse battery",
        "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
        "AIRFLOW_CONN_AWS_DEFAULT": '{"login": "writer", "password": "s3cr3t-from-vault"}',
    }
    assert problems(good) == []
    cases = {
        "AIRFLOW__API_AUTH__JWT_SECRET": ("change-me-to-a-long-random-string", "placeholder"),
        "AIRFLOW_VAR_PACS_PATIENT_KEY_SECRET": ("", "empty"),
        "_AIRFLOW_WWW_USER_PASSWORD": ("admin", "placeholder"),
        "AIRFLOW__CORE__FERNET_KEY": ("", "empty"),
        "AIRFLOW_CONN_AWS_DEFAULT": ('{"password": "REPLACE-ME"}', "REPLACE-ME"),
    }
    for key, (value, why) in cases.items():
        found = problems({**good, key: value})
        assert len(found) == 1 and found[0].startswith(key) and why in found[0], (key, found)
        assert value == "" or value not in found[0] or key.startswith("AIRFLOW_CONN")  # no secret printed
    assert "shorter than 32" in problems({**good, "AIRFLOW__API_AUTH__JWT_SECRET": "x1" * 10})[0]


def test_the_dicomweb_service_reads_with_its_own_principal_and_a_token_file(compose):
    """Issue 19: the DICOMweb service and OHIF, as compose starts them."""
    svc = compose["services"]["dicomweb"]
    assert svc["command"][:3] == ["python", "-m", "include.dicomweb_serve"] and "--viewer" in svc["command"]
    assert "./.viewer/dist:/opt/viewer:ro" in svc["volumes"]
    assert svc["environment"]["PACS_DICOMWEB_TOKENS_FILE"] == "/run/secrets/dicomweb_tokens"
    assert svc["secrets"] == ["dicomweb_tokens"] and "dicomweb_tokens" in compose["secrets"]
    assert svc["environment"]["AWS_ACCESS_KEY_ID"].startswith("${DICOMWEB_AWS_")  # not the workers' keys
    assert "dicomweb-tokens" in (ROOT / ".gitignore").read_text()


def test_the_hl7_listener_adds_reports_with_its_own_principal(compose):
    """Issue 20: the MLLP listener as compose starts it."""
    svc = compose["services"]["hl7"]
    assert svc["command"][:3] == ["python", "-m", "include.hl7_listen"] and "2575" in svc["command"]
    assert svc["environment"]["AWS_ACCESS_KEY_ID"].startswith("${HL7_AWS_")  # not the workers' keys
    assert any(p.endswith(":2575:2575") and p.startswith("${BIND_ADDRESS") for p in svc["ports"])
