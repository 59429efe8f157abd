"""Place a study date's reports: each RIS message of the date is matched to
its migrated study (accession number and patient ID, the latter through the
rule set's crosswalk), made into DICOM objects and stored through the same
write-once put as the images. Every message ends in one state:

- ``migrated``: its objects are in the study (an amendment beside what it supersedes);
- ``unmatched``: ``REPORT_NO_MATCHING_STUDY`` (no migrated study has its
  accession number and patient) or ``REPORT_AMBIGUOUS_MATCH`` (more than one);
  a later run places it once its study is migrated;
- ``rejected``: ``HL7_PARSE_ERROR:<segment>``.

The message itself stays in the inbox whatever its state.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import pandas as pd

from ..manifest import instance_key, writer_tag
from ..partition import Partition
from ..privacy import PatientKeyer
from ..reasons import ReasonCode
from ..rules.model import Crosswalk
from ..store import ObjectStore, PutOutcome
from ..study_index import REPORTS_MODALITY, indexed_partitions, read_partition
from . import dicom
from .hl7 import ParseError, Report, parse_report
from .ledger import ReportLedger

log = logging.getLogger(__name__)

BUILDER = "reports-1"  # the SR/PDF builder's version: the same message and builder make the same object


class ReportState(str, Enum):
    MIGRATED = "migrated"
    UNMATCHED = "unmatched"
    REJECTED = "rejected"


class ReportReason(str, Enum):
    """Why a message was not placed (values of :class:`~..reasons.ReasonCode`)."""

    NO_MATCHING_STUDY = ReasonCode.REPORT_NO_MATCHING_STUDY.value
    AMBIGUOUS_MATCH = ReasonCode.REPORT_AMBIGUOUS_MATCH.value
    UID_CONFLICT = ReasonCode.UID_CONFLICT.value  # another object holds the report's derived UID (never expected)


@dataclass(frozen=True)
class ReportCounts:
    """A date's report line: expected (messages of the date), migrated, not
    matched to a study, rejected; ``amended``: reports that supersede another."""

    expected: int
    migrated: int
    unmatched: int
    rejected: int
    amended: int = 0
    written: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def conserved(self) -> bool:
        return self.expected == self.migrated + self.unmatched + self.rejected

    def to_json(self) -> dict[str, Any]:
        return {
            "expected": self.expected,
            "migrated": self.migrated,
            "unmatched": self.unmatched,
            "rejected": self.rejected,
            "amended": self.amended,
            "written": self.written,
            "reasons": dict(self.reasons),
        }

    @classmethod
    def of(cls, ledger: pd.DataFrame | None) -> ReportCounts:
        if ledger is None or not len(ledger):
            return cls(0, 0, 0, 0)
        states = ledger["state"].value_counts()
        created = (ledger["load_action"] == PutOutcome.CREATED.value).sum()
        return cls(
            expected=len(ledger),
            migrated=int(states.get(ReportState.MIGRATED.value, 0)),
            unmatched=int(states.get(ReportState.UNMATCHED.value, 0)),
            rejected=int(states.get(ReportState.REJECTED.value, 0)),
            amended=int(ledger["supersedes"].notna().sum()),
            written=int(created),
            reasons={str(k): int(v) for k, v in ledger["reason"].dropna().value_counts().sort_index().items()},
        )


def study_rows(store: ObjectStore, study_date: dt.date, days: int) -> pd.DataFrame:
    """One row per migrated study of the dates around ``study_date`` (the study index)."""
    dates = {study_date + dt.timedelta(days=d) for d in range(-days, days + 1)}
    frames = [
        df
        for p in indexed_partitions(store)
        if p.study_date in dates and p.modality != REPORTS_MODALITY
        if (df := read_partition(store, p)) is not None and len(df)
    ]
    if not frames:
        return pd.DataFrame(columns=list(dicom.STUDY_KEYWORDS))
    rows = pd.concat(frames, ignore_index=True)
    return rows.drop_duplicates("StudyInstanceUID")[[k for k in dicom.STUDY_KEYWORDS if k in rows.columns]]


def match(report: Report, studies: pd.DataFrame, crosswalk: Crosswalk | None) -> tuple[dict[str, Any] | None, str]:
    """The one study with the report's accession number and patient (ID, and issuer when both say one)."""
    pid, issuer = report.patient_id, report.issuer
    if crosswalk is not None and (hit := crosswalk.lookup(pid, issuer)) is not None:
        pid, issuer = hit[0], hit[1] or issuer
    same = studies[(studies["AccessionNumber"].fillna("") == report.accession) & (studies["PatientID"] == pid)]
    if issuer and "IssuerOfPatientID" in same.columns:
        same = same[same["IssuerOfPatientID"].fillna("").isin(["", issuer])]
    if len(same) == 1:
        return same.iloc[0].to_dict(), ""
    return None, (ReportReason.AMBIGUOUS_MATCH if len(same) > 1 else ReportReason.NO_MATCHING_STUDY).value


