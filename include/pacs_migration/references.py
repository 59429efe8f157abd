"""Reference integrity of non-image objects: presentation states (GSPS and
its kin), Key Object Selection documents and structured reports name the
instances they apply to. Every SOP Instance UID they reference must be
migrated, in their partition or another; a dangling reference fails the
referencing object's partition, naming it, unless the referenced instance
was quarantined, in which case the two are listed together in the report.

It runs once a study date's partitions are all transferred (a GSPS in
``…/PR`` points at images in ``…/CT``), and adds its suite to each referencing
partition's verdict for the run.
"""

from __future__ import annotations

import datetime as dt
import logging
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from pydicom.dataset import Dataset

from .manifest import PartitionManifests, transferred_partitions
from .partition import Partition
from .store import ObjectStore
from .study_index import indexed_partitions, read_header, read_partition
from .validate import gx, run_suites

log = logging.getLogger(__name__)

# SOP classes whose instances reference others: presentation states, SR (KOS included).
REFERENCING_CLASS_PREFIXES = ("1.2.840.10008.5.1.4.1.1.11.", "1.2.840.10008.5.1.4.1.1.88.")
# Sequences whose ReferencedSOPInstanceUID is not a composite instance of an archive.
NOT_INSTANCES = frozenset(
    {
        "ReferencedPerformedProcedureStepSequence",
        "ReferencedStudySequence",
        "ReferencedPatientSequence",
        "ReferencedVisitSequence",
        "ReferencedRequestSequence",
    }
)
RESOLVED = ("migrated", "quarantined")
COLUMNS = ["referencing_sop", "referencing_class", "referencing_partition", "referenced_sop", "state", "reason"]


@dataclass(frozen=True)
class ReferenceCheck:
    """One partition's references: every (referencing, referenced) pair and its state."""

    partition: Partition
    rows: pd.DataFrame

    @property
    def dangling(self) -> list[dict[str, Any]]:
        return self.rows[~self.rows["state"].isin(RESOLVED)].to_dict("records")

    @property
    def to_quarantined(self) -> list[dict[str, Any]]:
        return self.rows[self.rows["state"] == "quarantined"].to_dict("records")


def is_referencing(sop_class_uid: str | None) -> bool:
    return bool(sop_class_uid) and str(sop_class_uid).startswith(REFERENCING_CLASS_PREFIXES)


def referenced_uids(ds: Dataset) -> set[str]:
    """Every Referenced SOP Instance UID in the object (at any depth), but its own
    and those of sequences that do not name archived instances."""
    found: set[str] = set()

    def walk(d: Dataset) -> None:
        for elem in d:
            if elem.VR == "SQ":
                if elem.keyword in NOT_INSTANCES:
                    continue
                for item in elem.value:
                    walk(item)
            elif elem.keyword == "ReferencedSOPInstanceUID" and elem.value:
                found.add(str(elem.value))

    walk(ds)
    found.discard(str(ds.get("SOPInstanceUID", "")))
    return found


def _states(store: ObjectStore, partitions: Iterable[Partition]) -> dict[str, tuple[str, str | None, str]]:
    """SOP Instance UID -> (state, reason, partition) from these partitions' live transfer manifests."""
    out: dict[str, tuple[str, str | None, str]] = {}
    for p in partitions:
        df = PartitionManifests(store, p).transfer_or_none()
        if df is None:
            continue
        for uid, state, why in zip(df["sop_instance_uid"], df["state"], df["reason"], strict=True):
            if uid is None or (isinstance(uid, float) and pd.isna(uid)):
                continue
            if out.get(str(uid), ("",))[0] != "migrated":  # a migrated copy wins over a quarantined duplicate
                out[str(uid)] = (str(state), None if why is None or pd.isna(why) else str(why), p.key)
    return out


def _in_index(store: ObjectStore, uids: set[str], skip: set[Partition]) -> set[str]:
    """Which of ``uids`` the study index holds outside ``skip`` (references to other dates' studies)."""
    found: set[str] = set()
    for p in indexed_partitions(store):
        if not uids - found:
            break
        if p in skip:
            continue
        df = read_partition(store, p)
        if df is not None and len(df):
            found |= uids & set(df["SOPInstanceUID"].astype(str))
    return found


