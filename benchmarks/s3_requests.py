"""The client's CPU per instance request (issue 22): an instance's PUT and its re-read GET
through botocore's pipeline and through the store's lean path (``target.lean_requests``).

moto's S3 server runs in a process of its own (it must not share our GIL); this process
sends ``--requests`` PUTs of a ``--size``-byte instance through ``ObjectStore.put_new``
(SHA-256 header, metadata, ``If-None-Match``, SSE, the pipeline's client configuration),
then reads each back through ``ObjectStore.iter_chunks``, one request at a time; the
sides alternate for ``--rounds`` rounds. CPU is this process's alone (``time.process_time``).

    PYTHONPATH=. python -m benchmarks.s3_requests [--requests 400] [--size 600000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import botocore.session

from benchmarks.bench import RESULTS, Moto
from include.pacs_migration.config import TargetConfig
from include.pacs_migration.store import ObjectStore

BUCKET = "bench-requests"


def _client(url: str, target: TargetConfig) -> Any:
    return botocore.session.get_session().create_client(
        "s3",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        config=target.client_config(),
    )


def one_side(url: str, lean: bool, tag: str, n: int, body: bytes) -> dict[str, float]:
    """ms of CPU and of wall time per PUT and per GET, one request at a time."""
    target = TargetConfig(bucket=BUCKET, lean_requests=lean)
    store = ObjectStore(_client(url, target), target)
    sha = hashlib.sha256(body).hexdigest()
    out: dict[str, float] = {}
    for op in ("put", "get"):
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(n):
            if op == "put":
                store.put_new(f"{tag}/{i}.dcm", body, sha)
            else:
                sum(len(c) for c in store.iter_chunks(f"{tag}/{i}.dcm"))
        out[f"{op}_cpu_ms"] = 1000 * (time.process_time() - cpu) / n
        out[f"{op}_wall_ms"] = 1000 * (time.perf_counter() - wall) / n
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--size", type=int, default=600_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--label", default="s3-requests")
    ns = parser.parse_args(argv)
    body = os.urandom(ns.size)
    runs: dict[str, list[dict[str, float]]] = {"botocore": [], "lean": []}
    with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp:
        moto = Moto(Path(tmp))
        try:
            _client(moto.url, TargetConfig(bucket=BUCKET)).create_bucket(Bucket=BUCKET)
            one_side(moto.url, True, "warm-up", 20, body)
            for r in range(ns.rounds):  # alternated: a drifting host hits both sides alike
                for side in ("botocore", "lean") if r % 2 == 0 else ("lean", "botocore"):
                    runs[side].append(one_side(moto.url, side == "lean", f"{side}-{r}", ns.requests, body))
                    print(f"round {r + 1}: {side} {runs[side][-1]}", file=sys.stderr)
        finally:
            moto.stop()
    medians = {s: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for s, rs in runs.items()}
    lines = [
        f"# Instance requests, botocore's pipeline and the lean path — {dt.date.today().isoformat()}",
        "",
        f"{ns.requests} PUTs then GETs of a {ns.size:,}-byte object a side, one at a time, against moto's S3",
        f"server in a process of its own; {ns.rounds} rounds alternated; medians, ms a request (this process only).",
        "",
        "| | PUT CPU | PUT wall | GET CPU | GET wall |",
        "|---|---|---|---|---|",
    ]
    for side, m in medians.items():
        cells = (m[k] for k in ("put_cpu_ms", "put_wall_ms", "get_cpu_ms", "get_wall_ms"))
        lines.append(f"| {side} | " + " | ".join(f"{v:.2f}" for v in cells) + " |")
    report = {
        "requests": ns.requests,
        "size": ns.size,
        "rounds": runs,
        "medians": medians,
        "markdown": "\n".join(lines),
    }
    RESULTS.mkdir(exist_ok=True)
    stem = dt.date.today().isoformat() + f"-{ns.label}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (RESULTS / f"{stem}.md").write_text(report["markdown"] + "\n")
    print(report["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
