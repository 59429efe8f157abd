"""Shared fixtures: real peers on loopback (simulated PACS, moto S3 server,
aiosmtpd) and an Airflow home of the test session's own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from include.pacs_migration.privacy import PatientKeyer

ROOT = Path(__file__).resolve().parents[1]
_HOME = Path(tempfile.mkdtemp(prefix="pacs-airflow-home-"))
# Set before anything imports Airflow.
os.environ.update(
    {
        "AIRFLOW_HOME": str(_HOME),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_HOME}/airflow.db",
        # OpenLineage through the provider, to a file the e2e test reads.
        "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(
            {"type": "file", "log_file_path": str(_HOME / "openlineage.jsonl"), "append": True}
        ),
        "AIRFLOW__OPENLINEAGE__NAMESPACE": "pacs-migration-tests",
        "GX_ANALYTICS_ENABLED": "False",
    }
)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BUCKET = "pacs-archive"
# The patient-key secret of the tests (privacy.py): a fixed one, so keys compare across runs.
PATIENT_SECRET = "test-patient-key-secret-0123456789"
TEST_KEYER = PatientKeyer.from_secret(PATIENT_SECRET)
OPENLINEAGE_FILE = _HOME / "openlineage.jsonl"


@pytest.fixture(scope="session")
def archive(tmp_path_factory):
    from include.demo.archive import build_archive

    return build_archive(tmp_path_factory.mktemp("archive"), days=2)


@pytest.fixture(scope="session")
def pacs(archive):
    from peers.pacs import SimulatedPACS

    server = SimulatedPACS(archive.root)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server():
    from peers.s3 import S3Server

    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def bucket(s3_server, request):
    """A fresh bucket per test."""
    name = f"t-{abs(hash(request.node.nodeid)) % 10**10}"
    s3_server.create_bucket(name)
    return name


@pytest.fixture
def mail(tmp_path):
    from peers.smtp import MailSink

    sink = MailSink(tmp_path / "mail")
    yield sink
    sink.stop()


@pytest.fixture(scope="session")
def airflow_db():
    """`airflow db migrate` once per session (dag.test() needs it)."""
    proc = subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run(
        [sys.executable, "-m", "airflow", "pools", "set", "pacs_source_associations", "4", "legacy PACS"],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _HOME


@pytest.fixture
def airflow_connections(pacs, s3_server, bucket, mail, tmp_path, monkeypatch):
    """Point the DAG's Connections and Variables at this test's peers."""
    return point_airflow_at(monkeypatch, pacs, s3_server, bucket, mail, tmp_path)


def point_airflow_at(monkeypatch, pacs, s3_server, bucket, mail, tmp_path) -> dict:
    """The DAG's Connections and Variables, as the environment holds them, for these peers."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_PACS_SOURCE",
        json.dumps(
            {
                "conn_type": "generic",
                "host": "127.0.0.1",
                "port": pacs.port,
                "extra": {"called_ae_title": "LEGACYPACS", "calling_ae_title": "PACSMIGRATE"},
            }
        ),
    )
    monkeypatch.setenv(
        "AIRFLOW_CONN_AWS_DEFAULT",
        json.dumps(
            {
                "conn_type": "aws",
                "login": "testing",
                "password": "testing",
                "extra": {"endpoint_url": s3_server.endpoint_url, "region_name": "us-east-1"},
            }
        ),
    )
    monkeypatch.setenv(
        "AIRFLOW_CONN_SMTP_DEFAULT",
        json.dumps(
            {
                "conn_type": "smtp",
                "host": "127.0.0.1",
                "port": mail.port,
                "extra": {"disable_tls": True, "disable_ssl": True},
            }
        ),
    )
    monkeypatch.setenv("AIRFLOW_VAR_PACS_MIGRATION_BUCKET", bucket)
    monkeypatch.setenv("AIRFLOW_VAR_PACS_MIGRATION_RECIPIENTS", "compliance@hospital.example")
    monkeypatch.setenv("AIRFLOW_VAR_PACS_MIGRATION_STAGING_DIR", str(tmp_path / "staging"))
    monkeypatch.setenv("AIRFLOW_VAR_PACS_PATIENT_KEY_SECRET", PATIENT_SECRET)
    return {"bucket": bucket, "mail": mail}


@pytest.fixture
def small_disk(tmp_path):
    """A 640 KiB tmpfs: room for some CT instances of the partition, not all 24."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=640k", "tmpfs", str(mount)], capture_output=True).returncode:
        if os.environ.get("CI") == "true":
            pytest.fail("mounting a tmpfs (root) is required in CI")
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    # lazy: pynetdicom may still hold the handle of the temporary a full disk cut short
    subprocess.run(["umount", "-l", str(mount)], check=False)


# Files that take minutes, started first: under --dist loadfile the last file
# to start bounds the run (the Celery backfill alone is ~8 min). The Makefile passes
# --no-loadscope-reorder: xdist would otherwise order files by their number of tests.
_LONG_FIRST = ("tests/distributed/", "tests/deploy/test_roles.py", "tests/faults/", "tests/e2e/")


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        return next((i for i, p in enumerate(_LONG_FIRST) if item.nodeid.startswith(p)), len(_LONG_FIRST))

    items.sort(key=rank)  # stable: each file's tests keep their order
