"""Closed sets of codes: instance states and quarantine reasons (DESIGN.md 4)."""

from __future__ import annotations

from enum import Enum


class InstanceState(str, Enum):
    """Where one expected instance ends. Nothing ends anywhere else."""

    MIGRATED = "migrated"
    QUARANTINED = "quarantined"
    UNRESOLVED = "unresolved"


class ReasonCode(str, Enum):
    """Why an instance was quarantined or left unresolved.

    A closed set: extend it deliberately, because compliance reads these.
    Codes carrying a detail are written ``CODE:detail`` (see :func:`reason`).
    """

    NOT_DICOM = "NOT_DICOM"
    TRUNCATED = "TRUNCATED"
    MISSING_UID = "MISSING_UID"
    BAD_UID_SYNTAX = "BAD_UID_SYNTAX"
    PIXEL_LENGTH_MISMATCH = "PIXEL_LENGTH_MISMATCH"
    DECODER_UNAVAILABLE = "DECODER_UNAVAILABLE"
    UID_CONFLICT = "UID_CONFLICT"
    # migrated before, changed at the source since: the live object stays, the
    # new version is kept in quarantine (correction goes through a rollback)
    SOURCE_CHANGED = "SOURCE_CHANGED"
    # migrated before, gone from the source since: the object stays (policy: keep)
    SOURCE_DELETED = "SOURCE_DELETED"
    # an object under the partition's series with no manifest row (a killed run's
    # upload of an instance nobody asks for any more): adopted when its bytes hash to its checksum
    ORPHAN_ADOPTED = "ORPHAN_ADOPTED"
    INCONSISTENT_PATIENT = "INCONSISTENT_PATIENT"
    UNSOLICITED = "UNSOLICITED"
    RULE_REJECTED = "RULE_REJECTED"
    # hostile or broken input beyond the pipeline's bounds
    DECOMPRESSION_LIMIT = "DECOMPRESSION_LIMIT"  # a deflated dataset inflating past its limits
    NESTING_LIMIT = "NESTING_LIMIT"  # sequences nested deeper than any real object
    NORMALIZE_TIME_LIMIT = "NORMALIZE_TIME_LIMIT"  # normalize took longer than normalization.instance_seconds
    # unresolved: the source did not deliver the instance within the retry budget
    NOT_RECEIVED = "NOT_RECEIVED"
    # unresolved: a study's series or a series' instances could not be listed
    # (``CENSUS_FAILED:SERIES`` / ``CENSUS_FAILED:IMAGE``), so they cannot be named
    CENSUS_FAILED = "CENSUS_FAILED"
    # unresolved: the worker's staging disk filled up before the instance could be staged
    STAGING_FULL = "STAGING_FULL"
    # unresolved: the clinical window closed before its series was asked for (a later night moves it)
    WINDOW_CLOSED = "WINDOW_CLOSED"
    # reports from the RIS (HL7 v2), not placed in a study: the message stays in the report inbox
    REPORT_NO_MATCHING_STUDY = "REPORT_NO_MATCHING_STUDY"
    REPORT_AMBIGUOUS_MATCH = "REPORT_AMBIGUOUS_MATCH"
    HL7_PARSE_ERROR = "HL7_PARSE_ERROR"  # HL7_PARSE_ERROR:<segment>


def reason(code: ReasonCode, detail: str | None = None) -> str:
    """Render a reason code, e.g. ``MISSING_UID:SOPInstanceUID``."""
    return code.value if detail is None else f"{code.value}:{detail}"


# What each code means, for the people who read the reports and the dashboard.
MEANING: dict[ReasonCode, str] = {
    ReasonCode.NOT_DICOM: "the bytes received are not a DICOM object",
    ReasonCode.TRUNCATED: "the object ends before its declared content does",
    ReasonCode.MISSING_UID: "a required UID is missing",
    ReasonCode.BAD_UID_SYNTAX: "a UID breaks the DICOM syntax, so it cannot name a key",
    ReasonCode.PIXEL_LENGTH_MISMATCH: "the pixel data is shorter or longer than its rows x columns say",
    ReasonCode.DECODER_UNAVAILABLE: "the pixel data's compression cannot be decoded here",
    ReasonCode.UID_CONFLICT: "another object with different content holds the same SOP Instance UID",
    ReasonCode.SOURCE_CHANGED: "the source changed the instance after it was migrated; the new version is kept aside",
    ReasonCode.SOURCE_DELETED: "the source deleted the instance after it was migrated; the copy stays",
    ReasonCode.ORPHAN_ADOPTED: "an object a killed run stored was found, verified and recorded",
    ReasonCode.INCONSISTENT_PATIENT: "the study names more than one patient",
    ReasonCode.UNSOLICITED: "the source sent an instance nobody asked for",
    ReasonCode.RULE_REJECTED: "a site rule rejects the instance",
    ReasonCode.DECOMPRESSION_LIMIT: "a compressed dataset inflates past the safety limit",
    ReasonCode.NESTING_LIMIT: "sequences nest deeper than any real object",
    ReasonCode.NORMALIZE_TIME_LIMIT: "normalizing the instance took longer than allowed",
    ReasonCode.NOT_RECEIVED: "the source did not deliver the instance within the retries",
    ReasonCode.CENSUS_FAILED: "the source could not list the study's series or the series' instances",
    ReasonCode.STAGING_FULL: "the worker's staging disk was full",
    ReasonCode.WINDOW_CLOSED: "the clinical window closed before it was asked for; a later night moves it",
    ReasonCode.REPORT_NO_MATCHING_STUDY: "no migrated study has the report's accession number and patient (yet)",
    ReasonCode.REPORT_AMBIGUOUS_MATCH: "the report's accession number and patient match more than one study",
    ReasonCode.HL7_PARSE_ERROR: "the RIS message cannot be read as a report (the segment at fault)",
}


def describe(code: str) -> str:
    """Plain language for ``CODE`` or ``CODE:detail``; an unknown code says so."""
    head, _, detail = str(code).partition(":")
    try:
        text = MEANING[ReasonCode(head)]
    except ValueError:
        return "not a reason code of this version"
    return f"{text} ({detail})" if detail else text
