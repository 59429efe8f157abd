"""moto's S3 server on loopback, with a snapshot so the demo's bucket
outlives one process (a second `make demo` sees what the first wrote)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import boto3
from moto.server import ThreadedMotoServer

from peers.ports import free_port


class S3Server:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port or free_port()
        self.server = ThreadedMotoServer(ip_address=host, port=self.port, verbose=False)
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
