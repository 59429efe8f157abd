"""Issue 17 through the DAGs (dag.test(), real peers): migrate a date under
rule set v1, roll its CT partition back with a reason (a dry run first),
re-run CT under v2; and a run of three studies requested by UID."""

from __future__ import annotations

import datetime as dt
import email
import io
import re
from pathlib import Path

import pydicom
import pytest
import yaml

from include.pacs_migration.config import TargetConfig, read_yaml
from include.pacs_migration.counts import counts_from_frame
from include.pacs_migration.manifest import PartitionManifests, transferred_partitions
from include.pacs_migration.partition import Partition
from include.pacs_migration.store import ObjectStore
from include.pacs_migration.trace import render_trace, trace_instance
from include.pacs_migration_dags import DEFAULT_CONFIG

pytestmark = pytest.mark.e2e
DATE = dt.date(2019, 3, 1)
CT = Partition(DATE, "CT")
RULES = (
    "id: site-fixes\nversion: {v}\nrules:\n"
    "  - {{id: institution, action: set, tag: InstitutionName, value: '{value}'}}\n"
)


def _config(tmp_path: Path, version: int, monkeypatch) -> None:
    """The bundled YAML with a site rule set of this version (v1 has the wrong institution name)."""
    (tmp_path / f"rules-v{version}.yaml").write_text(
        RULES.format(v=version, value="St Elsewhere" if version == 1 else "St Elsewhere Hospital")
    )
    data = read_yaml(DEFAULT_CONFIG)
    data["normalization"]["ruleset"] = f"rules-v{version}.yaml"
    path = tmp_path / f"migration-v{version}.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("AIRFLOW_VAR_PACS_MIGRATION_CONFIG_PATH", str(path))


def _dag(dag_id: str):
    from airflow.dag_processing.dagbag import DagBag

    from tests.dags.test_dag_integrity import DAGS

    bag = DagBag(dag_folder=str(DAGS))
    assert not bag.import_errors
    return bag.dags[dag_id]


def _clear(dag_id: str) -> None:
    from airflow.models import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        for r in session.query(DagRun).filter(DagRun.dag_id == dag_id):
            session.delete(r)


def _migrate(conf: dict | None = None, day: dt.date = DATE):
    _clear("pacs_migration")
    when = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
    return _dag("pacs_migration").test(logical_date=when, run_conf=conf or {})


def _html(path: Path) -> tuple[str, str]:
    msg = email.message_from_bytes(path.read_bytes())
    html = next(p.get_payload(decode=True).decode() for p in msg.walk() if p.get_content_type() == "text/html")
    return msg["Subject"], html


def _cell(html: str, row: str, field: str) -> str:
    part = html.split(f'data-partition="{row}"')[1].split("</tr>")[0]
    return re.search(rf'data-field="{field}">([^<]*)<', part).group(1)


def _all_keys(store: ObjectStore) -> set[str]:
    return set(store.list_keys(""))


