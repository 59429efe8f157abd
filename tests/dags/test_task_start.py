"""What every task pays before its step runs: the S3 client from the
Connection, made without walking the call stack (the stock AWS hook reads
the source of every frame for its user agent)."""

from __future__ import annotations

import inspect
import json

import pytest

from include.pacs_migration_airflow import AWS_CONN_ID, object_store
from tests.faults.harness import migration_config


@pytest.fixture
def stack_walks(monkeypatch):
    conn = {"conn_type": "aws", "login": "key", "password": "secret", "extra": {"region_name": "us-east-1"}}
    monkeypatch.setenv(f"AIRFLOW_CONN_{AWS_CONN_ID.upper()}", json.dumps(conn))
    calls = []
    real = inspect.stack

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(inspect, "stack", counted)
    return calls


def test_the_stock_hook_walks_the_stack(stack_walks):
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    S3Hook(aws_conn_id=AWS_CONN_ID).get_conn()
    assert stack_walks, "the stock hook no longer walks the stack: PacsS3Hook's override can go"


def test_the_store_client_is_made_without_walking_the_stack(stack_walks, tmp_path):
    store = object_store(migration_config(11112, "bucket", tmp_path))
    assert not stack_walks
    agent = store.client.meta.config.user_agent_extra
    assert "Caller/PacsMigration" in agent and "Airflow/" in agent  # the hook's user agent, otherwise whole
    assert store.client.meta.region_name == "us-east-1"


@pytest.fixture
def json_loads(monkeypatch):
    """botocore data files parsed (S3's model, endpoints, rules...)."""
    from botocore.loaders import JSONFileLoader

    parsed: list[str] = []
    real = JSONFileLoader.load_file

    def counted(self, file_path):
        parsed.append(file_path)
        return real(self, file_path)

    monkeypatch.setattr(JSONFileLoader, "load_file", counted)
    return parsed


def test_a_task_s_store_client_parses_no_botocore_data_after_the_worker_warmed_up(stack_walks, json_loads, tmp_path):
    """A worker that preloaded (``store.warm_up``) has parsed S3's models once: each task's
    client from the Connection takes them from the shared loader (before: ~1 MB of JSON
    parsed in every task)."""
    from include.pacs_migration.store import warm_up

    warm_up()
    json_loads.clear()
    store = object_store(migration_config(11112, "bucket", tmp_path))
    assert json_loads == []
    assert store.client.meta.service_model.service_name == "s3"
    assert store.client.meta.region_name == "us-east-1"  # the Connection's, as before


def test_the_hook_s_boto3_resources_still_find_their_models(stack_walks, tmp_path):
    """boto3 adds its own data (resource models) to its session's loader: the shared one searches it too."""
    from include.pacs_migration_airflow import _s3_hook_class

    hook = _s3_hook_class()(aws_conn_id=AWS_CONN_ID)
    hook.get_conn()
    bucket = hook.get_session(region_name="us-east-1").resource("s3").Bucket("bucket")
    assert bucket.name == "bucket"
