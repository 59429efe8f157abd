"""Reports and annotations, a whole DAG run (dag.test()): a legacy archive
with presentation states and a key object selection on its CT studies, the
RIS's export folder of ORU^R01 reports and the MLLP listener taking the
rest live; every report ends in its expected state with its reason code,
the SR and PDF objects re-read and pass dciodvfy, the partition with the
dangling reference fails naming its object, and the mail shows it all."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io

import pydicom
import pytest
import yaml

from include.demo.clinical import REPORT_PDF, tiny_pdf
from include.pacs_migration.config import TargetConfig, read_yaml
from include.pacs_migration.manifest import PartitionManifests
from include.pacs_migration.partition import Partition
from include.pacs_migration.reports import dicom
from include.pacs_migration.reports.ledger import ReportLedger
from include.pacs_migration.reports.mllp import MllpListener
from include.pacs_migration.reports.place import place_reports
from include.pacs_migration.store import ObjectStore
from include.pacs_migration.study_index import read_partition
from include.pacs_migration_dags import DEFAULT_CONFIG
from tests.conftest import point_airflow_at
from tests.e2e.test_pacs_migration_dag import _attachments, _clear_runs, _dag, _mail_parts, _reports
from tests.integration.test_hl7_mllp import _exchange
from tests.ris import clinical_day, dciodvfy

pytestmark = pytest.mark.e2e
DAY = dt.date(2019, 3, 2)  # the demo archive's day with a truncated CT instance


@pytest.fixture
def clinical_archive(tmp_path):
    from peers.pacs import SimulatedPACS

    summary, added, messages = clinical_day(tmp_path, DAY, dangling=True)
    pacs = SimulatedPACS(summary.root)
    yield summary, added, messages, pacs
    pacs.stop()


def test_reports_and_references_of_a_date(
    airflow_db, clinical_archive, s3_server, bucket, mail, tmp_path, monkeypatch
):  # fmt: skip
    summary, added, messages, pacs = clinical_archive
    point_airflow_at(monkeypatch, pacs, s3_server, bucket, mail, tmp_path)
    data = read_yaml(DEFAULT_CONFIG)
    data["reports"] = {**data.get("reports", {}), "export_dir": str(tmp_path / "ris")}
    (tmp_path / "migration.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "rules").symlink_to(DEFAULT_CONFIG.parent / "rules")
    monkeypatch.setenv("AIRFLOW_VAR_PACS_MIGRATION_CONFIG_PATH", str(tmp_path / "migration.yaml"))
    store = ObjectStore(s3_server.client(), TargetConfig(bucket=bucket, sse="none"))

    # The RIS pushes part of its messages live, before the run: each kept, then acknowledged.
    listener = MllpListener(store).start()
    try:
        live = [messages["live-final"][1], messages["live-malformed"][1], messages["live-final"][1]]
        answers = _run_async(_exchange(listener.port, live))
    finally:
        listener.stop()
    assert [a[0] for a in answers] == ["AA", "AE", "AA"] and answers[1][2] == "HL7_PARSE_ERROR:MSH"

    _clear_runs("pacs_migration")
    run = _dag().test(logical_date=dt.datetime(DAY.year, DAY.month, DAY.day, tzinfo=dt.UTC))
    assert run.state == "failed"  # the KOS's dangling reference fails its partition, so the run

    # Every message of the date ends in its expected state, with its reason code.
    ledger = ReportLedger(store, DAY).read()
    assert ledger is not None
    got = dict(zip(ledger["message_sha256"], zip(ledger["state"], ledger["reason"], strict=True), strict=True))
    dated = {n: m for n, m in messages.items() if n != "live-malformed"}  # undated: filed under the day it came
    assert len(got) == len(dated) > 12
    for name, (want, raw) in dated.items():
        state, why = got[hashlib.sha256(raw).hexdigest()]
        assert (state if want == "migrated" else why) == want, (name, state, why)
    today = ReportLedger(store, dt.datetime.now(dt.UTC).date())
    assert hashlib.sha256(messages["live-malformed"][1]).hexdigest() in {s for _k, s, _r in today.messages()}

    # The SR and PDF objects: in their study, re-read with their hash, valid DICOM for dciodvfy.
    rows = {r["message_sha256"]: r for r in ledger.to_dict("records")}
    amended = rows[hashlib.sha256(messages["amended"][1]).hexdigest()]
    sr = pydicom.dcmread(io.BytesIO(store.get(amended["sr_key"])))
    assert hashlib.sha256(store.get(amended["sr_key"])).hexdigest() == amended["sr_sha256"]
    pred = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert pred.ReferencedSOPInstanceUID == amended["supersedes"]
    before = next(r for r in rows.values() if r["sr_sop_instance_uid"] == amended["supersedes"])
    assert before["superseded_by"] == amended["sr_sop_instance_uid"] and store.head(before["sr_key"]) is not None
    assert "4 mm nodule" in sr.ContentSequence[-1].TextValue and sr.VerificationFlag == "VERIFIED"
    cyrillic = rows[hashlib.sha256(messages["cyrillic"][1]).hexdigest()]
    text = pydicom.dcmread(io.BytesIO(store.get(cyrillic["sr_key"]))).ContentSequence[-1].TextValue
    assert text == "Заключение: патологических изменений не выявлено"
    pdf_row = rows[hashlib.sha256(messages["pdf"][1]).hexdigest()]
    doc = pydicom.dcmread(io.BytesIO(store.get(pdf_row["pdf_key"])))
    assert doc.SOPClassUID == dicom.ENCAPSULATED_PDF
    assert doc.EncapsulatedDocument[: doc.EncapsulatedDocumentLength] == tiny_pdf(REPORT_PDF)
    for key in (amended["sr_key"], before["sr_key"], cyrillic["sr_key"], pdf_row["pdf_key"]):
        report = dciodvfy(store.get(key), tmp_path)
        assert "Error" not in report, report
    # ... and found by DICOMweb: the study index holds them.
    index = read_partition(store, Partition(DAY, "RIS"))
    assert index is not None and set(index["SOPInstanceUID"]) >= {amended["sr_sop_instance_uid"], doc.SOPInstanceUID}

    # Placing the date again writes nothing: the same message makes the same object, found already there.
    keys = set(store.list_keys(""))
    again_rows, _objects = place_reports(store, DAY, "again")
    assert {r["load_action"] for r in again_rows if r["state"] == "migrated"} == {"already_present"}
    before = [(r["state"], r["reason"] if isinstance(r["reason"], str) else None) for r in ledger.to_dict("records")]
    assert [(r["state"], r.get("reason")) for r in again_rows] == before
    assert set(store.list_keys("")) == keys

    # The audit trail: one 110104 per study that got reports, the RIS as source, schema-valid, keyed patients only.
    from include.pacs_migration.audit import chain

    assert chain.verify(store, chain.schema_validator()).ok
    audit = [m for _k, data in chain.links(store) for m in chain.Link.parse(data).messages]
    stored = [m for m in audit if "report(s) from the RIS" in m]
    studies = {r["study_instance_uid"] for r in rows.values() if r["state"] == "migrated"}
    assert len(stored) == len(studies) and all('csd-code="110104"' in m for m in stored)
    assert any(f'ParticipantObjectID="{amended["study_instance_uid"]}"' in m for m in stored)
    assert all(token not in "".join(audit) for token in summary.patient_ids + summary.patient_names)

    # Reference integrity: the KOS's partition fails naming it; the GSPS on the
    # corrupted instance is listed with it, and its partition passes.
    ko = PartitionManifests(store, Partition(DAY, "KO")).verdict(run.run_id)
    assert ko is not None and not ko["success"]
    assert ko["references"]["dangling"] == [f"{added.kos} -> {added.dangling} (missing)"]
    pr = PartitionManifests(store, Partition(DAY, "PR")).verdict(run.run_id)
    assert pr is not None and pr["success"]
    assert [q.split(" -> ")[0] for q in pr["references"]["to_quarantined"]] == [added.gsps]
    assert PartitionManifests(store, Partition(DAY, "KO")).lineage()["validation"]["success"] is False

    # The mail: FAILED, the reports table equal to the ledger, both reference findings named.
    msg, html, _csv = _mail_parts(_reports(mail)[-1])
    assert "FAILED" in msg["Subject"]
    row = html.split(f'data-reports="{DAY.isoformat()}"')[1].split("</tr>")[0]
    reasons = ledger["reason"].value_counts()
    want = {
        "expected": len(ledger),
        "migrated": int((ledger["state"] == "migrated").sum()),
        "no_matching_study": int(reasons.get("REPORT_NO_MATCHING_STUDY", 0)),
        "ambiguous": int(reasons.get("REPORT_AMBIGUOUS_MATCH", 0)),
        "rejected": int((ledger["state"] == "rejected").sum()),
    }
    for field, value in want.items():
        assert f'data-field="{field}">{value}<' in row, (field, row)
    reports_csv = _attachments(_reports(mail)[-1])[f"pacs-migration-{DAY.isoformat()}-reports.csv"].decode()
    line = next(csv.DictReader(io.StringIO(reports_csv)))
    assert {k: int(line[k]) for k in want} == want and line["validation_passed"] == "True"
    assert f"dangling reference (fails the partition): <code>{added.kos} -&gt; {added.dangling}" in html
    assert f"references a quarantined instance (both listed): <code>{added.gsps}" in html
    decoded = str(msg) + html
    for token in summary.patient_ids + summary.patient_names + summary.accession_numbers + ["Заключение"]:
        assert token not in decoded


def _run_async(coro):
    import asyncio

    return asyncio.run(coro)
