"""Rollback: take what one or more runs wrote out of the live layout, keep it.

A rollback selects rows of the transfer manifests (by partition, by Study
Instance UID, by run id; each criterion given narrows the others) and moves
every live object they name (migrated instances and quarantined originals) to
``rolled-back/<rollback id>/<its live key>``: server-side copy, re-read the
copy and match its SHA-256 against the live object's, only then delete the
live object. Never a delete without a verified copy.

The plan is journalled first (``rolled-back/<id>/rollback.json``, state
``in_progress``, with every object to move and its checksum), each partition's
progress after each step, so that a rollback killed halfway resumes to
completion: every object ends live or under ``rolled-back/``, and while both
exist the journal says the rolled-back copy is the one that counts.

Each partition then is *not migrated*: its manifests are copied beside the
objects, the live transfer manifest loses the selected rows (or goes, when the
whole partition was selected), its verdict says ``rolled back`` and its lineage
is replaced by a tombstone naming the rollback, which the next run's lineage
record links to (:func:`superseded`). The copies stay until an explicit purge
(:func:`purge`) after the configured retention.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from .manifest import LINEAGE, TRANSFER, VALIDATION, PartitionManifests, rolled_back_prefix, transferred_partitions
from .partition import Partition
from .reasons import InstanceState
from .reports.ledger import ReportLedger, ledger_dates
from .reports.place import REPORTS_MODALITY
from .store import ObjectStore
from .uids import is_valid_uid

log = logging.getLogger(__name__)

SCHEMA = "pacs-migration/rollback/1"
RECORD = "rollback.json"


class SelectionError(ValueError):
    """A rollback request that cannot be carried out as given; ``field`` names the input."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class RollbackRefused(RuntimeError):
    """Another run writes a selected date now, or the rollback id is taken by another request."""


class RollbackLost(RuntimeError):
    """An object is neither live nor under its verified copy: stop, say which."""


class PurgeRefused(RuntimeError):
    pass