def check_date(store: ObjectStore, study_date: dt.date, partitions: list[Partition]) -> list[ReferenceCheck]:
    """The references of the referencing objects in ``partitions`` (of one study date)."""
    same_day = transferred_partitions(store, study_date)
    states = _states(store, same_day)
    pending: list[tuple[Partition, dict[str, Any], set[str]]] = []
    for p in partitions:
        df = PartitionManifests(store, p).transfer_or_none()
        if df is None:
            continue
        rows = df[(df["state"] == "migrated") & df["sop_class_uid"].map(is_referencing)].to_dict("records")

        def refs(row: dict[str, Any]) -> set[str]:
            return referenced_uids(read_header(store, str(row["object_key"]))[0])

        with ThreadPoolExecutor(8, thread_name_prefix="references") as pool:
            pending += [(p, r, u) for r, u in zip(rows, pool.map(refs, rows), strict=True)]
    unknown = {u for _, _, uids in pending for u in uids if u not in states}
    elsewhere = _in_index(store, unknown, set(same_day)) if unknown else set()
    by_partition: dict[Partition, list[dict[str, Any]]] = {p: [] for p in partitions}
    for p, row, uids in pending:
        for uid in sorted(uids):
            state, why, _ = states.get(uid, ("migrated" if uid in elsewhere else "missing", None, ""))
            by_partition[p].append(
                {
                    "referencing_sop": str(row["sop_instance_uid"]),
                    "referencing_class": str(row["sop_class_uid"]),
                    "referencing_partition": p.key,
                    "referenced_sop": uid,
                    "state": state,
                    "reason": why,
                }
            )
    return [ReferenceCheck(p, pd.DataFrame(rows, columns=COLUMNS)) for p, rows in by_partition.items()]


def suite_outcomes(check: ReferenceCheck) -> list[dict[str, Any]]:
    """The ``references`` suite (GX) over one partition's pairs, as verdict outcomes."""
    E = gx().expectations
    suites = {"references": [E.ExpectColumnValuesToBeInSet(column="state", value_set=list(RESOLVED))]}
    with tempfile.TemporaryDirectory(prefix="gx-references-") as tmp:
        outcomes = run_suites(
            Path(tmp), {"references": check.rows}, suites, f"{check.partition.key.replace('/', '.')}.references"
        )
    return [o.to_json() | {"label": o.label} for o in outcomes]


def amend_verdict(store: ObjectStore, check: ReferenceCheck, run_id: str) -> dict[str, Any] | None:
    """Add the references suite to the partition's verdict of this run (and to
    its lineage record): a dangling reference fails it, naming the
    referencing object and what it points at. None: no verdict of this run to amend."""
    manifests = PartitionManifests(store, check.partition)
    verdict = manifests.verdict(run_id)
    if verdict is None or not len(check.rows):
        return verdict  # nothing of this run to amend, or no object here references another
    outcomes = suite_outcomes(check)
    failed = [o["label"] for o in outcomes if not o["success"]]
    dangling = [f"{r['referencing_sop']} -> {r['referenced_sop']} ({r['state']})" for r in check.dangling]
    kept = [e for e in verdict.get("expectations", []) if e.get("batch") != "references"]
    verdict = {
        **verdict,
        "success": bool(verdict.get("success")) and not failed,
        "failed_expectations": [
            *[f for f in verdict.get("failed_expectations", []) if not f.startswith("references:")],
            *failed,
        ],
        "expectations": kept + [{k: v for k, v in o.items() if k != "label"} for o in outcomes],
        "references": {
            "checked": len(check.rows),
            "dangling": dangling,
            "to_quarantined": [
                f"{r['referencing_sop']} -> {r['referenced_sop']} ({r['reason']})" for r in check.to_quarantined
            ],
        },
    }
    manifests.write_verdict({k: v for k, v in verdict.items() if k != "run_id"}, run_id)
    lineage = manifests.lineage()
    if lineage is not None and lineage.get("run_id") == run_id and "validation" in lineage:
        lineage["validation"] = {
            **lineage["validation"],
            "success": verdict["success"],
            "failed_expectations": verdict["failed_expectations"],
        }
        manifests.write_lineage(lineage, run_id)
    if dangling:
        log.warning("partition %s: %d dangling reference(s)", check.partition.key, len(dangling))
    return verdict
