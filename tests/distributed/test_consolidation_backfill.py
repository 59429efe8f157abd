"""Two legacy archives into one through Airflow (issue 21): Orthanc ("south",
the first source) and DCMTK ``dcmqrscp`` ("north"), each behind a connection
counter, holding the overlapping studies of ``tests/consolidation.py``.

One backfill over both (the scheduler, LocalExecutor: tasks of both archives
run at once, each archive's in its own pool) of the date where they overlap,
then each archive's nightly DAG with its own window over three dates, then
the assessment of both. Conservation per source and in
total, the shared copies once in the archive, the altered copy a conflict
naming both archives, no patient merged across issuers, each pool's limit
held (the most concurrent associations each PACS saw), the report's
per-source figures."""

from __future__ import annotations

import csv
import email
import io
import json
import os
import time

import pandas as pd
import pydicom
import pytest
import yaml

from tests.conftest import PATIENT_SECRET, ROOT
from tests.consolidation import CANARIES, COLLIDING_ID, D1, D2, D3, build

POOLS = {"pacs_source_associations": 2, "pacs_source_associations_north": 1}
TIMEOUT_S = 12 * 60
pytestmark = pytest.mark.e2e


def _conn(port: int, called: str) -> str:
    extra = {"called_ae_title": called, "calling_ae_title": "PACSMIGRATE"}
    return json.dumps({"conn_type": "generic", "host": "127.0.0.1", "port": port, "extra": extra})


def _config(path, north_port: int) -> None:
    cfg = yaml.safe_load((ROOT / "include/config/migration.yaml").read_text())
    cfg["normalization"]["ruleset"] = str(ROOT / "include/config" / cfg["normalization"]["ruleset"])
    cfg["source"].update(max_associations=1, issuer_of_patient_id="SOUTH", acse_timeout=5)
    north = {k: v for k, v in cfg["source"].items() if k not in ("issuer_of_patient_id",)}
    north.update(
        name="north",
        host="127.0.0.1",
        port=north_port,  # the Connection pacs_source_north says the same
        called_ae_title="DCMQRSCP",
        issuer_of_patient_id="NORTH",
        window={"start": "22:00", "end": "04:00"},  # north's PACS is busy until 22:00
    )
    cfg["sources"] = [north]
    cfg["plan"] = {
        "timezone": "Europe/Brussels",
        "window": {"start": "20:00", "end": "06:00"},
        "delta": {"recent_days": 10, "sweep_per_night": 0},
        "phases": [{"name": "all", "from": D1.isoformat(), "to": D3.isoformat()}],
    }
    path.write_text(yaml.safe_dump(cfg))


def _env(tmp_path, home, counters, s3_server, bucket, mail, config) -> dict[str, str]:
    from peers.ports import free_port
    from peers.processes import local_services_env

    env = {**os.environ, **local_services_env(home, free_port())}
    env.update(
        {
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__OPENLINEAGE__DISABLED": "True",
            "PYTHONPATH": str(ROOT),
            "GX_ANALYTICS_ENABLED": "False",
            "AIRFLOW_CONN_PACS_SOURCE": _conn(counters["south"].port, "ORTHANC"),
            "AIRFLOW_CONN_PACS_SOURCE_NORTH": _conn(counters["north"].port, "DCMQRSCP"),
            "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(
                {
                    "conn_type": "aws",
                    "login": "testing",
                    "password": "testing",
                    "extra": {"endpoint_url": s3_server.endpoint_url, "region_name": "us-east-1"},
                }
            ),
            "AIRFLOW_CONN_SMTP_DEFAULT": json.dumps(
                {
                    "conn_type": "smtp",
                    "host": "127.0.0.1",
                    "port": mail.port,
                    "extra": {"disable_tls": True, "disable_ssl": True},
                }
            ),
            "AIRFLOW_VAR_PACS_MIGRATION_BUCKET": bucket,
            "AIRFLOW_VAR_PACS_MIGRATION_RECIPIENTS": "compliance@hospital.example",
            "AIRFLOW_VAR_PACS_MIGRATION_STAGING_DIR": str(tmp_path / "staging"),
            "AIRFLOW_VAR_PACS_PATIENT_KEY_SECRET": PATIENT_SECRET,
            "AIRFLOW_VAR_PACS_MIGRATION_CONFIG_PATH": str(config),
        }
    )
    return env