def test_roll_back_a_partition_and_correct_it_under_a_new_rule_set(
    airflow_db, airflow_connections, s3_server, tmp_path, monkeypatch
):
    bucket, mail = airflow_connections["bucket"], airflow_connections["mail"]
    store = ObjectStore(s3_server.client(), TargetConfig(bucket=bucket))
    _config(tmp_path, 1, monkeypatch)
    assert _migrate().state == "success"
    ct = PartitionManifests(store, CT)
    v1 = ct.transfer()
    v1_migrated = v1[v1["state"] == "migrated"]
    mails = len(mail.messages())

    rollback = _dag("pacs_rollback")
    conf = {"partitions": ["2019-03-01/CT"], "reason": "v1 set the wrong InstitutionName"}
    keys = _all_keys(store)
    assert rollback.test(run_conf=conf).state == "success"  # dry_run is the default
    assert _all_keys(store) == keys and len(mail.messages()) == mails  # wrote nothing, mailed nobody

    _clear("pacs_rollback")
    run = rollback.test(run_conf={**conf, "dry_run": False})
    assert run.state == "success"
    # the old objects: out of the live layout, their copies verified under rolled-back/<id>/
    rid = ct.rollback_records()[0]["rollback_id"]
    for key, sha in zip(v1_migrated["object_key"], v1_migrated["object_sha256"], strict=True):
        assert store.head(key) is None and store.sha256_of(ct.rolled_back_copy(rid, key))[0] == sha
    record = ct.rollback_records()[0]
    assert record["requested_by"] == "dag_test" and record["reason"] == conf["reason"]
    # the rollback e-mail's figures are the manifests' (the copy of the manifest the rollback took)
    subject, html = _html(mail.messages()[-1])
    assert f"Rollback {rid} complete: 1 partition(s), {len(v1_migrated)} object(s)" in subject
    found = ct.rolled_back_transfer(rid)
    states = found["state"].value_counts()
    expected = {
        "instances": len(found),
        "migrated": states.get("migrated", 0),
        "quarantined": states.get("quarantined", 0),
        "unresolved": states.get("unresolved", 0),
        "studies": found["study_instance_uid"].nunique(),
        "objects": len(v1_migrated),
        "bytes": int(v1_migrated["object_size"].sum()),
    }
    for field, value in expected.items():
        assert _cell(html, CT.key, field) == str(value), field
        assert _cell(html, "TOTAL", field) == str(value), field
    assert record["digest"] in html and conf["reason"] in html
    for uid in set(v1["study_instance_uid"]):
        assert uid not in html  # figures only

    # correction: CT again, under v2: new objects at the freed keys
    _config(tmp_path, 2, monkeypatch)
    assert _migrate({"modalities": ["CT"]}).state == "success"
    v2 = ct.transfer()
    c = counts_from_frame(v2)
    assert c.conserved and c.written == len(v1_migrated) and c.quarantined == 0
    assert set(v2.loc[v2["state"] == "migrated", "object_key"]) == set(v1_migrated["object_key"])
    assert ct.latest_verdict()["success"]
    for key, sha in zip(v2["object_key"], v2["object_sha256"], strict=True):
        assert store.sha256_of(key)[0] == sha
        ds = pydicom.dcmread(io.BytesIO(store.get(key)))
        assert ds.InstitutionName == "St Elsewhere Hospital"
    # lineage: v1 -> rollback -> v2
    lineage = ct.lineage()
    assert lineage["ruleset"]["version"] == "2"
    assert lineage["supersedes"][0]["rollback_id"] == rid
    assert lineage["supersedes"][0]["runs"][0]["ruleset"] == "site-fixes@1"
    # trace: the whole history of one instance
    t = trace_instance(store, v1_migrated["sop_instance_uid"].iloc[0])
    assert [(e["event"], e.get("ruleset")) for e in t["history"]] == [
        ("migrated", "site-fixes@1"),
        ("rolled_back", None),
        ("migrated", "site-fixes@2"),
    ]
    print(render_trace(t))
    # the other partitions of the date were not touched
    assert {p.key for p in transferred_partitions(store, DATE)} >= {"2019-03-01/MR", "2019-03-01/CR"}


