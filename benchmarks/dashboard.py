"""How fast the migration dashboard answers at 10 years x 8 modalities
(29,224 partitions): a generated coverage index in moto's S3 server, each
API answer timed through the dashboard's FastAPI app (the login gate replaced
by a reader; the S3 GET of the index included). Median of ``--repeats``.

``PYTHONPATH=. python -m benchmarks.dashboard [--repeats 5]``: prints a table,
writes benchmarks/results/<date>-dashboard.{json,md}."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import time
from pathlib import Path

from fastapi.testclient import TestClient

from include.pacs_migration import coverage
from include.pacs_migration.config import MigrationConfig, ReportConfig, TargetConfig
from include.pacs_migration.store import ObjectStore
from peers.s3 import S3Server
from tests.integration.test_dashboard import synthetic_index

MODALITIES = ("CT", "MR", "CR", "US", "DX", "MG", "NM", "PT")
ENDPOINTS = ("/api/overview", "/api/heatmap", "/api/heatmap?granularity=day&year=2020", "/api/worklist",
             "/api/quarantine.csv", "/")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    import include.pacs_migration_airflow as ui

    s3 = S3Server()
    try:
        s3.create_bucket("bench")
        cfg = MigrationConfig(
            source={"host": "127.0.0.1", "port": 104, "called_ae_title": "PACS", "calling_ae_title": "US"},
            target=TargetConfig(bucket="bench", sse="none"),
            report=ReportConfig(recipients=("c@hospital.example",), from_address="p@hospital.example"),
        )
        store = ObjectStore(s3.client(), cfg.target)
        index = synthetic_index(dt.date(2015, 1, 1), 3653, MODALITIES)
        data = coverage._bytes(index)
        store.put(coverage.INDEX_KEY, data, "application/vnd.apache.parquet")
        ui.dashboard_sources = lambda: (cfg, store)  # type: ignore[assignment]
        app = ui.create_app()
        app.dependency_overrides[app.state.reader] = lambda: "bench"
        client = TestClient(app)
        rows = []
        for path in ENDPOINTS:
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                rsp = client.get(path)
                times.append(time.perf_counter() - t)
                assert rsp.status_code == 200, (path, rsp.status_code)
            rows.append({"endpoint": path, "median_s": round(statistics.median(times), 3),
                         "max_s": round(max(times), 3), "bytes": len(rsp.content)})  # fmt: skip
    finally:
        s3.stop()
    result = {"partitions": len(index), "index_bytes": len(data), "repeats": args.repeats, "answers": rows}
    out = Path(__file__).parent / "results" / f"{dt.date.today().isoformat()}-dashboard"
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [f"# Dashboard at {len(index)} partitions (index {len(data)} bytes), median of {args.repeats}", "",
             "| endpoint | median s | max s | bytes |", "|---|---:|---:|---:|"]  # fmt: skip
    lines += [f"| `{r['endpoint']}` | {r['median_s']} | {r['max_s']} | {r['bytes']} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
