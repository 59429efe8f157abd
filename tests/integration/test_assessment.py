"""The assessment against the simulated PACS, with planted metadata faults:
one study under two patient IDs, one SOP Instance UID in two series, an
undefined character set, an undated study. Figures match the archive; no
patient identifier reaches the findings, the summary or the HTML report."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from include.demo.archive import build_archive
from include.pacs_migration.assessment import (
    FindingCode,
    assess,
    findings_rows,
    read_by_date,
    render_assessment_html,
    rows_csv,
    write_assessment,
)
from include.pacs_migration.config import AssessmentConfig, SourceConfig, TargetConfig
from include.pacs_migration.dimse import find
from include.pacs_migration.store import ObjectStore
from peers.pacs import SimulatedPACS

DAY = dt.date(2019, 3, 1)


def _plant(root: Path) -> dict[str, str]:
    files = sorted((root / DAY.strftime("%Y%m%d")).rglob("*.dcm"))
    ct = [
        p
        for p in files
        if getattr(pydicom.dcmread(p, stop_before_pixels=True, force=True), "file_meta", None)
        and pydicom.dcmread(p, stop_before_pixels=True, force=True).get("Modality") == "CT"
    ]
    planted = {}
    # 1. the same study filed under another patient ID
    ds = pydicom.dcmread(ct[0])
    ds.PatientID, ds.PatientName = "CANARYCONFLICT", "CANARY^CONFLICT"
    ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(root / "planted-conflict.dcm")
    planted["conflict"] = str(ds.StudyInstanceUID)
    # 2. one SOP Instance UID in a second series of the same study
    ds = pydicom.dcmread(ct[1])
    ds.SeriesInstanceUID = generate_uid()
    ds.save_as(root / "planted-duplicate.dcm")
    planted["duplicate"] = str(ds.SOPInstanceUID)
    # 3. an undefined character set, 4. an undated study
    for name, change in (("charset", {"SpecificCharacterSet": "ISO_IR 999"}), ("undated", {"StudyDate": ""})):
        ds = pydicom.dcmread(ct[2])
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        for k, v in change.items():
            setattr(ds, k, v)
        ds.save_as(root / f"planted-{name}.dcm")
        planted[name] = str(ds.StudyInstanceUID)
    return planted


@pytest.fixture(scope="module")
def planted_pacs(tmp_path_factory):
    root = tmp_path_factory.mktemp("assess-archive")
    archive = build_archive(root, first_date=DAY, days=2, canary_names=("CANARY^ASSESSMENT",))
    planted = _plant(root)
    pacs = SimulatedPACS(root)
    yield archive, planted, pacs
    pacs.stop()


def test_assessment_figures_and_findings(planted_pacs, s3_server, bucket):
    archive, planted, pacs = planted_pacs
    source = SourceConfig(
        host="127.0.0.1", port=pacs.port, called_ae_title="LEGACYPACS", calling_ae_title="PACSMIGRATE"
    )
    result = assess(
        lambda q: find(source, q),
        DAY - dt.timedelta(days=1),
        DAY + dt.timedelta(days=2),
        AssessmentConfig(throughput_instances_s=0.01, window_hours=10),
    )
    by = {(r["year"], r["modality"]): r for r in result.by_year}
    # +1 conflict copy, +1 duplicate copy, +1 charset study; the undated study is on no date
    assert sum(r["instances"] for r in result.by_year) == archive.instances + 3
    truth: dict[str, set] = {}
    for path in archive.root.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        if ds.get("StudyDate"):
            truth.setdefault(ds.Modality, set()).add(ds.StudyInstanceUID)
    assert {m: by[(2019, m)]["studies"] for m in truth} == {m: len(v) for m, v in truth.items()}
    assert all(r["bytes_basis"] == "sampled" for r in result.by_year)
    assert result.syntaxes  # the simulated PACS answers AvailableTransferSyntaxUID
    codes = {(f.code, f.study_instance_uid) for f in result.findings}
    assert (FindingCode.CONFLICTING_PATIENT_ID, planted["conflict"]) in codes
    assert (FindingCode.NONCONFORMANT_CHARSET, planted["charset"]) in codes
    assert (FindingCode.UNDATED_STUDY, planted["undated"]) in codes
    dup = [f for f in result.findings if f.code == FindingCode.DUPLICATE_SOP_INSTANCE_UID]
    assert len(dup) == 1 and planted["duplicate"] in dup[0].detail
    # at 0.01 instances/s the instances set the pace (the bytes are few): minutes, rounded up
    minutes = -(-(archive.instances + 3) / 0.01 // 60)
    assert result.projection["hours"] == minutes / 60 and result.projection["nights"] == 1

    html = render_assessment_html(result, "dicom://test", "s3://bucket/")
    written = write_assessment(ObjectStore(s3_server.client(), TargetConfig(bucket=bucket)), result, html)
    texts = [html, json.dumps(result.summary()), rows_csv(findings_rows(result)), rows_csv(result.by_date)]
    for canary in [*archive.patient_names, *archive.patient_ids, "CANARY"]:
        assert not any(canary in t for t in texts), canary
    assert 'data-cell="2019/CT"' in html
    assert any(k.endswith("by_date_modality.parquet") for k in written)
    estimates = read_by_date(ObjectStore(s3_server.client(), TargetConfig(bucket=bucket)))
    assert estimates[((DAY - dt.timedelta(days=1)).isoformat(), "*")] == (0, 0)  # assessed, empty
    assert estimates[(DAY.isoformat(), "CT")][0] == by[(2019, "CT")]["instances"] - sum(
        r["instances"] for r in result.by_date if r["modality"] == "CT" and r["study_date"] != DAY.isoformat()
    )


def test_the_assessment_lists_studies_without_a_report(tmp_path, s3_server, bucket):
    """The RIS's export read into the inbox; each study of a date that no message of the date names is a finding."""
    from include.demo.clinical import ris_export, studies
    from include.pacs_migration.reports.intake import accessions_of_date, import_folder

    root = tmp_path / "legacy"
    archive = build_archive(root, first_date=DAY, days=1)
    messages = ris_export(root, tmp_path / "ris", [DAY.strftime("%Y%m%d")], quirks=False)
    store = ObjectStore(s3_server.client(), TargetConfig(bucket=bucket, sse="none"))
    intake = import_folder(store, tmp_path / "ris", "OBR-3", "8859/1")
    assert (intake.files, intake.messages, intake.new) == (len(messages),) * 3
    assert import_folder(store, tmp_path / "ris", "OBR-3", "8859/1").skipped == len(messages)  # read once
    reported = {s.study_uid for s in studies(root, DAY.strftime("%Y%m%d")).values()} - {
        s.study_uid for i, s in enumerate(studies(root, DAY.strftime("%Y%m%d")).values()) if i % 7 != 6
    }  # ris_export leaves every seventh study without a report
    pacs = SimulatedPACS(root)
    try:
        source = SourceConfig(
            host="127.0.0.1", port=pacs.port, called_ae_title="LEGACYPACS", calling_ae_title="PACSMIGRATE"
        )
        result = assess(
            lambda q: find(source, q),
            DAY,
            DAY,
            AssessmentConfig(undated_sweep=False),
            reports=lambda day: accessions_of_date(store, day, "OBR-3", "8859/1"),
        )
    finally:
        pacs.stop()
    missing = {f.study_instance_uid for f in result.findings if f.code == FindingCode.STUDY_WITHOUT_REPORT}
    assert missing == reported and len(missing) >= 1
    assert result.summary()["reports"] == {
        "reports": len(messages),
        "migrated": 0,  # nothing migrated yet: the ledger is empty
        "unmatched": 0,
        "studies": archive.studies,
        "studies_without_report": len(missing),
    }
    html = render_assessment_html(result, "dicom://test", "s3://bucket/")
    assert f'data-field="studies_without_report">{len(missing)}<' in html
    for token in archive.accession_numbers + archive.patient_ids:
        assert token not in html and token not in json.dumps(result.summary())