def place_reports(
    store: ObjectStore,
    study_date: dt.date,
    run_id: str,
    accession_field: str = "OBR-3",
    default_charset: str = "8859/1",
    days: int = 1,
    crosswalk: Crosswalk | None = None,
    keyer: PatientKeyer | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Place every message of the date; returns (ledger rows, stored objects as
    transfer-like rows for the study index)."""
    ledger = ReportLedger(store, study_date)
    studies = study_rows(store, study_date, days)
    rows: list[dict[str, Any]] = []
    placed: dict[str, list[tuple[Report, dict[str, Any]]]] = defaultdict(list)
    for key, sha, raw in ledger.messages():
        row: dict[str, Any] = {"message_sha256": sha, "inbox_key": key, "run_id": run_id}
        rows.append(row)
        try:
            report = parse_report(raw, accession_field, default_charset)
        except ParseError as exc:
            row.update(state=ReportState.REJECTED.value, reason=exc.reason)
            continue
        row.update(status=report.status.value, control_id_sha256=hashlib.sha256(report.control_id.encode()).hexdigest())
        study, why = match(report, studies, crosswalk)
        if study is None:
            row.update(state=ReportState.UNMATCHED.value, reason=why)
            continue
        row["study_instance_uid"] = str(study["StudyInstanceUID"])
        if keyer is not None and study.get("PatientID"):
            row["patient_key"] = keyer.key_of(str(study["PatientID"]))
        placed[row["study_instance_uid"]].append((report, row))
    objects: list[dict[str, Any]] = []
    for study_uid, reports in placed.items():
        objects += _store_study(store, studies, study_uid, reports, run_id)
    return rows, objects


def _order(item: tuple[Report, dict[str, Any]]) -> tuple[dt.datetime, str]:
    report, row = item
    return (report.reported_at or report.sent_at or report.observed_at, row["message_sha256"])


def _store_study(
    store: ObjectStore,
    studies: pd.DataFrame,
    study_uid: str,
    reports: list[tuple[Report, dict[str, Any]]],
    run_id: str,
) -> list[dict[str, Any]]:
    """A study's reports in the order they were issued: each later one supersedes the one before."""
    study = studies[studies["StudyInstanceUID"] == study_uid].iloc[0].to_dict()
    objects: list[dict[str, Any]] = []
    previous: dict[str, Any] | None = None
    for number, (report, row) in enumerate(sorted(reports, key=_order), 1):
        sha = row["message_sha256"]
        pred = None
        if previous is not None:
            row["supersedes"] = previous["sr_sop_instance_uid"] or previous["pdf_sop_instance_uid"]
            previous["superseded_by"] = dicom.sop_uid(sha, "SR" if report.text else "DOC")
            if previous["sr_sop_instance_uid"]:
                pred = dicom.Predecessor(
                    study_uid, dicom.series_uid(study_uid, "SR"), dicom.BASIC_TEXT_SR, previous["sr_sop_instance_uid"]
                )
        made = []
        if report.text:
            made.append(("sr", "SR", dicom.BASIC_TEXT_SR, dicom.text_sr(report, study, sha, number, pred)))
        if report.pdf is not None:
            made.append(("pdf", "DOC", dicom.ENCAPSULATED_PDF, dicom.encapsulated_pdf(report, study, sha, number)))
        row.update(sr_sop_instance_uid=None, pdf_sop_instance_uid=None, state=ReportState.MIGRATED.value)
        actions = []
        for prefix, modality, sop_class, data in made:
            outcome, obj = _put(store, study_uid, modality, sop_class, sha, data, run_id)
            actions.append(outcome)
            if outcome is PutOutcome.CONFLICT:
                row.update(state=ReportState.REJECTED.value, reason=ReportReason.UID_CONFLICT.value)
                continue
            row.update({f"{prefix}_sop_instance_uid": obj["sop_instance_uid"], f"{prefix}_key": obj["object_key"]})
            row[f"{prefix}_sha256"] = obj["object_sha256"]
            objects.append(obj)
        created = PutOutcome.CREATED in actions
        row["load_action"] = (PutOutcome.CREATED if created else PutOutcome.ALREADY_PRESENT).value
        previous = row
    return objects


def _put(
    store: ObjectStore, study_uid: str, modality: str, sop_class: str, message_sha: str, data: bytes, run_id: str
) -> tuple[PutOutcome, dict[str, Any]]:
    sop = dicom.sop_uid(message_sha, modality)
    key = instance_key(store.target.prefix, study_uid, dicom.series_uid(study_uid, modality), sop)
    digest = hashlib.sha256(data).hexdigest()
    meta = {"source-sha256": message_sha, "ruleset": BUILDER}
    put = store.put_new(key, data, digest, meta, same_if=("source-sha256", "ruleset"), writer=writer_tag(run_id))
    return put.outcome, {
        "study_instance_uid": study_uid,
        "sop_instance_uid": sop,
        "sop_class_uid": sop_class,
        "object_key": key,
        "object_sha256": put.sha256,
        "object_size": put.size,
        "run_id": run_id,
        "state": "migrated",
    }


def index_partition_of(study_date: dt.date) -> Partition:
    return Partition(study_date, REPORTS_MODALITY)
