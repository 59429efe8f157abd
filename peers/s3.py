"""moto's S3 server on loopback, with a snapshot so the demo's bucket
outlives one process (a second `make demo` sees what the first wrote)."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import boto3
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from moto.server import ThreadedMotoServer
from werkzeug.serving import make_server

from peers.ports import free_port


class _AtomicConditionalWrites:
    """S3 decides ``If-None-Match``/``If-Match`` and writes in one step; moto
    checks, then writes. Conditional requests go one at a time here, so that two
    writers of one key (two source archives' copies of a study, a task and its
    zombie) meet the write-once contract they would meet at S3."""

    def __init__(self, app: Any) -> None:
        self.app, self.lock = app, threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("HTTP_IF_NONE_MATCH") or environ.get("HTTP_IF_MATCH"):
            with self.lock:
                return list(self.app(environ, start_response))  # the whole response inside the lock
        return self.app(environ, start_response)


class _MotoServer(ThreadedMotoServer):
    def _server_entry(self) -> None:
        app = _AtomicConditionalWrites(DomainDispatcherApplication(create_backend_app))
        self._server = make_server(self._ip_address, self._port, app, True, request_handler=MotoRequestHandler)
        self._server_ready_event.set()
        self._server.serve_forever()


class S3Server:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port or free_port()
        self.server = _MotoServer(ip_address=host, port=self.port, verbose=False)
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
        self.server.start()
        self.endpoint_url = f"http://{host}:{self.port}"

    def client(self):
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def create_bucket(self, bucket: str) -> None:
        c = self.client()
        if bucket not in [b["Name"] for b in c.list_buckets().get("Buckets", [])]:
            c.create_bucket(Bucket=bucket)

    def count(self, bucket: str, prefix: str = "") -> int:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sum(len(p.get("Contents", [])) for p in pages)

    def save(self, bucket: str, folder: Path) -> None:
        """Copy every object (bytes + metadata) to ``folder``."""
        c = self.client()
        folder.mkdir(parents=True, exist_ok=True)
        index = []
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                rsp = c.get_object(Bucket=bucket, Key=obj["Key"])
                name = f"{len(index):08d}.bin"
                (folder / name).write_bytes(rsp["Body"].read())
                index.append(
                    {
                        "key": obj["Key"],
                        "file": name,
                        "metadata": rsp.get("Metadata", {}),
                        "content_type": rsp.get("ContentType", "binary/octet-stream"),
                    }
                )
        (folder / "index.json").write_text(json.dumps(index))

    def restore(self, bucket: str, folder: Path) -> int:
        index_file = folder / "index.json"
        if not index_file.exists():
            return 0
        c = self.client()
        index = json.loads(index_file.read_text())
        for item in index:
            c.put_object(
                Bucket=bucket,
                Key=item["key"],
                Body=(folder / item["file"]).read_bytes(),
                Metadata=item["metadata"],
                ContentType=item["content_type"],
            )
        return len(index)

    def stop(self) -> None:
        self.server.stop()
