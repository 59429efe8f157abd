"""The audit trail: DICOM audit messages of what the pipeline did, to the
bucket's hash-chained log (always) and to a syslog collector (when set)."""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from ..config import AuditConfig, SourceConfig
from ..store import ObjectStore
from . import chain
from .messages import (
    AuditSource,
    EventID,
    EventType,
    Outcome,
    Participant,
    Role,
    StudyObject,
    application_activity,
    audit_log_used,
    instances_accessed,
    query,
    security_alert,
    study_deleted,
    study_transfer,
)
from .syslog import SyslogTarget, send

log = logging.getLogger(__name__)

SR_CLASS, PDF_CLASS = "1.2.840.10008.5.1.4.1.1.88.11", "1.2.840.10008.5.1.4.1.1.104.1"  # Basic Text SR, PDF

__all__ = ["AuditTrail", "EventID", "EventType", "Outcome", "StudyObject"]


class AuditTrail:
    """Collects this task's audit messages and appends them as one link
    (:meth:`flush`, also on leaving :meth:`session`). ``actor``: who or what
    started the work (an Airflow run, a person at the command line)."""

    def __init__(self, store: ObjectStore, config: AuditConfig, source: SourceConfig | None, actor: str) -> None:
        self.store, self.config, self.source_cfg, self.actor = store, config, source, actor
        self.source = AuditSource(config.source_id, config.site_id)
        self.pending: list[bytes] = []
        self._lock = threading.Lock()

    # -- participants --------------------------------------------------------

    def app(self, requestor: bool = False) -> Participant:
        ae = self.source_cfg.calling_ae_title if self.source_cfg else None
        return Participant(
            ae or self.config.source_id, requestor, Role.APPLICATION, socket.gethostname(), str(os.getpid())
        )

    def launcher(self) -> Participant:
        return Participant(self.actor, True, Role.APPLICATION_LAUNCHER)

    def pacs(self, role: Role | None = None) -> Participant:
        src = self.source_cfg
        assert src is not None, "no source configured"
        return Participant(src.called_ae_title, False, role, src.host)

    def bucket(self) -> Participant:
        return Participant(f"s3://{self.store.bucket}/{self.store.target.prefix}", False, Role.DESTINATION)

    # -- events ----------------------------------------------------------------

    def add(self, message: bytes) -> None:
        with self._lock:
            self.pending.append(message)

    def application(self, start: bool, outcome: Outcome = Outcome.SUCCESS) -> None:
        self.add(application_activity(start, self.app(), self.launcher(), self.source, outcome))

    def auditing_find(self, find: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """``find`` that records each C-FIND of the source (110112)."""

        def audited(identifier: Any) -> Any:
            at, outcome = dt.datetime.now(dt.UTC), Outcome.SUCCESS
            try:
                return find(identifier)
            except Exception:
                outcome = Outcome.SERIOUS_FAILURE
                raise
            finally:
                self.add(query(self.app(True), self.pacs(), self.source, _query_keys(identifier), outcome, at))

        return audited

    def transfer(self, rows: Iterable[dict[str, Any]], began: dt.datetime, failed: bool = False) -> None:
        """110102 and 110104 per study of a transfer manifest's rows (this
        run's retrieval; carried rows are not transferred again), and 110113
        for what arrived unasked or twice with different content."""
        studies: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in rows:
            if row.get("load_action") != "carried" and row.get("study_instance_uid"):
                studies[str(row["study_instance_uid"])].append(row)
        for uid, members in sorted(studies.items()):
            self._study_transfer(uid, members, began, failed)
            for code in (EventType.UNSOLICITED, EventType.UID_CONFLICT):
                if n := sum(str(r.get("reason") or "").startswith(code.code) for r in members):
                    self.alert(code, self.pacs(Role.SOURCE), f"{n} instance(s) quarantined {code.code}", uid)

    def _study_transfer(self, uid: str, rows: list[dict[str, Any]], began: dt.datetime, failed: bool) -> None:
        moved = [r for r in rows if r.get("state") == "migrated"]
        classes = Counter(str(r.get("sop_class_uid") or "") for r in moved if r.get("sop_class_uid"))
        keys = [str(r["patient_key"]) for r in rows if r.get("patient_key")]
        study = StudyObject(uid, dict(classes))
        nodes = (self.pacs(Role.SOURCE), self.bucket(), self.launcher(), self.source)
        self.add(study_transfer(EventID.BEGIN_TRANSFERRING, *nodes, study, keys, Outcome.SUCCESS, began))
        outcome = Outcome.SUCCESS if len(moved) == len(rows) else Outcome.MINOR_FAILURE
        outcome = Outcome.SERIOUS_FAILURE if failed else outcome
        note = f"{len(moved)} of {len(rows)} instance(s) migrated" if outcome is not Outcome.SUCCESS else None
        at = dt.datetime.now(dt.UTC)
        self.add(study_transfer(EventID.INSTANCES_TRANSFERRED, *nodes, study, keys, outcome, at, note))

    def reports_stored(self, rows: Iterable[dict[str, Any]], ris: str = "RIS") -> None:
        """110104 per study that got report objects this run (SR, PDF), the RIS as their source."""
        studies: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            if r.get("state") == "migrated" and r.get("load_action") == "created" and r.get("study_instance_uid"):
                studies[str(r["study_instance_uid"])].append(r)
        at = dt.datetime.now(dt.UTC)
        for uid, members in sorted(studies.items()):
            classes: Counter[str] = Counter()
            for r in members:
                made = (("sr_key", SR_CLASS), ("pdf_key", PDF_CLASS))
                classes.update(c for k, c in made if isinstance(r.get(k), str))
            keys = sorted({str(r["patient_key"]) for r in members if r.get("patient_key")})
            nodes = (Participant(ris, False, Role.SOURCE), self.bucket(), self.launcher(), self.source)
            note = f"{len(members)} report(s) from the RIS (HL7 v2 ORU^R01) stored in the study"
            study = StudyObject(uid, dict(classes))
            self.add(study_transfer(EventID.INSTANCES_TRANSFERRED, *nodes, study, keys, Outcome.SUCCESS, at, note))

    def alert(self, kind: EventType, offender: Participant, description: str, study_uid: str | None = None) -> None:
        study = StudyObject(study_uid) if study_uid else None
        self.add(security_alert(kind, self.app(), offender, self.source, description, study))

    def router_alert(self, alert: dict[str, Any]) -> None:
        """A security alert the worker's C-MOVE listener relayed (a refused
        association or store): who tried, from where, and why it was refused."""
        offender = Participant(str(alert.get("calling_ae") or "?"), True, None, alert.get("address") or None)
        self.alert(EventType.NODE_AUTHENTICATION, offender, str(alert.get("why") or "refused"))

    def accessed(self, person: str, purpose: str, study_uids: Iterable[str], patient_keys: Iterable[str]) -> None:
        who = Participant(person, True, None, socket.gethostname())
        studies = [StudyObject(u) for u in sorted(set(study_uids))]
        self.add(instances_accessed(who, self.app(), self.source, studies, patient_keys, purpose))

    def searched(self, person: str, keys: dict[str, str], description: str) -> None:
        """110112: a person searched the archive (DICOMweb QIDO-RS); ``keys``
        say what was asked, patient identifiers already keyed by the caller."""
        who = Participant(person, True, None, None)
        self.add(query(who, self.app(), self.source, keys, Outcome.SUCCESS, dt.datetime.now(dt.UTC), description))

    def log_used(self, person: str, description: str) -> None:
        """110101: ``person`` read the audit trail (who watches the watchers)."""
        who = Participant(person, True, None, socket.gethostname())
        uri = f"s3://{self.store.bucket}/{self.store.target.prefix}_audit/"
        self.add(audit_log_used(who, self.app(), self.source, uri, description))

    def deleted(self, person: str, study_uids: Iterable[str], patient_keys: Iterable[str], description: str) -> None:
        """110105: a rollback took studies out of the live layout, or a purge deleted their copies."""
        who = Participant(person, True, None, socket.gethostname())
        studies = [StudyObject(u) for u in sorted(set(study_uids))]
        self.add(study_deleted(who, self.app(), self.source, studies, patient_keys, description))

    # -- writing -----------------------------------------------------------------

    def flush(self) -> int:
        """Append what is pending as one link (and send it to the collector); returns its count."""
        with self._lock:
            batch, self.pending = self.pending, []
        if not batch:
            return 0
        chain.append(self.store, batch, self.actor)
        if (s := self.config.syslog) is not None:
            try:
                send(SyslogTarget(s.host, s.port, s.ca_file, s.cert_file, s.key_file, s.server_name), batch)
            except (OSError, ValueError) as exc:  # the bucket's log holds them; say the collector missed them
                log.warning(
                    "audit: %d message(s) not delivered to syslog %s:%d (%s)",
                    len(batch),
                    s.host,
                    s.port,
                    type(exc).__name__,
                )
        return len(batch)

    @contextmanager
    def session(self) -> Iterator[AuditTrail]:
        """Flushes on the way out, whatever happened. When the work itself
        failed, that failure is the one raised (an unwritable log is logged)."""
        try:
            yield self
        except BaseException:
            try:
                self.flush()
            except Exception as exc:
                log.warning("audit: %d message(s) could not be recorded (%s)", len(self.pending), type(exc).__name__)
            raise
        self.flush()


_QUERY_KEYS = (
    "QueryRetrieveLevel",
    "StudyDate",
    "StudyTime",
    "ModalitiesInStudy",
    "Modality",
    "StudyInstanceUID",
    "SeriesInstanceUID",
)


def _query_keys(identifier: Any) -> dict[str, str]:
    """The non-empty keys of a C-FIND identifier that say what was asked (no patient attributes)."""
    out: dict[str, str] = {}
    for name in _QUERY_KEYS:
        value = getattr(identifier, name, None) if hasattr(identifier, name) else None
        if value not in (None, ""):
            out[name] = str(value)
    return out
