"""A whole DAG run with dag.test(): simulated PACS -> moto S3 -> aiosmtpd.

Asserts DESIGN.md 6: conservation, re-read checksums, a re-run writes nothing,
the mail's figures equal the manifests, and no patient data in the mail.
"""

from __future__ import annotations

import csv
import datetime as dt
import email
import hashlib
import io
import json
import shutil
import zipfile

import pydicom
import pytest

from include.pacs_migration.config import TargetConfig
from include.pacs_migration.counts import counts_from_frame
from include.pacs_migration.manifest import read_transfer
from include.pacs_migration.partition import Partition
from include.pacs_migration.store import ObjectStore
from tests.conftest import OPENLINEAGE_FILE
from tests.s3_faults import S3FaultProxy

pytestmark = pytest.mark.e2e
DATE = dt.date(2019, 3, 2)  # holds the archive's truncated CT


def _dag():
    from airflow.dag_processing.dagbag import DagBag

    from tests.dags.test_dag_integrity import DAGS

    bag = DagBag(dag_folder=str(DAGS))
    assert not bag.import_errors
    return bag.dags["pacs_migration"]


def _run(dag, date: dt.date):
    _clear_runs(dag.dag_id)
    return dag.test(logical_date=dt.datetime(date.year, date.month, date.day, tzinfo=dt.UTC))


def _task_states(run) -> dict[tuple[str, str], str]:
    """(task id, partition or "") -> state, of every task instance of the run."""
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.query(TaskInstance).filter(TaskInstance.run_id == run.run_id).all()
        return {(ti.task_id, (ti.rendered_map_index or "") if ti.map_index >= 0 else ""): str(ti.state) for ti in tis}


def _lineage_events(since: dt.datetime, partition: str) -> list[dict]:
    """Our OpenLineage events of ``partition`` emitted since ``since`` (the file is the session's)."""
    events = [json.loads(line) for line in OPENLINEAGE_FILE.read_text().splitlines() if line.strip()]
    return [
        e
        for e in events
        if e["run"].get("facets", {}).get("pacsMigration", {}).get("partition") == partition
        and dt.datetime.fromisoformat(e["eventTime"]) >= since
    ]


def _is_alert(path) -> bool:
    return " ALERT " in (email.message_from_bytes(path.read_bytes())["Subject"] or "")


def _reports(mail) -> list:
    """The run reports among the mails (failure alerts go to the operators beside them)."""
    return [m for m in mail.messages() if not _is_alert(m)]


def _mail_parts(path):
    msg = email.message_from_bytes(path.read_bytes())
    html, csv_text = None, None
    for part in msg.walk():
        if part.get_content_type() == "text/html":
            html = part.get_payload(decode=True).decode()
        elif part.get_filename() and part.get_filename().endswith(".csv"):
            csv_text = part.get_payload(decode=True).decode()
    return msg, html, csv_text


def _attachments(path) -> dict[str, bytes]:
    msg = email.message_from_bytes(path.read_bytes())
    return {p.get_filename(): p.get_payload(decode=True) for p in msg.walk() if p.get_filename()}


