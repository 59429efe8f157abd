"""``where <StudyInstanceUID | accession number | patient ID>``: where a study
is now, during the months both archives coexist.

Each study is in one state: on the legacy PACS only, migrated and verified
(with the run and its verdict), migrated but not verified, partly migrated
(what is missing and why), quarantined (the reasons), or rolled back (which
rollback, when, why). The study index says what was migrated; the partition's
manifests say what was not and why; the legacy PACS's C-FIND says what exists
there and on which dates (which narrows the manifests to read)."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from .manifest import PartitionManifests, transferred_partitions
from .partition import Partition
from .reasons import describe
from .store import ObjectStore
from .uids import is_valid_uid


class StudyState(str, Enum):
    LEGACY_ONLY = "legacy only"
    MIGRATED = "migrated and verified"
    UNVERIFIED = "migrated, not verified"
    PARTLY = "partly migrated"
    QUARANTINED = "quarantined"
    ROLLED_BACK = "rolled back"
    NOT_FOUND = "not found"


class Search(Protocol):
    """Study-level lookups: the study index (in memory) or the legacy PACS."""

    def studies(self, **match: str) -> list[dict[str, Any]]: ...


@dataclass
class StudyLocation:
    study_instance_uid: str
    state: StudyState
    on_legacy: bool | None  # None: the legacy PACS was not asked or did not answer
    legacy_instances: int | None = None
    partitions: list[dict[str, Any]] = field(default_factory=list)
    rollbacks: list[dict[str, Any]] = field(default_factory=list)
    missing: dict[str, int] = field(default_factory=dict)  # why -> instances

    def to_json(self) -> dict[str, Any]:
        return {
            "study_instance_uid": self.study_instance_uid,
            "state": self.state.value,
            "on_legacy": self.on_legacy,
            "legacy_instances": self.legacy_instances,
            "partitions": self.partitions,
            "rollbacks": self.rollbacks,
            "missing": self.missing,
        }

    def render(self) -> str:
        lines = [f"study {self.study_instance_uid}: {self.state.value}"]
        if self.on_legacy is not None:
            n = f" ({self.legacy_instances} instances)" if self.legacy_instances is not None else ""
            lines.append(f"  legacy PACS: {'holds it' + n if self.on_legacy else 'does not hold it'}")
        for p in self.partitions:
            verdict = "PASSED" if p["verdict"] else "FAILED" if p["verdict"] is False else "not validated"
            lines.append(
                f"  {p['partition']}: {p['migrated']} migrated, {p['quarantined']} quarantined, "
                f"{p['unresolved']} unresolved; run {p['run_id']}, validation {verdict}"
            )
        for why, count in sorted(self.missing.items()):
            lines.append(f"  missing {count}: {why}")
        for r in self.rollbacks:
            lines.append(f"  rolled back by {r['rollback_id']} at {r['rolled_back_at']}: {r['reason']}")
        return "\n".join(lines)


def resolve(value: str, index: Search, legacy: Search | None) -> list[str]:
    """The study UIDs a value names: a UID itself, else the studies whose
    accession number or patient ID it is (in the index or on the legacy PACS)."""
    value = value.strip()
    if is_valid_uid(value) and "." in value:
        return [value]
    found: dict[str, None] = {}
    for source in (index, legacy):
        if source is None:
            continue
        for key in ("AccessionNumber", "PatientID"):
            try:
                found.update((str(r["StudyInstanceUID"]), None) for r in source.studies(**{key: value}))
            except LookupError:
                continue
    return list(found)


def locate(
    store: ObjectStore, study_uid: str, index: Search, legacy: Search | None, scan_all: bool = True
) -> StudyLocation:
    """Where one study is (see the module's docstring)."""
    indexed = index.studies(StudyInstanceUID=study_uid)
    legacy_rows: list[dict[str, Any]] | None = None
    if legacy is not None:
        try:
            legacy_rows = legacy.studies(StudyInstanceUID=study_uid)
        except LookupError:
            legacy_rows = None
    candidates = _candidates(indexed, legacy_rows)
    if not candidates and scan_all:
        candidates = set(transferred_partitions(store, rolled_back=True))
    loc = StudyLocation(study_uid, StudyState.NOT_FOUND, None if legacy_rows is None else bool(legacy_rows))
    if legacy_rows:
        n = legacy_rows[0].get("NumberOfStudyRelatedInstances")
        loc.legacy_instances = int(n) if n not in (None, "") else None
    rows_total = 0
    for partition in sorted(candidates):
        rows_total += _partition(store, partition, study_uid, loc)
    loc.state = _state(loc, rows_total)
    return loc


def _candidates(indexed: list[dict[str, Any]], legacy_rows: list[dict[str, Any]] | None) -> set[Partition]:
    out: set[Partition] = set()
    for r in indexed:
        for key in str(r.get("partitions") or "").split(","):
            if key:
                out.add(Partition.parse(key))
    for r in legacy_rows or []:
        date, modalities = r.get("StudyDate"), str(r.get("ModalitiesInStudy") or "")
        if date and modalities:
            day = dt.datetime.strptime(str(date)[:8], "%Y%m%d").date()
            out.update(Partition(day, m) for m in modalities.split("\\") if m)
    return out


def _partition(store: ObjectStore, partition: Partition, study_uid: str, loc: StudyLocation) -> int:
    """Add what the partition holds of the study; returns its live rows."""
    manifests = PartitionManifests(store, partition)
    for record in manifests.rollback_records():
        copy = manifests.rolled_back_transfer(str(record["rollback_id"]))
        if copy is not None and (copy["study_instance_uid"] == study_uid).any():
            loc.rollbacks.append(
                {
                    "rollback_id": record["rollback_id"],
                    "partition": partition.key,
                    "rolled_back_at": record.get("rolled_back_at"),
                    "reason": record.get("reason"),
                }
            )
    df = manifests.transfer_or_none()
    if df is None:
        return 0
    rows = df[df["study_instance_uid"] == study_uid]
    if rows.empty:
        return 0
    states = Counter(rows["state"])
    verdict = manifests.latest_verdict() or {}
    runs = sorted(set(rows["run_id"].dropna()))
    loc.partitions.append(
        {
            "partition": partition.key,
            "migrated": states.get("migrated", 0),
            "quarantined": states.get("quarantined", 0),
            "unresolved": states.get("unresolved", 0),
            "run_id": verdict.get("run_id") or (runs[-1] if runs else None),
            "verdict": bool(verdict.get("success")) if verdict else None,
        }
    )
    for state, reason in zip(rows["state"], rows["reason"], strict=True):
        if state != "migrated":
            why = f"{state} {reason}" if isinstance(reason, str) and reason else str(state)
            if isinstance(reason, str) and reason:
                why += f" ({describe(reason)})"
            loc.missing[why] = loc.missing.get(why, 0) + 1
    return len(rows)


def _state(loc: StudyLocation, rows: int) -> StudyState:
    if rows == 0:
        if loc.rollbacks:
            return StudyState.ROLLED_BACK
        return StudyState.LEGACY_ONLY if loc.on_legacy else StudyState.NOT_FOUND
    migrated = sum(p["migrated"] for p in loc.partitions)
    if loc.legacy_instances is not None and loc.legacy_instances > rows:
        loc.missing["on the legacy PACS, not migrated yet"] = loc.legacy_instances - rows
    if migrated == 0:
        return StudyState.QUARANTINED if any(p["quarantined"] for p in loc.partitions) else StudyState.PARTLY
    if loc.missing:
        return StudyState.PARTLY
    if all(p["verdict"] for p in loc.partitions):
        return StudyState.MIGRATED
    return StudyState.UNVERIFIED
