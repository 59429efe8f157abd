"""Issue 18, the dashboard's answers: its API's figures equal the manifests'
on the demo data and on a planted failure (real peers: the simulated PACS,
moto's S3 server; the FastAPI app itself through its test client, the login
gate replaced by a reader); and at the size of 10 years x 8 modalities."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import random

import pytest
from fastapi.testclient import TestClient

from include.pacs_migration import coverage
from include.pacs_migration.config import ValidationConfig
from include.pacs_migration.counts import counts_from_frame
from include.pacs_migration.manifest import PartitionManifests
from include.pacs_migration.reasons import MEANING, ReasonCode
from tests.faults.harness import migration_config, object_store, run_date


@pytest.fixture
def client(monkeypatch):
    import include.pacs_migration_airflow as ui

    sources: dict = {}
    monkeypatch.setattr(ui, "dashboard_sources", lambda: (sources["cfg"], sources["store"]))
    app = ui.create_app()
    app.dependency_overrides[app.state.reader] = lambda: "compliance-officer"
    return TestClient(app), sources


def test_the_dashboard_says_what_the_manifests_say(client, archive, pacs, s3_server, bucket, tmp_path):
    http, sources = client
    # 2019-03-01 validates; on 2019-03-02 any quarantine fails its partition (the planted failure)
    ok = migration_config(pacs.port, bucket, tmp_path / "staging")
    strict = ok.model_copy(update={"validation": ValidationConfig(max_quarantined_fraction=0.0)})
    store = object_store(ok, s3_server.endpoint_url)
    first = run_date(ok, store, "run-ok", dt.date(2019, 3, 1))
    second = run_date(strict, store, "run-strict", dt.date(2019, 3, 2))
    sources.update(cfg=ok, store=store)
    partitions = [*first.partitions, *second.partitions]
    frames = {p.key: PartitionManifests(store, p).transfer() for p in partitions}
    counts = {k: counts_from_frame(df) for k, df in frames.items()}

    overview = http.get("/api/overview").json()
    t = overview["totals"]
    assert t["partitions"] == len(partitions)
    for field in ("expected", "migrated", "quarantined", "unresolved"):
        assert t[field] == sum(getattr(c, field) for c in counts.values()), field
    migrated_bytes = sum(int(df.loc[df["state"] == "migrated", "object_size"].sum()) for df in frames.values())
    assert t["bytes"] == migrated_bytes

    failed = {f.partition for f in second.figures if not f.validation_passed}
    assert failed  # the planted failure took
    work = http.get("/api/worklist").json()
    assert {f"{r['study_date']}/{r['modality']}" for r in work["failed"]} == failed
    expected_labels = {f.partition: list(f.failed_expectations) for f in second.figures if f.partition in failed}
    for row in work["failed"]:
        assert row["failed_expectations"] == expected_labels[f"{row['study_date']}/{row['modality']}"]
    by_reason: dict[str, int] = {}
    for c in counts.values():
        for code, n in c.reasons.items():
            by_reason[code] = by_reason.get(code, 0) + n
    assert {r["reason"]: r["instances"] for r in work["quarantine"]} == by_reason
    assert all(r["meaning"] and r["meaning"] != "not a reason code of this version" for r in work["quarantine"])

    heat = http.get("/api/heatmap").json()
    assert heat["rows"] == ["2019-03"]
    cell = heat["cells"]["2019-03"]
    for modality in {p.modality for p in partitions}:
        mine = [k for k in counts if k.endswith("/" + modality)]
        assert cell[modality]["migrated"] == sum(counts[k].migrated for k in mine)
        if any(k in failed for k in mine):
            assert cell[modality]["state"] == "failed"
    days = http.get("/api/heatmap", params={"granularity": "day", "year": 2019}).json()
    assert days["rows"] == ["2019-03-01", "2019-03-02"]

    exported = list(csv.DictReader(io.StringIO(http.get("/api/quarantine.csv").text)))
    assert sum(int(r["instances"]) for r in exported) == sum(by_reason.values())
    some = sorted(failed)[0]
    verdict = http.get(f"/partition/{some}/validation.json").json()
    assert verdict["success"] is False and verdict["run_id"] == "run-strict"
    assert http.get(f"/partition/{some}/gx/data_docs/index.html").status_code in (200, 404)
    assert http.get(f"/partition/{some}/transfer.parquet").status_code == 404  # not a proof artifact
    assert http.get("/partition/2019-3-1/CT/validation.json").status_code == 400

    # the index is derived data: made again from the manifests, it is the same
    before = coverage.read(store).drop(columns="updated_at").sort_values(["study_date", "modality"])
    assert coverage.rebuild(store) == len(partitions)
    after = coverage.read(store).drop(columns="updated_at").sort_values(["study_date", "modality"])
    assert before.reset_index(drop=True).equals(after.reset_index(drop=True))

    # the daily digest over both runs: every run's figures, every partition that needs a look
    from include.pacs_migration.digest import digest, period, render_digest_html

    tomorrow = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    d = digest(coverage.read(store), *period(tomorrow, "day"))
    assert d["runs"] == 2 and d["period"]["partitions"] == len(partitions)
    for field in ("expected", "migrated", "quarantined", "unresolved"):
        assert d["period"][field] == sum(getattr(c, field) for c in counts.values()), field
    partly = {k for k, c in counts.items() if c.quarantined and k not in failed}
    assert {a["partition"] for a in d["attention"]} == failed | partly
    mail = render_digest_html(d, "s3://b/", tomorrow, "day")
    for a in d["attention"]:
        assert f'data-partition="{a["partition"]}"' in mail
        assert all(r["meaning"] in mail for r in a["reasons"])
    assert "generated" in mail

    # what the page and the API say carries no patient attribute
    text = json.dumps([overview, work, heat]) + http.get("/").text + http.get("/api/quarantine.csv").text + mail
    for value in [*archive.patient_names, *archive.patient_ids]:
        assert value not in text


def test_every_reason_code_reads_in_plain_language():
    assert set(MEANING) == set(ReasonCode)


def test_ten_years_of_eight_modalities(client, s3_server, bucket, tmp_path):
    """29,224 partitions in the index: the answers are right at that size
    (how fast they come: benchmarks/dashboard.py)."""
    http, sources = client
    cfg = migration_config(1, bucket, tmp_path / "staging")
    store = object_store(cfg, s3_server.endpoint_url)
    sources.update(cfg=cfg, store=store)
    index = synthetic_index(dt.date(2015, 1, 1), 3653, ("CT", "MR", "CR", "US", "DX", "MG", "NM", "PT"))
    store.put(coverage.INDEX_KEY, coverage._bytes(index), "application/vnd.apache.parquet")
    overview = http.get("/api/overview").json()
    assert overview["totals"]["partitions"] == len(index) == 29224
    assert overview["totals"]["migrated"] == int(index["migrated"].sum())
    heat = http.get("/api/heatmap").json()
    assert len(heat["rows"]) == 120 and len(heat["modalities"]) == 8
    assert sum(sum(c["partitions"].values()) for row in heat["cells"].values() for c in row.values()) == len(index)
    work = http.get("/api/worklist").json()
    assert len(work["failed"]) == int((index["state"] == "failed").sum())


def synthetic_index(first: dt.date, days: int, modalities: tuple[str, ...], seed: int = 7):
    """A coverage index of ``days`` x ``modalities`` partitions with a realistic mix of states."""
    rng = random.Random(seed)
    rows = []
    for d in range(days):
        day = (first + dt.timedelta(days=d)).isoformat()
        for m in modalities:
            expected = rng.randrange(50, 5000)
            quarantined = rng.choice([0] * 9 + [rng.randrange(1, 20)])
            state = rng.choices(["migrated", "failed", "pending", "rolled_back"], [90, 2, 7, 1])[0]
            if state == "migrated" and quarantined:
                state = "partly_quarantined"
            reasons = {"UNSOLICITED": quarantined} if quarantined else {}
            rows.append(
                {
                    "study_date": day,
                    "modality": m,
                    "state": state,
                    "expected": expected,
                    "migrated": expected - quarantined if state != "pending" else 0,
                    "quarantined": quarantined,
                    "unresolved": 0,
                    "bytes": expected * 520_000,
                    "reasons": json.dumps(reasons),
                    "failed_expectations": "objects_reread_ok" if state == "failed" else "",
                    "run_id": f"scheduled__{day}",
                    "ruleset": "site-default@1",
                    "rollback_id": "rb-x" if state == "rolled_back" else "",
                    "updated_at": "2026-12-06T00:00:00+00:00",
                }
            )
    return coverage.frame(rows)