def test_dag_run_end_to_end(airflow_db, airflow_connections, s3_server, archive, pacs):
    bucket, mail = airflow_connections["bucket"], airflow_connections["mail"]
    dag = _dag()
    run = _run(dag, DATE)
    assert run.state == "success"

    store = ObjectStore(s3_server.client(), TargetConfig(bucket=bucket))
    partitions = [Partition.parse(k) for k in archive.by_partition if k.startswith(DATE.isoformat())]
    figures = {}
    for p in partitions:
        df = read_transfer(store, p)
        c = counts_from_frame(df)
        # 1. Conservation, against the archive's own truth.
        assert c.expected == archive.by_partition[p.key]
        assert c.expected == c.migrated + c.quarantined + c.unresolved
        # 2. No loss: every migrated object re-reads with its checksum.
        for key, sha in zip(
            df[df.state == "migrated"].object_key, df[df.state == "migrated"].object_sha256, strict=True
        ):
            assert hashlib.sha256(store.get(key)).hexdigest() == sha
        figures[p.key] = c
    assert sum(c.quarantined for c in figures.values()) == 1  # the truncated one
    objects = s3_server.count(bucket, "studies/")
    assert objects == sum(c.migrated for c in figures.values())

    # 5. The mail's figures equal the manifests'.
    mails = mail.messages()
    assert len(mails) == 1  # the report; nothing failed, nothing alerted
    msg, html, csv_text = _mail_parts(mails[0])
    assert "PASSED" in msg["Subject"]
    rows = {r["partition"]: r for r in csv.DictReader(io.StringIO(csv_text))}
    assert set(rows) == set(figures)
    for key, c in figures.items():
        for field in ("expected", "migrated", "quarantined", "unresolved", "written"):
            assert int(rows[key][field]) == getattr(c, field), (key, field)
            assert (
                f'data-field="{field}">{getattr(c, field)}<'
                in html.split(f'data-partition="{key}"')[1].split("</tr>")[0]
            )
    # 4. No patient data in the mail (names, IDs, birth dates, accession numbers
    # planted by the generator), decoded.
    decoded = str(msg) + html + csv_text
    tokens = archive.patient_names + archive.patient_ids + archive.birth_dates + archive.accession_numbers
    assert len(tokens) > 40
    for token in tokens:
        for form in (token, token.replace("^", " "), token.split("^")[0]):
            assert form not in decoded

    # The audit trail (issue 16): schema-valid, chained, every event of the run,
    # patients named by their keyed pseudonym only.
    from include.pacs_migration.audit import chain

    proof = chain.verify(store, chain.schema_validator())
    assert proof.ok, proof.problems
    messages = [m for _k, data in chain.links(store) for m in chain.Link.parse(data).messages]
    events = [m.split('csd-code="', 2)[1][:6] for m in messages]
    studies = {u for p in partitions for u in read_transfer(store, p).study_instance_uid.dropna()}
    assert events.count("110100") == 2 and events.count("110112") >= 2
    assert events.count("110102") == events.count("110104") == len(studies)
    assert all(f'ParticipantObjectID="{u}"' in "".join(messages) for u in studies)
    assert 'ParticipantObjectTypeCodeRole="1"' in "".join(messages) and "h1:" in "".join(messages)
    for token in archive.patient_ids + archive.patient_names:
        assert token not in "".join(messages)

    # Data Docs and GX results are published beside the manifests, and attached.
    for p in partitions:
        keys = list(store.list_keys(f"_manifests/{p.hive_path}/gx/"))
        assert any(k.endswith("index.html") for k in keys)
        assert any("/gx/validations/" in k and k.endswith(".json") for k in keys)
    docs = _attachments(mails[0])[f"gx-data-docs-{DATE.isoformat()}.zip"]
    with zipfile.ZipFile(io.BytesIO(docs)) as zf:
        names = zf.namelist()
    assert {f"{p.hive_path}/index.html" for p in partitions} <= set(names)
    assert "<svg" in html  # the chart, inline

    # The Airflow UI (issue 18): mapped task instances named by partition; each
    # validated partition an event of the archive asset with its partition key.
    from airflow.models import TaskInstance
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        named = {
            ti.rendered_map_index
            for ti in session.query(TaskInstance).filter(TaskInstance.run_id == run.run_id)
            if ti.map_index >= 0
        }
        events = (
            session.query(AssetEvent)
            .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .filter(AssetModel.name == "pacs_archive", AssetEvent.source_run_id == run.run_id)
        )
        keys = {e.partition_key for e in events}
    assert named == {p.key for p in partitions}
    # Validate wrote each passed partition's lineage record: no lineage task process ran.
    states = _task_states(run)
    assert {st for (task, _p), st in states.items() if task == "partition.lineage"} == {"skipped"}
    assert all(states[("partition.validate", p.key)] == "success" for p in partitions)
    validated = {k.replace("/", "|") for k, c in figures.items()}
    assert keys == validated

    # OpenLineage: one event per partition, through the provider's file transport.
    events = [json.loads(line) for line in OPENLINEAGE_FILE.read_text().splitlines() if line.strip()]
    ours = {
        e["run"]["facets"]["pacsMigration"]["partition"]: e
        for e in events
        if "pacsMigration" in e["run"].get("facets", {}) and e["outputs"][0]["namespace"] == f"s3://{bucket}"
    }
    assert set(ours) == set(figures)
    for key, event in ours.items():
        facet = event["run"]["facets"]["pacsMigration"]
        assert event["eventType"] == "COMPLETE"
        assert event["inputs"][0] == {
            **event["inputs"][0],
            "namespace": f"dicom://127.0.0.1:{pacs.port}",
            "name": "LEGACYPACS",
        }
        assert (facet["expected"], facet["migrated"], facet["quarantined"]) == (
            figures[key].expected,
            figures[key].migrated,
            figures[key].quarantined,
        )
        assert event["run"]["facets"]["parent"]["job"]["name"] == "pacs_migration.partition.validate"
    assert any(
        e["job"]["name"].startswith("pacs_migration.") and "pacsMigration" not in e["run"].get("facets", {})
        for e in events
    )  # the provider's own task events

    # trace answers for a migrated instance that a rule changed, and a quarantined one.
    from include.pacs_migration.trace import trace_instance

    mr = read_transfer(store, Partition(DATE, "MR"))
    changed = mr[mr.changes.notna()].iloc[0]
    t = trace_instance(store, changed.sop_instance_uid)
    assert t["state"] == "migrated" and t["target"]["key"] == changed.object_key
    assert (
        t["rules_applied"][0]["change"] == "transfer_syntax" and t["rules_applied"][0]["new"] == "1.2.840.10008.1.2.1"
    )
    assert t["source"]["uri"] == f"dicom://127.0.0.1:{pacs.port}/LEGACYPACS" and t["validation"]["success"] is True
    ct = read_transfer(store, Partition(DATE, "CT"))
    bad = ct[ct.state == "quarantined"].iloc[0]
    tq = trace_instance(store, bad.sop_instance_uid, DATE)
    assert tq["reason"] == "PIXEL_LENGTH_MISMATCH" and tq["target"]["quarantine_key"].startswith("quarantine/")

    # 3. A re-run writes nothing new and reports the same figures.

    run2 = _run(dag, DATE)
    assert run2.state == "success"
    assert s3_server.count(bucket, "studies/") == objects
    for p in partitions:
        again = counts_from_frame(read_transfer(store, p))
        assert again.written == 0
        assert (again.expected, again.migrated, again.quarantined) == (
            figures[p.key].expected,
            figures[p.key].migrated,
            figures[p.key].quarantined,
        )
    assert len(mail.messages()) == 2


