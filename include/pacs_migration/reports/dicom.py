"""A report as DICOM objects in its study: a Basic Text SR for the text, an
Encapsulated PDF for a PDF (PS3.3 A.35.1, A.45.1).

UIDs are derived from the message's hash, so placing the same message again
yields the same objects (the write-once load then finds them already
present). An amendment or a final report after a preliminary one names the
report it supersedes in Predecessor Documents Sequence: both stay.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian

from ..uids import IMPLEMENTATION_CLASS_UID
from .hl7 import Report, ReportStatus

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
SERIES_NUMBER = {"SR": 9001, "DOC": 9002}  # after any series a modality makes
# Study attributes copied from the migrated study (its normalized values), not from the message.
STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
    "StudyDescription",
)
REPORT_TITLE = ("18748-4", "LN", "Diagnostic imaging report")
FINDING = ("121071", "DCM", "Finding")
PERSON_OBSERVER = ("121008", "DCM", "Person Observer Name")


@dataclass(frozen=True)
class Predecessor:
    """The report object an amendment supersedes."""

    study_uid: str
    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str


def derived_uid(*parts: str) -> str:
    """A 2.25 UID from a hash of ``parts`` (stable across runs, no registered root needed)."""
    digest = hashlib.sha256("|".join(("pacs-migration-report", *parts)).encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def series_uid(study_uid: str, modality: str) -> str:
    """All of a study's reports of one kind in one series (a viewer shows one SR series, one DOC series)."""
    return derived_uid(study_uid, "series", modality)


def sop_uid(message_sha256: str, modality: str) -> str:
    return derived_uid(message_sha256, modality)


def text_sr(
    report: Report, study: dict[str, Any], message_sha256: str, number: int, predecessor: Predecessor | None
) -> bytes:
    """The report's text as a Basic Text SR in ``study`` (its index row)."""
    ds = _common(report, study, message_sha256, "SR", BASIC_TEXT_SR, number)
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    ds.PerformedProcedureCodeSequence = Sequence()
    ds.CompletionFlag = "COMPLETE" if report.status is not ReportStatus.PRELIMINARY else "PARTIAL"
    verified = report.status is not ReportStatus.PRELIMINARY and report.interpreter is not None
    ds.VerificationFlag = "VERIFIED" if verified else "UNVERIFIED"
    if verified:
        assert report.interpreter is not None
        observer = Dataset()
        observer.VerifyingObserverName = report.interpreter.dicom_name
        observer.VerifyingObserverIdentificationCodeSequence = Sequence()
        observer.VerifyingOrganization = _text(study.get("InstitutionName")) or "Radiology"
        observer.VerificationDateTime = _dt(report.reported_at or report.observed_at)
        ds.VerifyingObserverSequence = Sequence([observer])
    if predecessor is not None:
        ds.PredecessorDocumentsSequence = Sequence([_reference(predecessor)])
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = Sequence([_code(*REPORT_TITLE)])
    ds.ContinuityOfContent = "SEPARATE"
    items = []
    if report.interpreter is not None:
        author = _item("HAS OBS CONTEXT", "PNAME", PERSON_OBSERVER)
        author.PersonName = report.interpreter.dicom_name
        items.append(author)
    for paragraph in _paragraphs(report.text):
        item = _item("CONTAINS", "TEXT", FINDING)
        item.TextValue = paragraph
        items.append(item)
    ds.ContentSequence = Sequence(items)
    return _write(ds)


def encapsulated_pdf(report: Report, study: dict[str, Any], message_sha256: str, number: int) -> bytes:
    """The report's PDF, as the RIS sent it, in an Encapsulated PDF object."""
    assert report.pdf is not None
    ds = _common(report, study, message_sha256, "DOC", ENCAPSULATED_PDF, number)
    ds.ConversionType = "WSD"
    ds.AcquisitionDateTime = _dt(report.observed_at)
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = f"{report.procedure or 'Imaging'} report ({report.status.label})"[:64]
    ds.ConceptNameCodeSequence = Sequence([_code(*REPORT_TITLE)])
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocumentLength = len(report.pdf)
    ds.EncapsulatedDocument = report.pdf + (b"\0" if len(report.pdf) % 2 else b"")
    return _write(ds)


def _common(
    report: Report, study: dict[str, Any], message_sha256: str, modality: str, sop_class: str, number: int
) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: any script the RIS wrote in
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid(message_sha256, modality)
    now = report.reported_at or report.observed_at
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    for kw in STUDY_KEYWORDS:
        value = _text(study.get(kw))
        if value is not None or kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
            setattr(ds, kw, value)
    for kw in ("StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID"):
        if kw not in ds:
            setattr(ds, kw, None)  # type 2: present, possibly empty
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid(str(study["StudyInstanceUID"]), modality)
    ds.SeriesNumber = SERIES_NUMBER[modality]
    ds.SeriesDescription = "Reports from the RIS"
    ds.Manufacturer = "pacs-migration"
    ds.InstanceNumber = number
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    return ds


def _text(value: Any) -> str | None:
    """An index value as DICOM text; None for missing (None, NaN, empty)."""
    if value is None or (isinstance(value, float) and value != value) or str(value) == "":
        return None
    return str(value)


def _paragraphs(text: str) -> list[str]:
    """Blank lines separate findings; each TEXT value stays within UT's bounds."""
    paras = [p.strip("\n") for p in text.split("\n\n") if p.strip()]
    return paras or [text]


def _item(relationship: str, value_type: str, concept: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    item.RelationshipType = relationship
    item.ValueType = value_type
    item.ConceptNameCodeSequence = Sequence([_code(*concept)])
    return item


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, scheme, meaning
    return code


def _reference(p: Predecessor) -> Dataset:
    sop = Dataset()
    sop.ReferencedSOPClassUID, sop.ReferencedSOPInstanceUID = p.sop_class_uid, p.sop_instance_uid
    series = Dataset()
    series.SeriesInstanceUID = p.series_uid
    series.ReferencedSOPSequence = Sequence([sop])
    study = Dataset()
    study.StudyInstanceUID = p.study_uid
    study.ReferencedSeriesSequence = Sequence([series])
    return study


def _dt(value: dt.datetime) -> str:
    return value.strftime("%Y%m%d%H%M%S")


def _write(ds: Dataset) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = "PACSMIG_RPT"
    ds.file_meta = meta
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
