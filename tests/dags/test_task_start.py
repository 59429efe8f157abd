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
