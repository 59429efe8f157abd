"""The assessment DAG and the nightly DAG, end to end with dag.test() at
controlled times: the assessment's dataset and e-mail; outside the window
nothing starts; budgets cut a night in plan order; at the window's end
planned units are deferred, not started; migrated dates are re-censused and
only what arrived since moves (delta sync), rewriting nothing."""

from __future__ import annotations

import datetime as dt
import email
import json
import os
import shutil
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom.uid import generate_uid

from include.demo.archive import build_archive
from include.pacs_migration.config import TargetConfig
from include.pacs_migration.manifest import read_transfer
from include.pacs_migration.partition import Partition
from include.pacs_migration.plan import LEDGER_KEY, Ledger
from include.pacs_migration.store import ObjectStore
from peers.pacs import SimulatedPACS
from tests.conftest import ROOT
from tests.dags.test_dag_integrity import DAGS
from tests.e2e.test_pacs_migration_dag import _clear_runs

pytestmark = pytest.mark.e2e
DAY1, DAY2 = dt.date(2019, 3, 1), dt.date(2019, 3, 2)
PLAN = {
    "timezone": "Europe/Brussels",
    "window": {"start": "20:00", "end": "06:00"},
    "budget": {"max_partitions": 4},
    "max_attempts": 2,
    "delta": {"recent_days": 10, "sweep_per_night": 0},
    "phases": [
        {"name": "ct-mr", "from": DAY1.isoformat(), "to": DAY2.isoformat(), "modalities": ["CT", "MR"]},
        {"name": "rest", "from": DAY1.isoformat(), "to": DAY2.isoformat()},
    ],
}


def _dags():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS))
    assert not bag.import_errors
    return bag.dags


def _night(dag, local: str):
    """Run the nightly DAG as if it were ``local`` (Brussels time)."""
    now = dt.datetime.fromisoformat(local)
    _clear_runs(dag.dag_id)
    return dag.test(logical_date=now.astimezone(dt.UTC), run_conf={"now": now.isoformat()})


def _last_mail(mail):
    msg = email.message_from_bytes(sorted(mail.folder.glob("*.eml"))[-1].read_bytes())
    html = next(p.get_payload(decode=True).decode() for p in msg.walk() if p.get_content_type() == "text/html")
    return msg, html


def _objects(s3_server, bucket) -> dict[str, tuple[str, str]]:
    client = s3_server.client()
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="studies/"):
        for o in page.get("Contents", []):
            out[o["Key"]] = (o["ETag"], o["LastModified"].isoformat())
    return out


@pytest.fixture
def nightly_env(airflow_db, airflow_connections, tmp_path, monkeypatch):
    root = tmp_path / "archive"
    archive = build_archive(root, first_date=DAY1, days=2, canary_names=("CANARY^NIGHTLY",))
    pacs = SimulatedPACS(root)
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
    cfg = yaml.safe_load((ROOT / "include/config/migration.yaml").read_text())
    cfg["normalization"]["ruleset"] = str(ROOT / "include/config" / cfg["normalization"]["ruleset"])
    cfg["plan"] = PLAN
    cfg["assessment"] = {"throughput_instances_s": 40, "throughput_mb_s": 20}
    path = tmp_path / "migration.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("AIRFLOW_VAR_PACS_MIGRATION_CONFIG_PATH", str(path))
    yield {**airflow_connections, "archive": archive, "pacs": pacs, "root": root}
    pacs.stop()


