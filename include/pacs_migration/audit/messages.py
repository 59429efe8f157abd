"""DICOM audit messages (PS3.15 A.5, RFC 3881): the events the pipeline
records and the participants each one names.

Patients are named by their keyed pseudonym (:mod:`privacy`), never by their
ID or name: the audit log lives beside the migrated data, readable by the
compliance role, and must not become a second patient index. ``audit find
--patient-id`` keys the ID a person gives it to find their records."""

from __future__ import annotations

import base64
import datetime as dt
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple
from xml.etree import ElementTree as ET


class Code(NamedTuple):
    code: str
    system: str
    meaning: str


class EventID(Code, Enum):
    """The audit events of the pipeline (PS3.16 CID 400)."""

    APPLICATION_ACTIVITY = Code("110100", "DCM", "Application Activity")
    AUDIT_LOG_USED = Code("110101", "DCM", "Audit Log Used")
    BEGIN_TRANSFERRING = Code("110102", "DCM", "Begin Transferring DICOM Instances")
    INSTANCES_ACCESSED = Code("110103", "DCM", "DICOM Instances Accessed")
    INSTANCES_TRANSFERRED = Code("110104", "DCM", "DICOM Instances Transferred")
    STUDY_DELETED = Code("110105", "DCM", "DICOM Study Deleted")
    QUERY = Code("110112", "DCM", "Query")
    SECURITY_ALERT = Code("110113", "DCM", "Security Alert")


class EventType(Code, Enum):
    """EventTypeCode values (CID 401, CID 403; ours under a local system)."""

    APPLICATION_START = Code("110120", "DCM", "Application Start")
    APPLICATION_STOP = Code("110121", "DCM", "Application Stop")
    NODE_AUTHENTICATION = Code("110126", "DCM", "Node Authentication")
    UNSOLICITED = Code("UNSOLICITED", "99PACSMIG", "Instance received that was not asked for")
    UID_CONFLICT = Code("UID_CONFLICT", "99PACSMIG", "Instance received twice with different content")


class Role(Code, Enum):
    """RoleIDCode of an active participant (CID 402)."""

    APPLICATION = Code("110150", "DCM", "Application")
    APPLICATION_LAUNCHER = Code("110151", "DCM", "Application Launcher")
    DESTINATION = Code("110152", "DCM", "Destination Role ID")
    SOURCE = Code("110153", "DCM", "Source Role ID")


class Outcome(str, Enum):
    SUCCESS = "0"
    MINOR_FAILURE = "4"
    SERIOUS_FAILURE = "8"
    MAJOR_FAILURE = "12"