def _backfill(env, logs) -> list[dict]:
    """The backfill of the first date through the scheduler; the run as it ended."""
    from peers.processes import airflow_cli, json_rows, start_airflow, stop_all

    airflow_cli(env, "db", "migrate")
    for pool, size in POOLS.items():
        airflow_cli(env, "pools", "set", pool, str(size), "legacy PACS associations")
    airflow_cli(env, "dags", "reserialize")
    airflow_cli(env, "dags", "unpause", "pacs_migration")
    airflow_cli(
        env, "backfill", "create", "--dag-id", "pacs_migration", "--from-date", D1.isoformat(),
        "--to-date", D1.isoformat(),
    )  # fmt: skip
    procs = [start_airflow(name, [name], env, logs) for name in ("api-server", "scheduler", "dag-processor")]
    runs: list[dict] = []
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            runs = json_rows(airflow_cli(env, "dags", "list-runs", "pacs_migration", "-o", "json"))
            if len(runs) == 1 and all(r["state"] in ("success", "failed") for r in runs):
                return runs
            assert not [p.args for p in procs if p.poll() is not None], f"an Airflow service exited; logs in {logs}"
            time.sleep(5)
        pytest.fail(f"backfill not finished in time: {runs}; logs in {logs}")
    finally:
        stop_all(procs)
    return runs