@dataclass(frozen=True)
class Selection:
    """Which rows of the transfer manifests a rollback takes; every criterion
    given narrows the others (a partition and a run: that run's rows of that partition)."""

    partitions: tuple[Partition, ...] = ()
    study_uids: tuple[str, ...] = ()
    run_ids: tuple[str, ...] = ()

    @classmethod
    def parse(cls, partitions: Iterable[str] = (), study_uids: Iterable[str] = (), run_ids: Iterable[str] = ()):
        """From user input, naming the field of anything wrong."""
        parts = []
        for i, key in enumerate(p.strip() for p in partitions if p and p.strip()):
            try:
                parts.append(Partition.parse(key))
            except ValueError as exc:
                raise SelectionError(f"partitions[{i}]", str(exc)) from None
        uids = tuple(u.strip() for u in study_uids if u and u.strip())
        for i, uid in enumerate(uids):
            if not is_valid_uid(uid):
                raise SelectionError(f"study_uids[{i}]", "not a valid UID")
        runs = tuple(r.strip() for r in run_ids if r and r.strip())
        if not (parts or uids or runs):
            raise SelectionError("selection", "give partitions, study_uids or run_ids")
        return cls(tuple(sorted(set(parts))), tuple(sorted(set(uids))), tuple(sorted(set(runs))))

    def mask(self, partition: Partition, df: pd.DataFrame) -> pd.Series:
        """The rows of ``partition``'s transfer manifest this selection takes."""
        m = pd.Series(not self.partitions or partition in self.partitions, index=df.index)
        if self.study_uids:
            m &= df["study_instance_uid"].isin(self.study_uids)
        if self.run_ids:
            m &= df["run_id"].isin(self.run_ids)
        return m

    def to_json(self) -> dict[str, Any]:
        return {
            "partitions": [p.key for p in self.partitions],
            "study_uids": list(self.study_uids),
            "run_ids": list(self.run_ids),
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Selection:
        return cls.parse(value.get("partitions", ()), value.get("study_uids", ()), value.get("run_ids", ()))


@dataclass(frozen=True)
class MovedObject:
    """One live object a rollback takes (an instance, or a quarantined original)."""

    key: str
    sha256: str
    size: int
    kind: str  # "instance" or "quarantine"


@dataclass(frozen=True)
class PartitionPlan:
    """What a rollback takes from one partition."""

    partition: Partition
    whole: bool  # every row selected: the partition's manifests leave the live layout
    instances: int  # selected rows
    migrated: int
    quarantined: int
    unresolved: int
    studies: int
    run_ids: tuple[str, ...]
    objects: tuple[MovedObject, ...]
    patient_keys: tuple[str, ...] = ()  # keyed (privacy.py), for the audit record
    study_uids: tuple[str, ...] = ()

    @property
    def bytes(self) -> int:
        return sum(o.size for o in self.objects)

    def figures(self) -> dict[str, Any]:
        """The counts the report, the dry run and the records show (no UIDs)."""
        return {
            "partition": self.partition.key,
            "whole": self.whole,
            "instances": self.instances,
            "migrated": self.migrated,
            "quarantined": self.quarantined,
            "unresolved": self.unresolved,
            "studies": self.studies,
            "objects": len(self.objects),
            "bytes": self.bytes,
            "runs": len(self.run_ids),
            "digest": digest(self.objects),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            **self.figures(),
            "run_ids": list(self.run_ids),
            "study_uids": list(self.study_uids),
            "patient_keys": list(self.patient_keys),
            "moved": [[o.key, o.sha256, o.size, o.kind] for o in self.objects],
        }

    @classmethod
    def from_json(cls, v: dict[str, Any]) -> PartitionPlan:
        return cls(
            partition=Partition.parse(v["partition"]),
            whole=bool(v["whole"]),
            instances=int(v["instances"]),
            migrated=int(v["migrated"]),
            quarantined=int(v["quarantined"]),
            unresolved=int(v["unresolved"]),
            studies=int(v["studies"]),
            run_ids=tuple(v["run_ids"]),
            objects=tuple(MovedObject(k, s, int(n), kind) for k, s, n, kind in v["moved"]),
            patient_keys=tuple(v.get("patient_keys", ())),
            study_uids=tuple(v.get("study_uids", ())),
        )


def digest(objects: Iterable[MovedObject]) -> str:
    """SHA-256 of the sorted ``<key> <sha256>`` lines: one figure for everything moved."""
    lines = sorted(f"{o.key} {o.sha256}" for o in objects)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


@dataclass(frozen=True)
class RollbackPlan:
    rollback_id: str
    selection: Selection
    reason: str
    requested_by: str
    partitions: tuple[PartitionPlan, ...]

    @property
    def objects(self) -> list[MovedObject]:
        return [o for p in self.partitions for o in p.objects]

    def totals(self) -> dict[str, Any]:
        figs = [p.figures() for p in self.partitions]
        keys = ("instances", "migrated", "quarantined", "unresolved", "studies", "objects", "bytes")
        return {
            "partitions": len(figs),
            **{k: sum(f[k] for f in figs) for k in keys},
            "digest": digest(self.objects),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "rollback_id": self.rollback_id,
            "selection": self.selection.to_json(),
            "reason": self.reason,
            "requested_by": self.requested_by,
            "totals": self.totals(),
            "partitions": [p.to_json() for p in self.partitions],
        }

    @classmethod
    def from_json(cls, v: dict[str, Any]) -> RollbackPlan:
        return cls(
            v["rollback_id"],
            Selection.from_json(v["selection"]),
            v["reason"],
            v["requested_by"],
            tuple(PartitionPlan.from_json(p) for p in v["partitions"]),
        )


def rollback_id(seed: str, at: dt.datetime) -> str:
    """``rb-<UTC time>-<8 hex of seed>``: the same seed (an Airflow run) gives
    the same id, so a retried task resumes the rollback it began."""
    return f"rb-{at.astimezone(dt.UTC):%Y%m%dT%H%M%SZ}-{hashlib.sha256(seed.encode()).hexdigest()[:8]}"


def plan_rollback(
    store: ObjectStore, selection: Selection, reason: str, requested_by: str, rollback_id: str
) -> RollbackPlan:
    """What the selection takes, partition by partition; reads only.

    Raises
    ------
    SelectionError
        No reason, a selected partition never migrated, or nothing selected.
    """
    if not reason or not reason.strip():
        raise SelectionError("reason", "say why (it goes into the rollback record and the report)")
    if not requested_by.strip():
        raise SelectionError("requested_by", "who asks for the rollback")
    live = transferred_partitions(store)
    for p in selection.partitions:
        if p not in live:
            raise SelectionError("partitions", f"{p.key} has no transfer manifest: nothing was migrated there")
    plans = []
    for p in selection.partitions or live:
        df = PartitionManifests(store, p).transfer()
        mask = selection.mask(p, df)
        if mask.any():
            plans.append(_partition_plan(p, df, mask))
    if not plans:
        raise SelectionError("selection", "matches no row of any transfer manifest")
    plans += _reports_plans(store, selection, plans)
    return RollbackPlan(rollback_id, selection, reason.strip(), requested_by.strip(), tuple(plans))


REPORT_DAYS = 31  # the widest reports.match_days: where a study's reports may be filed


def _studies_taken_whole(store: ObjectStore, selection: Selection, plans: list[PartitionPlan]) -> set[str]:
    """The selected studies none of whose migrated instances stays live on their date."""
    taken: set[str] = set()
    for day in sorted({pp.partition.study_date for pp in plans}):
        studies = {u for pp in plans if pp.partition.study_date == day for u in pp.study_uids}
        for p in transferred_partitions(store, day):
            df = PartitionManifests(store, p).transfer()
            stays = df[(df["state"] == InstanceState.MIGRATED.value) & ~selection.mask(p, df)]
            studies -= set(stays["study_instance_uid"].dropna().astype(str))
        taken |= studies
    return taken


def _reports_plans(store: ObjectStore, selection: Selection, plans: list[PartitionPlan]) -> list[PartitionPlan]:
    """A study's reports from the RIS (SR, PDF) leave the live layout with its last
    instance: one plan per report date (index partition ``<date>/RIS``)."""
    days = {pp.partition.study_date for pp in plans}
    near = [day for day in ledger_dates(store) if min(abs((day - d).days) for d in days) <= REPORT_DAYS]
    taken = _studies_taken_whole(store, selection, plans) if near else set()
    out = []
    for day in near if taken else []:
        ledger = ReportLedger(store, day).read()
        if ledger is None:
            continue
        rows = ledger[(ledger["state"] == "migrated") & ledger["study_instance_uid"].isin(sorted(taken))]
        objects = []
        for r in rows.to_dict("records"):
            for kind in ("sr", "pdf"):
                if isinstance(r.get(f"{kind}_key"), str) and (head := store.head(r[f"{kind}_key"])) is not None:
                    objects.append(MovedObject(r[f"{kind}_key"], str(r[f"{kind}_sha256"]), head.size, "report"))
        if objects:
            studies = sorted(set(rows["study_instance_uid"].astype(str)))
            out.append(
                PartitionPlan(
                    Partition(day, REPORTS_MODALITY),
                    False,
                    len(rows),
                    len(rows),
                    0,
                    0,
                    len(studies),
                    tuple(sorted({str(r) for r in rows["run_id"].dropna()})),
                    tuple(sorted(objects, key=lambda o: o.key)),
                    tuple(sorted({str(k) for k in rows["patient_key"].dropna()})),
                    tuple(studies),
                )
            )
    return out


def _partition_plan(partition: Partition, df: pd.DataFrame, mask: pd.Series) -> PartitionPlan:
    rows = df[mask]
    objects: dict[str, MovedObject] = {}
    for r in rows.to_dict("records"):
        if isinstance(r.get("other_source"), str):
            pass  # another source archive's copy stands for it: that archive's partition owns the object
        elif r["state"] == InstanceState.MIGRATED.value and isinstance(r.get("object_key"), str):
            objects[r["object_key"]] = MovedObject(
                r["object_key"], str(r["object_sha256"]), int(r["object_size"] or 0), "instance"
            )
        if isinstance(r.get("quarantine_key"), str):
            sha = r["quarantine_key"].rsplit("/", 1)[-1].removesuffix(".dcm")  # keyed by the bytes' hash
            objects.setdefault(
                r["quarantine_key"], MovedObject(r["quarantine_key"], sha, int(r["received_size"] or 0), "quarantine")
            )
    states = rows["state"].value_counts()
    studies = sorted({str(u) for u in rows["study_instance_uid"].dropna()})
    return PartitionPlan(
        partition,
        bool(mask.all()),
        len(rows),
        int(states.get(InstanceState.MIGRATED.value, 0)),
        int(states.get(InstanceState.QUARANTINED.value, 0)),
        int(states.get(InstanceState.UNRESOLVED.value, 0)),
        len(studies),
        tuple(sorted({str(r) for r in rows["run_id"].dropna()})),
        tuple(sorted(objects.values(), key=lambda o: o.key)),
        tuple(sorted({str(k) for k in rows["patient_key"].dropna()})),
        tuple(studies),
    )


@dataclass
class Journal:
    """``rolled-back/<id>/rollback.json``: the plan, each partition's step, the outcome."""

    store: ObjectStore
    rollback_id: str
    value: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return rolled_back_prefix(self.store.target.prefix, self.rollback_id) + RECORD

    def load(self) -> bool:
        data = self.store.get_or_none(self.key)
        self.value = json.loads(data) if data else {}
        return bool(data)

    def save(self) -> None:
        body = json.dumps(self.value, indent=2, sort_keys=True).encode()
        self.store.put(self.key, body, "application/json")

    def step(self, partition: Partition) -> str:
        return str(self.value["steps"].get(partition.key, "planned"))

    def advance(self, partition: Partition, step: str) -> None:
        self.value["steps"][partition.key] = step
        self.save()


def read_record(store: ObjectStore, rollback_id: str) -> dict[str, Any] | None:
    journal = Journal(store, rollback_id)
    return journal.value if journal.load() else None


def list_records(store: ObjectStore) -> list[dict[str, Any]]:
    """Every rollback's record (journal), oldest first."""
    base = f"{store.target.prefix}rolled-back/"
    keys = [k for k in store.list_keys(base) if k.count("/", len(base)) == 1 and k.endswith("/" + RECORD)]
    return sorted((json.loads(store.get(k)) for k in keys), key=lambda r: str(r.get("started_at", "")))


@dataclass(frozen=True)
class RollbackResult:
    record: dict[str, Any]  # the journal as completed
    resumed: bool  # it began in an earlier attempt
    moved: int  # objects moved by this attempt
    already_moved: int  # found moved by an earlier attempt


def execute(store: ObjectStore, plan: RollbackPlan, now: dt.datetime, moved_hook: Any = None) -> RollbackResult:
    """Carry out ``plan`` (or resume the rollback of the same id from its journal).

    The caller holds the selected dates' leases (no run may write them meanwhile).
    ``moved_hook``: called after each object moved (tests, progress).

    Raises
    ------
    RollbackRefused
        The id's journal holds another selection.
    RollbackLost
        An object is neither live nor under a copy that verifies.
    """
    journal = Journal(store, plan.rollback_id)
    resumed = journal.load()
    if resumed:
        if journal.value["plan"]["selection"] != plan.selection.to_json():
            raise RollbackRefused(f"rollback {plan.rollback_id} exists with another selection")
        plan = RollbackPlan.from_json(journal.value["plan"])  # resume what was planned, not what is live now
    else:
        journal.value = {
            "schema": SCHEMA,
            "rollback_id": plan.rollback_id,
            "state": "in_progress",
            "started_at": now.isoformat(),
            "plan": plan.to_json(),
            "steps": {},
            "note": "while in_progress, an object listed here that exists both live and under this folder "
            "is rolled back: the copy here is the one that counts",
        }
        journal.save()
    tally = {"moved": 0, "already": 0}
    if journal.value["state"] != "complete":
        for pp in plan.partitions:
            _roll_back_partition(store, journal, plan, pp, tally, moved_hook)
        journal.value.update(state="complete", finished_at=dt.datetime.now(dt.UTC).isoformat())
        journal.save()
    log.info("rollback %s: %d object(s) moved, %d moved before", plan.rollback_id, tally["moved"], tally["already"])
    return RollbackResult(journal.value, resumed, tally["moved"], tally["already"])


def _roll_back_partition(
    store: ObjectStore,
    journal: Journal,
    plan: RollbackPlan,
    pp: PartitionPlan,
    tally: dict[str, int],
    moved_hook: Any,
) -> None:
    manifests = PartitionManifests(store, pp.partition)
    rid = plan.rollback_id
    if pp.partition.modality == REPORTS_MODALITY:
        _roll_back_reports(store, journal, plan, pp, tally, moved_hook)
        return
    if journal.step(pp.partition) == "planned":
        _snapshot(manifests, rid)  # the manifests as the rollback found them, before anything changes
        journal.advance(pp.partition, "snapshot")
    if journal.step(pp.partition) == "snapshot":
        _move_all(manifests, rid, pp, tally, moved_hook)
        journal.advance(pp.partition, "moved")
    if journal.step(pp.partition) == "moved":
        _retire(manifests, plan, pp)
        journal.advance(pp.partition, "retired")
    if journal.step(pp.partition) == "retired":
        record = partition_record(manifests, plan, pp, journal.value["started_at"])
        manifests.write_rollback_record(record)
        journal.advance(pp.partition, "recorded")


def _move_all(
    manifests: PartitionManifests, rollback_id: str, pp: PartitionPlan, tally: dict[str, int], moved_hook: Any
) -> None:
    for obj in pp.objects:
        moved = move_object(manifests.store, obj, manifests.rolled_back_copy(rollback_id, obj.key))
        tally["moved" if moved else "already"] += 1
        if moved_hook:
            moved_hook(obj)


def _copy_verified(store: ObjectStore, key: str, copy_key: str) -> None:
    store.copy(key, copy_key)
    if store.sha256_of(copy_key) != store.sha256_of(key):
        raise RollbackLost(f"{key}: the copy at {copy_key} does not verify")


def _roll_back_reports(
    store: ObjectStore,
    journal: Journal,
    plan: RollbackPlan,
    pp: PartitionPlan,
    tally: dict[str, int],
    moved_hook: Any,
) -> None:
    """A report date's part: the ledger copied as found, the selected studies' SR/PDF
    moved (verified), their rows ``REPORT_NO_MATCHING_STUDY`` until a run migrates the
    study again and places them anew, a record beside the ledger."""
    ledger, rid = ReportLedger(store, pp.partition.study_date), plan.rollback_id
    manifests = PartitionManifests(store, pp.partition)
    copy = manifests.rolled_back_copy(rid, ledger.key("ledger.parquet"))
    if journal.step(pp.partition) == "planned":
        _copy_verified(store, ledger.key("ledger.parquet"), copy)
        journal.advance(pp.partition, "snapshot")
    if journal.step(pp.partition) == "snapshot":
        _move_all(manifests, rid, pp, tally, moved_hook)
        journal.advance(pp.partition, "moved")
    if journal.step(pp.partition) == "moved":
        found = pd.read_parquet(io.BytesIO(store.get(copy)))  # the same on a resume
        taken = found["study_instance_uid"].isin(pp.study_uids) & (found["state"] == "migrated")
        cleared = {
            c: None for c in found.columns if c.startswith(("sr_", "pdf_")) or c in ("supersedes", "superseded_by")
        }
        rows = [
            {**r, "state": "unmatched", "reason": "REPORT_NO_MATCHING_STUDY", **cleared} if t else r
            for r, t in zip(found.to_dict("records"), taken, strict=True)
        ]
        ledger.write_rolled_back(rows)
        journal.advance(pp.partition, "retired")
    if journal.step(pp.partition) == "retired":
        record = {
            "schema": SCHEMA,
            "rollback_id": rid,
            "rolled_back_at": journal.value["started_at"],
            "requested_by": plan.requested_by,
            "reason": plan.reason,
            **pp.figures(),
            "ledger_copy": copy,
        }
        store.put(ledger.key(f"rollbacks/{rid}.json"), json.dumps(record, indent=2).encode(), "application/json")
        journal.advance(pp.partition, "recorded")


def move_object(store: ObjectStore, obj: MovedObject, copy_key: str) -> bool:
    """Copy, verify the copy against the live bytes, then delete the live
    object. False when an earlier attempt had moved it (its copy verifies)."""
    live = store.sha256_of(obj.key)
    if live is None:
        copy = store.sha256_of(copy_key)
        if copy is None or copy[0] != obj.sha256:
            raise RollbackLost(f"{obj.key}: not live, and no verified copy at {copy_key}")
        return False
    if live[0] != obj.sha256:
        log.warning("rollback: a live object does not match its recorded checksum; its bytes are kept as found")
    store.copy(obj.key, copy_key)
    copy = store.sha256_of(copy_key)
    if copy != live:
        raise RollbackLost(f"{obj.key}: the copy at {copy_key} does not verify; the live object is kept")
    store.delete(obj.key)
    return True


def _snapshot(manifests: PartitionManifests, rollback_id: str) -> None:
    """Verified copies of the partition's manifests (census, transfer, verdict,
    lineage, GX artifacts); its rollback records stay where they are."""
    store = manifests.store
    for key in list(store.list_keys(manifests.prefix)):
        if key.startswith(manifests.key("rollbacks/")):
            continue
        _copy_verified(store, key, manifests.rolled_back_copy(rollback_id, key))


def _retire(manifests: PartitionManifests, plan: RollbackPlan, pp: PartitionPlan) -> None:
    """The partition is not migrated any more: the live manifest keeps only the
    rows not selected (computed from the snapshot: the same on a resume), the
    verdict says rolled back, the lineage becomes a tombstone naming this rollback."""
    store, rid = manifests.store, plan.rollback_id
    found = manifests.rolled_back_transfer(rid)
    if found is None:
        raise RollbackLost(f"partition {pp.partition.key}: the copy of its transfer manifest is missing")
    if pp.whole:
        if store.head(manifests.key(TRANSFER)) is not None:
            store.delete(manifests.key(TRANSFER))
    else:
        kept = found[~plan.selection.mask(pp.partition, found)]
        manifests.write_transfer(kept.reset_index(drop=True))
    manifests.write_json(
        VALIDATION,
        {
            "success": False,
            "run_id": None,
            "rolled_back": rid,
            "failed_expectations": [f"rolled back by {rid}: the partition is not migrated until a run validates it"],
        },
    )
    previous = manifests.lineage() or {}
    earlier = previous.get("rolled_back", []) if previous.get("schema") == TOMBSTONE else []
    earlier = [e for e in earlier if e.get("rollback_id") != rid]  # a resumed step writes its link once
    manifests.write_json(
        LINEAGE,
        {
            "schema": TOMBSTONE,
            "partition": pp.partition.key,
            "recorded_at": dt.datetime.now(dt.UTC).isoformat(),
            "rolled_back": [*earlier, _link(manifests, plan, pp)],
        },
    )


TOMBSTONE = "pacs-migration/lineage-rolled-back/1"


def _link(manifests: PartitionManifests, plan: RollbackPlan, pp: PartitionPlan) -> dict[str, Any]:
    """What a later lineage record names as superseded: the rollback, the runs
    and rule sets it undid, and where their lineage records now are."""
    copies = manifests.rolled_back_manifests(plan.rollback_id)
    rulesets = []
    for run_id in pp.run_ids:
        rec = manifests.read_key_json(manifests.rolled_back_copy(plan.rollback_id, manifests.lineage_run_key(run_id)))
        rs = (rec or {}).get("ruleset") or {}
        rulesets.append({"run_id": run_id, "ruleset": f"{rs.get('id')}@{rs.get('version')}" if rs else None})
    return {
        "rollback_id": plan.rollback_id,
        "record": manifests.rollback_record_key(plan.rollback_id),
        "runs": rulesets,
        "lineage": copies + LINEAGE,
        "whole": pp.whole,
        "objects": len(pp.objects),
        "digest": digest(pp.objects),
    }


def partition_record(
    manifests: PartitionManifests, plan: RollbackPlan, pp: PartitionPlan, started_at: str
) -> dict[str, Any]:
    """The rollback record beside the partition's lineage: who, why, when, what, the digest."""
    return {
        "schema": SCHEMA,
        "rollback_id": plan.rollback_id,
        "rolled_back_at": started_at,
        "requested_by": plan.requested_by,
        "reason": plan.reason,
        "selection": plan.selection.to_json(),
        **pp.figures(),
        "superseded": _link(manifests, plan, pp),
        "copies": rolled_back_prefix(manifests.store.target.prefix, plan.rollback_id),
        "manifests_copy": manifests.rolled_back_manifests(plan.rollback_id),
    }


def superseded(manifests: PartitionManifests) -> list[dict[str, Any]]:
    """What a new lineage record of the partition supersedes: the rollbacks
    since its last lineage (the tombstone's list), else nothing."""
    current = manifests.lineage() or {}
    return list(current.get("rolled_back", [])) if current.get("schema") == TOMBSTONE else []


def purge(
    store: ObjectStore, rollback_id: str, now: dt.datetime, retention_days: int, purged_by: str, reason: str
) -> dict[str, Any]:
    """Delete a rollback's copies of instances and quarantined originals once
    its retention has passed; the journal, the manifest copies (no pixel data)
    and the partition records stay: the chain of custody says what was purged,
    when, by whom and why.

    Raises
    ------
    PurgeRefused
        Unknown id, not complete, still within its retention, or no reason.
    """
    journal = Journal(store, rollback_id)
    if not journal.load():
        raise PurgeRefused(f"no rollback {rollback_id} in s3://{store.bucket}/{store.target.prefix}")
    v = journal.value
    if v.get("state") == "purged":
        return v
    if v.get("state") != "complete":
        raise PurgeRefused(f"rollback {rollback_id} is {v.get('state')}: finish it (run it again) before a purge")
    if not reason.strip() or not purged_by.strip():
        raise PurgeRefused("a purge needs a reason and who asks for it (both are recorded)")
    kept_until = dt.datetime.fromisoformat(v["finished_at"]) + dt.timedelta(days=retention_days)
    if now < kept_until:
        raise PurgeRefused(
            f"rollback {rollback_id} is kept until {kept_until.isoformat(timespec='seconds')} "
            f"(rollback.retention_days: {retention_days})"
        )
    plan = RollbackPlan.from_json(v["plan"])
    for pp in plan.partitions:
        manifests = PartitionManifests(store, pp.partition)
        for obj in pp.objects:
            store.delete(manifests.rolled_back_copy(rollback_id, obj.key))
    v.update(state="purged", purged_at=now.isoformat(), purged_by=purged_by.strip(), purge_reason=reason.strip())
    journal.save()
    return v