def test_assessment_then_three_nights_with_window_budget_and_delta(nightly_env, s3_server):
    bucket, mail, archive, pacs = (nightly_env[k] for k in ("bucket", "mail", "archive", "pacs"))
    store = ObjectStore(s3_server.client(), TargetConfig(bucket=bucket))
    dags = _dags()
    schedule = []

    # The assessment: dataset in the bucket, report e-mailed with the heat map.
    assessment = dags["pacs_assessment"]
    _clear_runs(assessment.dag_id)
    run = assessment.test(run_conf={"date_from": DAY1.isoformat(), "date_to": DAY2.isoformat()})
    assert run.state == "success"
    msg, html = _last_mail(mail)
    assert "Archive assessment 2019-03-01 to 2019-03-02" in msg["Subject"]
    assert 'data-cell="2019/CT"' in html and f'data-field="instances">{archive.instances}<' in html
    assert {p.get_filename() for p in msg.walk() if p.get_filename()} >= {
        "assessment-2019-03-01_2019-03-02-findings.csv",
        "assessment-2019-03-01_2019-03-02-by_year_modality.csv",
    }
    assert any(k.endswith("by_date_modality.parquet") for k in store.list_keys("_assessment/"))

    nightly = dags["pacs_nightly"]
    # Outside the window: nothing starts.
    run = _night(nightly, "2019-03-03T14:00:00+01:00")
    assert run.state == "success"
    msg, html = _last_mail(mail)
    assert "0 done" in msg["Subject"] and "outside the window" in html
    assert not _objects(s3_server, bucket)

    # Night 1: the budget (4 partitions) takes the two CT+MR units, newest date first.
    run = _night(nightly, "2019-03-03T21:00:00+01:00")
    assert run.state == "success"
    ledger = Ledger.from_bytes(store.get(LEDGER_KEY))
    assert [k for k, r in ledger.units.items() if r.state == "done"] == ["2019-03-01|CT,MR", "2019-03-02|CT,MR"]
    entry = ledger.nights[-1]
    assert entry["done"] == 2 and entry["reason"] == "budget reached: max_partitions"
    assert [u["unit"] for u in entry["units"]] == ["2019-03-02|CT,MR", "2019-03-01|CT,MR"]  # newest first
    assert {k.split("/")[0] for k in _objects(s3_server, bucket)} == {"studies"}
    modalities = {read_transfer(store, Partition(d, m)).modality.iloc[0] for d in (DAY1, DAY2) for m in ("CT", "MR")}
    assert modalities == {"CT", "MR"}
    for m in ("CR", "US"):
        with pytest.raises(FileNotFoundError):  # no manifest: nothing of CR/US ran
            read_transfer(store, Partition(DAY1, m))
    msg, html = _last_mail(mail)
    assert "2 done, 0 failed" in msg["Subject"] and 'data-field="units_left">2<' in html
    schedule.append(("night 1", entry))

    # At the very end of a window: the planned units are deferred, none starts.
    before = _objects(s3_server, bucket)
    run = _night(nightly, "2019-03-05T05:59:59.999+01:00")
    entry = Ledger.from_bytes(store.get(LEDGER_KEY)).nights[-1]
    assert entry["planned"] >= 1 and entry["deferred"] == entry["planned"] and entry["done"] == 0
    assert _objects(s3_server, bucket) == before
    schedule.append(("end of window", entry))

    # Night 2: delta checks of the two migrated dates (unchanged), then the two remaining units: with CT
    # and MR settled only CR and US are left (2 partitions a date), so both fit the budget of 4.
    run = _night(nightly, "2019-03-05T21:00:00+01:00")
    assert run.state == "success"
    ledger = Ledger.from_bytes(store.get(LEDGER_KEY))
    entry = ledger.nights[-1]
    assert [(u["unit"], u["kind"], u["state"]) for u in entry["units"]] == [
        ("2019-03-02|CT,MR", "delta", "done"),
        ("2019-03-01|CT,MR", "delta", "done"),
        ("2019-03-02|*", "phase", "done"),
        ("2019-03-01|*", "phase", "done"),
    ]
    assert entry["units"][2]["partitions"] == {
        "2019-03-02/CR": "migrated",
        "2019-03-02/CT": "unchanged",
        "2019-03-02/MR": "unchanged",
        "2019-03-02/US": "migrated",
    }
    assert all(r.state == "done" for r in ledger.units.values()) and len(ledger.units) == 4
    # the partitions moved tonight (not the unchanged ones) are events of the archive asset
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        events = (
            session.query(AssetEvent)
            .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .filter(AssetModel.name == "pacs_archive", AssetEvent.source_run_id == run.run_id)
        )
        keys = {e.partition_key for e in events} - {None}  # a unit that validated nothing: a bare event
    assert keys == {"2019-03-02|CR", "2019-03-02|US", "2019-03-01|CR", "2019-03-01|US"}
    assert _objects(s3_server, bucket).items() >= before.items()  # nothing rewritten
    msg, html = _last_mail(mail)
    assert 'data-field="units_left">0<' in html
    schedule.append(("night 2", entry))

    # New studies arrive at the legacy PACS for a migrated date.
    template = next(
        p
        for p in sorted((nightly_env["root"] / "20190301").rglob("*.dcm"))
        if getattr(pydicom.dcmread(p, force=True), "file_meta", None) is not None
        and pydicom.dcmread(p, force=True).get("Modality") == "CT"
    )
    study, series = generate_uid(), generate_uid()
    for i in range(2):
        ds = pydicom.dcmread(template)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientName = "CANARY^LATE"
        ds.save_as(nightly_env["root"] / "20190301" / f"late-{i}.dcm")
    pacs.reindex()
    before = _objects(s3_server, bucket)
    ct1 = read_transfer(store, Partition(DAY1, "CT"))

    # Night 3: only delta checks are left; the one of 2019-03-01 CT+MR finds the new study and moves only it.
    run = _night(nightly, "2019-03-06T21:00:00+01:00")
    assert run.state == "success"
    ledger = Ledger.from_bytes(store.get(LEDGER_KEY))
    entry = ledger.nights[-1]
    after = _objects(s3_server, bucket)
    new = set(after) - set(before)
    assert len(new) == 2 and all(study in k for k in new)
    assert {k: after[k] for k in before} == before  # nothing already migrated was rewritten
    ct1_after = read_transfer(store, Partition(DAY1, "CT"))
    assert len(ct1_after) == len(ct1) + 2
    assert set(ct1_after[ct1_after.load_action == "carried"].sop_instance_uid) == set(ct1.sop_instance_uid)
    assert [(u["unit"], u["kind"]) for u in entry["units"]] == [  # in plan order
        ("2019-03-02|CT,MR", "delta"),
        ("2019-03-01|CT,MR", "delta"),
        ("2019-03-02|*", "delta"),
        ("2019-03-01|*", "delta"),
    ]
    # Two delta units cover 2019-03-01/CT; each is its own task instance (the scheduler queues them in
    # plan order; dag.test() in any): whichever runs first moves the new study, the other finds it settled.
    movers = [u for u in ("2019-03-01|CT,MR", "2019-03-01|*") if ledger.units[u].delta_instances]
    assert len(movers) == 1 and ledger.units[movers[0]].delta_instances == 2
    moved = next(u for u in entry["units"] if u["unit"] == movers[0])
    assert moved["partitions"]["2019-03-01/CT"] == "delta" and moved["partitions"]["2019-03-01/MR"] == "unchanged"
    assert entry["migrated"] == 2
    schedule.append(("night 3", entry))

    for path in mail.folder.glob("*.eml"):
        text = path.read_bytes().decode("utf-8", "replace")
        for canary in [*archive.patient_names, *archive.patient_ids, "CANARY"]:
            assert canary not in text, canary
    if keep := os.environ.get("PACS_TEST_KEEP"):  # the schedule and the mails, for the docs
        out = Path(keep)
        out.mkdir(parents=True, exist_ok=True)
        (out / "nightly-schedule.json").write_text(json.dumps(schedule, indent=1, default=str))
        for path in sorted(mail.folder.glob("*.eml")):
            shutil.copy(path, out / path.name)