def test_backfill_then_nightly_over_two_archives(tmp_path, s3_server, bucket, mail, monkeypatch, airflow_db):
    from include.pacs_migration.config import TargetConfig
    from include.pacs_migration.counts import counts_from_frame
    from include.pacs_migration.ledger_store import read_ledger
    from include.pacs_migration.manifest import PartitionManifests, transferred_partitions
    from include.pacs_migration.store import ObjectStore
    from peers.processes import supervisor_overhangs
    from tests.conftest import TEST_KEYER
    from tests.e2e.test_nightly_dag import _dags, _night
    from tests.e2e.test_pacs_migration_dag import _clear_runs
    from tests.peers import ConnectionCounter, Dcmqrscp, Orthanc

    data = build(tmp_path / "files")
    orthanc, dcmqrscp = Orthanc(tmp_path / "orthanc"), Dcmqrscp(tmp_path / "dcmqrscp")
    counters = {"south": ConnectionCounter(orthanc.dicom_port), "north": ConnectionCounter(dcmqrscp.port)}
    try:
        for path in data.south.paths:
            orthanc.upload(path.read_bytes())
        dcmqrscp.load(data.north.paths)
        config = tmp_path / "migration.yaml"
        _config(config, counters["north"].port)
        home = tmp_path / "airflow-home"
        home.mkdir()
        env = _env(tmp_path, home, counters, s3_server, bucket, mail, config)
        runs = _backfill(env, tmp_path / "service-logs")
        backfill_max = {site: c.max_active for site, c in counters.items()}
        assert {r["state"] for r in runs} == {"success"}, (runs, tmp_path / "service-logs")

        store = ObjectStore(s3_server.client(), TargetConfig(bucket=bucket))

        def held(site: str, days=(D1,)) -> dict:
            return {k: v for k, v in data.expected(site).items() if v[2] in days}

        # Each pool held: the most associations each PACS saw at once.
        print(f"\nbackfill: most concurrent associations per PACS {backfill_max}, pools {POOLS}")
        assert 0 < backfill_max["south"] <= POOLS["pacs_source_associations"]
        assert 0 < backfill_max["north"] <= POOLS["pacs_source_associations_north"]

        # Each task's executor slot was free when its task ended: no supervisor missed its process's
        # exit and waited out Airflow's 5 s before it looked again (README, Scaling: "Task ends").
        over = supervisor_overhangs((tmp_path / "service-logs" / "scheduler.log").read_text(errors="replace"))
        assert len(over) >= 10 and max(over.values()) < 3, sorted(over.values())[-5:]

        # Conservation per source (every instance of each archive's census in exactly one state) and in total.
        parts = transferred_partitions(store, D1)
        frames = {p: PartitionManifests(store, p).transfer() for p in parts}
        for site, name in (("south", ""), ("north", "north")):
            rows = pd.concat(df for p, df in frames.items() if p.source == name)
            assert sorted(rows["sop_instance_uid"]) == sorted(held(site)), site
            assert rows["state"].isin(["migrated", "quarantined"]).all()
            assert all(counts_from_frame(df).conserved for p, df in frames.items() if p.source == name)
        distinct = set(held("south")) | set(held("north"))
        assert len(list(store.list_keys("studies/"))) == len(distinct)  # shared copies: one object

        # The altered copy: exactly one side's a UID_CONFLICT naming the other, whose copy is live.
        every = pd.concat(frames.values())
        altered = every[every["sop_instance_uid"] == data.altered_sop]
        conflict = altered[altered["reason"] == "UID_CONFLICT"]
        assert len(altered) == 2 and len(conflict) == 1 and conflict.iloc[0]["other_source"] in ("default", "north")
        shared_rows = every[every["load_action"].eq("already_present") & every["other_source"].notna()]
        assert len(shared_rows) == 12  # the shared study (10) and the altered study's two equal instances

        # No patient merged: the one local ID 12345 is two patients, one per issuer.
        collide = every[every["study_instance_uid"].isin([data.studies["collide-s"], data.studies["collide-n"]])]
        keys = set(collide["patient_key"])
        assert keys == {TEST_KEYER.key_of(COLLIDING_ID, "SOUTH"), TEST_KEYER.key_of(COLLIDING_ID, "NORTH")}
        for key in collide["object_key"]:
            ds = pydicom.dcmread(io.BytesIO(store.get(key)), stop_before_pixels=True)
            assert ds.PatientID == COLLIDING_ID and ds.IssuerOfPatientID in ("SOUTH", "NORTH")

        # The report of the first date: figures per source archive, equal to the manifests.
        mails = [email.message_from_bytes(p.read_bytes()) for p in mail.messages()]
        d1 = next(m for m in mails if "StudyDate 2019-03-01" in m["Subject"])
        assert "validation PASSED" in d1["Subject"]
        html = next(p.get_payload(decode=True).decode() for p in d1.walk() if p.get_content_type() == "text/html")
        figures = next(
            list(csv.DictReader(io.StringIO(p.get_payload(decode=True).decode())))
            for p in d1.walk()
            if (p.get_filename() or "").endswith(".csv") and "reports" not in p.get_filename()
        )
        per_source = {}
        for row in figures:
            s = per_source.setdefault(row["source"], {"expected": 0, "migrated": 0, "shared": 0, "written": 0})
            for k in s:
                s[k] += int(row[k])
        print(f"report 2019-03-01 per source: {per_source}")
        assert per_source["default"]["expected"] == len(held("south", (D1,)))
        assert per_source["north"]["expected"] == len(held("north", (D1,)))
        assert sum(s["written"] for s in per_source.values()) == len(
            set(held("south", (D1,))) | set(held("north", (D1,)))
        )
        assert 'data-source="north"' in html and "split: some series in each" in html
        assert "differs from the copy from" in html

        # No patient data in the e-mails nor in the task logs (DESIGN.md 6.4).
        for m in mails:
            for part in m.walk():
                body = part.get_payload(decode=True) or b""
                assert not any(c.encode() in body for c in CANARIES), m["Subject"]
        logs = "\n".join(p.read_text(errors="replace") for p in (home / "logs").rglob("*.log"))
        assert logs and not any(c in logs for c in CANARIES)

        # Each archive's nightly, with its window: at 21:00 only south's is open.
        monkeypatch.setenv("AIRFLOW_VAR_PACS_MIGRATION_CONFIG_PATH", str(config))
        for var in ("AIRFLOW_CONN_PACS_SOURCE", "AIRFLOW_CONN_PACS_SOURCE_NORTH", "AIRFLOW_CONN_AWS_DEFAULT",
                    "AIRFLOW_CONN_SMTP_DEFAULT", "AIRFLOW_VAR_PACS_MIGRATION_BUCKET",
                    "AIRFLOW_VAR_PACS_MIGRATION_RECIPIENTS", "AIRFLOW_VAR_PACS_MIGRATION_STAGING_DIR",
                    "AIRFLOW_VAR_PACS_PATIENT_KEY_SECRET"):  # fmt: skip
            monkeypatch.setenv(var, env[var])
        dags = _dags()
        assert dags["pacs_nightly_north"].timetable.summary.startswith("0 22")
        before = len(list(store.list_keys("studies/")))
        assert _night(dags["pacs_nightly_north"], "2019-03-04T21:00:00+01:00").state == "success"
        assert not read_ledger(store, "north").units  # closed: nothing planned
        assert _night(dags["pacs_nightly"], "2019-03-04T21:00:00+01:00").state == "success"
        south = read_ledger(store)
        assert {k: r.state for k, r in south.units.items()} == {f"{d}|*": "done" for d in (D1, D2, D3)}
        assert len(list(store.list_keys("studies/"))) == before + len(held("south", (D2, D3)))
        assert _night(dags["pacs_nightly_north"], "2019-03-04T23:00:00+01:00").state == "success"
        north = read_ledger(store, "north")
        assert {k: r.state for k, r in north.units.items()} == {f"{d}|*": "done" for d in (D1, D2, D3)}
        new = len(held("south", (D2, D3))) + len(held("north", (D2, D3)))
        assert len(list(store.list_keys("studies/"))) == before + new
        # The backfilled date is found unchanged (nothing rewritten); the others migrated and validated.
        assert {k: v for u in north.nights[-1]["units"] for k, v in u["partitions"].items()} == {
            "north/2019-03-03/CT": "migrated",
            "north/2019-03-02/MR": "migrated",
            "north/2019-03-01/CT": "unchanged",
            "north/2019-03-01/MR": "unchanged",
        }

        # The assessment of both archives: each one's figures, and their overlap.
        assessment = dags["pacs_assessment"]
        assert {t.task_id for t in assessment.tasks} == {"assess", "assess_north", "report"}
        _clear_runs(assessment.dag_id)
        assert assessment.test(run_conf={"date_from": D1.isoformat(), "date_to": D3.isoformat()}).state == "success"
        last = email.message_from_bytes(sorted(mail.folder.glob("*.eml"))[-1].read_bytes())
        assert "(2 source archives)" in last["Subject"]
        attached = {p.get_filename(): p.get_payload(decode=True) for p in last.walk() if p.get_filename()}
        assert {
            "assessment-north-2019-03-01_2019-03-03-report.html",
            "assessment-2019-03-01_2019-03-03-report.html",
        } <= set(attached)
        (row,) = csv.DictReader(io.StringIO(attached["assessment-2019-03-01_2019-03-03-overlap.csv"].decode()))
        print(f"assessment overlap: {row}")
        assert {k: row[k] for k in ("source_a", "source_b", "studies_in_both", "patient_ids_in_both")} == {
            "source_a": "default", "source_b": "north", "studies_in_both": "3", "patient_ids_in_both": "4"
        }  # fmt: skip
        assert (row["same_patient_by_shared_study"], row["colliding_patient_ids"]) == ("3", "1")
        assert (row["studies_a"], row["studies_b"]) == ("6", "6")
        html = next(p.get_payload(decode=True).decode() for p in last.walk() if p.get_content_type() == "text/html")
        assert 'data-overlap="default|north"' in html and not any(c in html for c in CANARIES)
    finally:
        for c in counters.values():
            c.stop()
        orthanc.stop()
        dcmqrscp.stop()