def _clear_runs(dag_id: str) -> None:
    """dag.test() refuses a second run at the same logical date: drop the first."""
    from airflow.models import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        for r in session.query(DagRun).filter(DagRun.dag_id == dag_id):
            session.delete(r)


def _failed_labels(csv_text: str) -> dict[str, list[str]]:
    return {
        r["partition"]: [x for x in r["failed_expectations"].split(";") if x]
        for r in csv.DictReader(io.StringIO(csv_text))
    }


def test_corrupted_and_missing_objects_fail_validation(airflow_db, airflow_connections, s3_server, monkeypatch):
    """Planted storage defects: one object's bytes corrupted, one acknowledged but never stored."""
    mail = airflow_connections["mail"]
    proxy = S3FaultProxy(s3_server.endpoint_url, corrupt_nth=2, drop_nth=5)
    try:
        monkeypatch.setenv(
            "AIRFLOW_CONN_AWS_DEFAULT",
            json.dumps(
                {
                    "conn_type": "aws",
                    "login": "testing",
                    "password": "testing",
                    "extra": {"endpoint_url": proxy.endpoint_url, "region_name": "us-east-1"},
                }
            ),
        )
        run = _run(_dag(), dt.date(2019, 3, 1))
    finally:
        proxy.stop()
    assert proxy.corrupted and proxy.dropped
    assert run.state == "failed"
    msg, html, csv_text = _mail_parts(_reports(mail)[-1])
    assert "FAILED" in msg["Subject"]
    failed = [x for labels in _failed_labels(csv_text).values() for x in labels]
    assert "migrated:expect_column_values_to_be_in_set(checksum_verified)" in failed
    assert "bucket:expect_column_pair_values_to_be_equal(listed_objects|migrated)" in failed
    assert "checksum_verified" in html and "listed_objects" in html


def test_duplicate_sop_instance_uid_fails_validation(
    airflow_db, airflow_connections, archive, tmp_path, monkeypatch, s3_server
):
    """The source holds one SOP Instance UID in two series: validation must say so."""
    from peers.pacs import SimulatedPACS

    root = tmp_path / "dup-archive"
    shutil.copytree(archive.root / "20190301" / "CR00", root / "CR00")
    shutil.copytree(archive.root / "20190301" / "CR01", root / "CR01")
    twin = pydicom.dcmread(root / "CR00" / "s1" / "0001.dcm")
    other = pydicom.dcmread(root / "CR01" / "s1" / "0001.dcm")
    twin.StudyInstanceUID, twin.SeriesInstanceUID = other.StudyInstanceUID, other.SeriesInstanceUID
    twin.save_as(root / "CR01" / "s1" / "0099.dcm")  # same SOP Instance UID, another series
    pacs = SimulatedPACS(root)
    since = dt.datetime.now(dt.UTC)
    try:
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
        run = _run(_dag(), dt.date(2019, 3, 1))
    finally:
        pacs.stop()
    assert run.state == "failed"
    msg, html, csv_text = _mail_parts(_reports(airflow_connections["mail"])[-1])
    assert "FAILED" in msg["Subject"]
    assert "expected:expect_column_values_to_not_be_in_set(state)" in _failed_labels(csv_text)["2019-03-01/CR"]
    # The failed partition's lineage: written once, by validate, naming the failed verdict;
    # the lineage task ran for it (and found it written).
    states = _task_states(run)
    assert states[("partition.validate", "2019-03-01/CR")] == "failed"
    assert states[("partition.lineage", "2019-03-01/CR")] == "success"
    (event,) = _lineage_events(since, "2019-03-01/CR")
    assert event["eventType"] == "FAIL"
    assert event["run"]["facets"]["parent"]["job"]["name"] == "pacs_migration.partition.validate"
    # Both copies kept (issue 13.4): quarantined UID_CONFLICT, each with its series.
    store = ObjectStore(s3_server.client(), TargetConfig(bucket=airflow_connections["bucket"]))
    df = read_transfer(store, Partition(dt.date(2019, 3, 1), "CR"))
    rows = df[df["sop_instance_uid"] == str(twin.SOPInstanceUID)]
    assert set(rows["reason"]) == {"UID_CONFLICT"} and set(rows["series_instance_uid"]) == {
        str(twin.SeriesInstanceUID),
        str(pydicom.dcmread(root / "CR00" / "s1" / "0001.dcm").SeriesInstanceUID),
    }
