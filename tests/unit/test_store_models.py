"""Issue 22: botocore's S3 models parsed once per process, shared by every
client made after (``store.warm_up`` in a worker, before it forks tasks)."""

from __future__ import annotations

import os

import botocore.session
from botocore.loaders import JSONFileLoader

from include.pacs_migration.store import share_models, warm_up
from tests.forked import in_fork


def _client():
    session = botocore.session.get_session()
    share_models(session)
    where = {"region_name": "eu-west-1", "endpoint_url": "http://127.0.0.1:9"}
    return session.create_client("s3", **where, aws_access_key_id="k", aws_secret_access_key="s")


def test_a_task_forked_after_warm_up_makes_its_client_without_parsing_botocore_data():
    warm_up()

    def task() -> list:
        parsed: list[str] = []
        real = JSONFileLoader.load_file
        JSONFileLoader.load_file = lambda self, path: parsed.append(os.path.basename(path)) or real(self, path)
        client = _client()
        return [parsed, client.meta.region_name, client.meta.endpoint_url]

    parsed, region, endpoint = in_fork(task)
    assert parsed == [], parsed
    assert (region, endpoint) == ("eu-west-1", "http://127.0.0.1:9")  # the client's own settings