def _studies(archive_root: Path) -> dict[str, tuple[str, str]]:
    """StudyInstanceUID -> (StudyDate, Modality) of the demo archive."""
    out = {}
    for path in sorted(archive_root.rglob("*.dcm")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue  # the archive's deliberately broken files
        if ds.get("StudyInstanceUID") and ds.get("StudyDate") and ds.get("Modality"):
            out.setdefault(str(ds.StudyInstanceUID), (str(ds.StudyDate), str(ds.Modality)))
    return out


def test_three_studies_requested_by_uid(airflow_db, airflow_connections, s3_server, archive, tmp_path, monkeypatch):
    """A clinician's list: three studies on two dates, three modalities; just
    those are censused, moved, validated and reported, into their partitions."""
    bucket, mail = airflow_connections["bucket"], airflow_connections["mail"]
    store = ObjectStore(s3_server.client(), TargetConfig(bucket=bucket))
    studies = _studies(archive.root)
    wanted = {}
    for day, modality in (("20190301", "CT"), ("20190301", "MR"), ("20190302", "CR")):
        uid = next(u for u, v in studies.items() if v == (day, modality))
        wanted[uid] = Partition(dt.datetime.strptime(day, "%Y%m%d").date(), modality)
    run = _migrate({"study_uids": sorted(wanted)}, day=dt.date(2026, 12, 6))
    assert run.state == "success"
    assert set(transferred_partitions(store)) == set(wanted.values())
    for uid, p in wanted.items():
        m = PartitionManifests(store, p)
        df = m.transfer()
        assert set(df["study_instance_uid"]) == {uid}  # that study, nothing else of the date
        assert {s.study_instance_uid for s in m.census()} == {uid}
        c = counts_from_frame(df)
        assert c.conserved and c.migrated == c.expected > 0 and m.latest_verdict()["success"]
        assert m.lineage()["source"]["query"] == {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": [uid]}
    subject, html = _html(mail.messages()[-1])
    assert "3 requested studies: 3 partition(s), validation PASSED" in subject
    for p in wanted.values():
        assert _cell(html, p.key, "migrated") == str(
            counts_from_frame(PartitionManifests(store, p).transfer()).migrated
        )
    # a later run of the whole date keeps them and adds the rest of their partitions
    assert _migrate().state == "success"
    ct = PartitionManifests(store, Partition(DATE, "CT"))
    assert len(set(ct.transfer()["study_instance_uid"])) > 1 and ct.latest_verdict()["success"]

    # issue 18: the daily digest across these runs, one mail to its own list
    data = read_yaml(DEFAULT_CONFIG)
    data["report"]["digest"] = {"recipients": ["compliance-digest@hospital.example"], "every": "day"}
    data["normalization"]["ruleset"] = str(DEFAULT_CONFIG.parent / data["normalization"]["ruleset"])
    (tmp_path / "digest.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.setenv("AIRFLOW_VAR_PACS_MIGRATION_CONFIG_PATH", str(tmp_path / "digest.yaml"))
    _clear("pacs_digest")
    tomorrow = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    assert _dag("pacs_digest").test(run_conf={"now": tomorrow.isoformat()}).state == "success"
    path = mail.messages()[-1]
    subject, html = _html(path)
    assert "Daily digest" in subject and "compliance-digest@hospital.example" in path.read_text()
    index_now = {p for p in transferred_partitions(store)}
    assert _cell(html.replace('data-row="archive"', 'data-partition="ARCHIVE"'), "ARCHIVE", "partitions") == str(
        len(index_now)
    )
    assert "site-default@1" in html  # the rule set that ran


def test_a_rollback_task_that_breaks_halfway_is_reported_incomplete_and_resumes(
    airflow_db, airflow_connections, s3_server, tmp_path, monkeypatch
):
    """The roll_back task dies after three objects (its retries spent): compliance
    is told the rollback is INCOMPLETE; a new try of the same run finishes it."""
    from include.pacs_migration import rollback

    bucket, mail = airflow_connections["bucket"], airflow_connections["mail"]
    store = ObjectStore(s3_server.client(), TargetConfig(bucket=bucket))
    _config(tmp_path, 1, monkeypatch)
    assert _migrate({"modalities": ["CT"]}).state == "success"
    ct = PartitionManifests(store, CT)
    live = set(ct.transfer()["object_key"].dropna())
    real, moved = rollback.move_object, []

    def dies_after_three(*args, **kwargs):
        if len(moved) == 3:
            raise ConnectionResetError("worker lost")
        moved.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(rollback, "move_object", dies_after_three)
    dag = _dag("pacs_rollback")
    for t in dag.tasks:
        t.retries = 0
    _clear("pacs_rollback")
    when = dt.datetime(2026, 12, 6, 3, 0, tzinfo=dt.UTC)
    conf = {"partitions": ["2019-03-01/CT"], "reason": "v1 wrong", "dry_run": False}
    assert dag.test(logical_date=when, run_conf=conf).state == "failed"  # not a success: it did not complete
    subjects = [_html(m)[0] for m in mail.messages()]
    assert any("INCOMPLETE" in s and "clear its roll_back task to finish it" in s for s in subjects), subjects
    assert sum(store.head(k) is None for k in live) == 3  # three moved, the rest still live, none lost

    monkeypatch.setattr(rollback, "move_object", real)
    # The same run again (its id and run_after, so its rollback id: what clearing the task gives)
    _clear("pacs_rollback")
    run = dag.test(logical_date=when, run_conf=conf)
    assert run.state == "success", run.state
    subject, _ = _html(mail.messages()[-1])
    assert " complete: 1 partition(s), " in subject and len(ct.rollback_records()) == 1  # resumed, not a second one
    rid = ct.rollback_records()[0]["rollback_id"]
    for key in live:
        assert store.head(key) is None and store.head(ct.rolled_back_copy(rid, key)) is not None