STUDY_UID = Code("110180", "DCM", "Study Instance UID")
PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
FIND_STUDY_ROOT = Code("1.2.840.10008.5.1.4.1.2.2.1", "DCM", "Study Root Query/Retrieve Information Model - FIND")


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: an application, a PACS, a bucket or a person."""

    user_id: str
    requestor: bool
    role: Role | None = None
    access_point: str | None = None  # host name or address
    alternative_id: str | None = None  # e.g. the process id
    user_name: str | None = None

    def element(self) -> ET.Element:
        el = ET.Element("ActiveParticipant", UserID=self.user_id, UserIsRequestor=str(self.requestor).lower())
        if self.alternative_id:
            el.set("AlternativeUserID", self.alternative_id)
        if self.user_name:
            el.set("UserName", self.user_name)
        if self.access_point:
            el.set("NetworkAccessPointID", self.access_point)
            el.set("NetworkAccessPointTypeCode", "2" if _is_address(self.access_point) else "1")
        if self.role is not None:
            _coded(el, "RoleIDCode", self.role)
        return el


@dataclass(frozen=True)
class StudyObject:
    """A study and what of it the event concerns (SOP class -> instances)."""

    study_instance_uid: str
    sop_classes: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class AuditSource:
    source_id: str
    site_id: str | None = None


def _is_address(host: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except OSError:
            continue
    return False


def _coded(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(
        parent, tag, {"csd-code": code.code, "codeSystemName": code.system, "originalText": code.meaning}
    )


def _study(study: StudyObject) -> ET.Element:
    el = ET.Element(
        "ParticipantObjectIdentification",
        ParticipantObjectID=study.study_instance_uid,
        ParticipantObjectTypeCode="2",
        ParticipantObjectTypeCodeRole="3",
    )
    _coded(el, "ParticipantObjectIDTypeCode", STUDY_UID)
    desc = ET.SubElement(el, "ParticipantObjectDescription")
    for uid, n in sorted(study.sop_classes.items()):
        ET.SubElement(desc, "SOPClass", UID=uid, NumberOfInstances=str(n))
    return el


def _patient(patient_key: str) -> ET.Element:
    el = ET.Element(
        "ParticipantObjectIdentification",
        ParticipantObjectID=patient_key,
        ParticipantObjectTypeCode="1",
        ParticipantObjectTypeCodeRole="1",
    )
    _coded(el, "ParticipantObjectIDTypeCode", PATIENT_NUMBER)
    return el


def message(
    event: EventID,
    action: str,
    outcome: Outcome,
    participants: Sequence[Participant],
    source: AuditSource,
    *,
    event_type: EventType | None = None,
    description: str | None = None,
    objects: Iterable[ET.Element] = (),
    at: dt.datetime | None = None,
) -> bytes:
    """One AuditMessage, serialized (UTF-8, no declaration: one per syslog record)."""
    root = ET.Element("AuditMessage")
    when = (at or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).isoformat(timespec="milliseconds")
    ev = ET.SubElement(
        root, "EventIdentification", EventActionCode=action, EventDateTime=when, EventOutcomeIndicator=outcome.value
    )
    _coded(ev, "EventID", event)
    if event_type is not None:
        _coded(ev, "EventTypeCode", event_type)
    if description:
        ET.SubElement(ev, "EventOutcomeDescription").text = description
    root.extend(p.element() for p in participants)
    src = ET.SubElement(root, "AuditSourceIdentification", AuditSourceID=source.source_id)
    if source.site_id:
        src.set("AuditEnterpriseSiteID", source.site_id)
    ET.SubElement(src, "AuditSourceTypeCode", {"csd-code": "4"})  # application server process
    root.extend(objects)
    return ET.tostring(root, encoding="utf-8", xml_declaration=False)


def application_activity(
    start: bool, app: Participant, launcher: Participant, source: AuditSource, outcome: Outcome = Outcome.SUCCESS
) -> bytes:
    return message(
        EventID.APPLICATION_ACTIVITY,
        "E",
        outcome,
        [app, launcher],
        source,
        event_type=EventType.APPLICATION_START if start else EventType.APPLICATION_STOP,
    )


def query(
    app: Participant,
    pacs: Participant,
    source: AuditSource,
    keys: dict[str, str],
    outcome: Outcome,
    at: dt.datetime,
    description: str | None = None,
) -> bytes:
    """A C-FIND of the source; ``keys``: the query's non-empty keys (dates,
    modality, level: the census never asks for patient attributes)."""
    q = ET.Element(
        "ParticipantObjectIdentification",
        ParticipantObjectID=FIND_STUDY_ROOT.code,
        ParticipantObjectTypeCode="2",
        ParticipantObjectTypeCodeRole="24",
    )
    _coded(q, "ParticipantObjectIDTypeCode", FIND_STUDY_ROOT)
    text = ";".join(f"{k}={v}" for k, v in sorted(keys.items()))
    ET.SubElement(q, "ParticipantObjectQuery").text = base64.b64encode(text.encode()).decode()
    return message(EventID.QUERY, "E", outcome, [app, pacs], source, objects=[q], at=at, description=description)


def study_transfer(
    event: EventID,
    source_node: Participant,
    destination: Participant,
    launcher: Participant,
    source: AuditSource,
    study: StudyObject,
    patient_keys: Iterable[str],
    outcome: Outcome,
    at: dt.datetime,
    description: str | None = None,
) -> bytes:
    """110102 (begin transferring) or 110104 (instances transferred) for one
    study: the PACS as source, the bucket as destination, the run as launcher."""
    action = "R" if event is EventID.BEGIN_TRANSFERRING else "C"
    objects = [_study(study), *(_patient(k) for k in sorted(set(patient_keys)))]
    return message(
        event,
        action,
        outcome,
        [source_node, destination, launcher],
        source,
        objects=objects,
        at=at,
        description=description,
    )


def security_alert(
    kind: EventType,
    reporter: Participant,
    offender: Participant,
    source: AuditSource,
    description: str,
    study: StudyObject | None = None,
    at: dt.datetime | None = None,
) -> bytes:
    """110113: a refused association, an unsolicited or conflicting arrival."""
    objects = [_study(study)] if study else []
    return message(
        EventID.SECURITY_ALERT,
        "E",
        Outcome.MINOR_FAILURE,
        [reporter, offender],
        source,
        event_type=kind,
        description=description,
        objects=objects,
        at=at,
    )


def instances_accessed(
    person: Participant,
    app: Participant,
    source: AuditSource,
    studies: Iterable[StudyObject],
    patient_keys: Iterable[str],
    purpose: str,
) -> bytes:
    """110103: someone looked up where a study or patient's images went
    (``trace``); why they asked is kept with the record."""
    objects = [*(_study(s) for s in studies), *(_patient(k) for k in sorted(set(patient_keys)))]
    return message(
        EventID.INSTANCES_ACCESSED,
        "R",
        Outcome.SUCCESS,
        [person, app],
        source,
        objects=objects,
        description=f"purpose of use: {purpose}",
    )


def study_deleted(
    person: Participant,
    app: Participant,
    source: AuditSource,
    studies: Iterable[StudyObject],
    patient_keys: Iterable[str],
    description: str,
) -> bytes:
    """110105: studies left the live archive (a rollback moved them aside) or
    their rolled-back copies were purged; the description says which, and why."""
    objects = [*(_study(s) for s in studies), *(_patient(k) for k in sorted(set(patient_keys)))]
    return message(
        EventID.STUDY_DELETED, "D", Outcome.SUCCESS, [person, app], source, objects=objects, description=description
    )


URI = Code("12", "RFC-3881", "URI")
SECURITY_RESOURCE = "13"  # ParticipantObjectTypeCodeRole


def audit_log_used(person: Participant, app: Participant, source: AuditSource, log_uri: str, description: str) -> bytes:
    """110101: someone read the audit trail itself (``audit find``, ``audit verify``)."""
    obj = ET.Element(
        "ParticipantObjectIdentification",
        ParticipantObjectID=log_uri,
        ParticipantObjectTypeCode="2",
        ParticipantObjectTypeCodeRole=SECURITY_RESOURCE,
    )
    _coded(obj, "ParticipantObjectIDTypeCode", URI)
    return message(
        EventID.AUDIT_LOG_USED, "R", Outcome.SUCCESS, [person, app], source, objects=[obj], description=description
    )
