"""The archive's coverage index: one row per partition (its state and
figures; no patient data, no UIDs) in ``_index/partitions.parquet``.

Each lineage step and each rollback updates its partitions' rows (read,
merge, write only over the version read; a concurrent update is retried), so
the dashboard answers from one object however large the archive. The index
is derived data: :func:`rebuild` makes it again from the manifests.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import random
import time
from enum import Enum
from typing import Any

import pandas as pd

from .counts import counts_from_frame
from .manifest import PartitionManifests, transferred_partitions
from .partition import Partition
from .store import ObjectStore

INDEX_KEY = "_index/partitions.parquet"
COLUMNS = (
    "study_date",  # YYYY-MM-DD
    "modality",
    "state",  # CellState
    "expected",
    "migrated",
    "quarantined",
    "unresolved",
    "bytes",
    "reasons",  # JSON: reason code -> instances
    "failed_expectations",  # ';'-joined labels
    "run_id",
    "ruleset",
    "rollback_id",
    "updated_at",
    "source",  # the legacy archive ("": the first, unnamed one)
)


class CellState(str, Enum):
    """A partition's state on the dashboard's heat map."""

    PENDING = "pending"  # planned or censused, not validated yet
    MIGRATED = "migrated"  # validated, nothing quarantined
    PARTLY_QUARANTINED = "partly_quarantined"  # validated, some instances quarantined
    FAILED = "failed"  # its last validation failed
    ROLLED_BACK = "rolled_back"  # a rollback took it out; not migrated until a run validates it


class IndexContention(RuntimeError):
    """The index kept changing under this update (every attempt lost the race)."""


def summarize(manifests: PartitionManifests, transfer: pd.DataFrame | None = None) -> dict[str, Any]:
    """The partition's row, from its transfer manifest (``transfer``: already read), verdict and lineage."""
    p = manifests.partition
    verdict = manifests.latest_verdict() or {}
    df = transfer if transfer is not None else manifests.transfer_or_none()
    counts = counts_from_frame(df) if df is not None and len(df) else None
    if verdict.get("rolled_back"):
        state = CellState.ROLLED_BACK
    elif verdict.get("success"):
        state = CellState.PARTLY_QUARANTINED if counts and counts.quarantined else CellState.MIGRATED
    else:
        state = CellState.FAILED if verdict else CellState.PENDING
    lineage = manifests.read_key_json(manifests.lineage_run_key(str(verdict.get("run_id")))) or {}
    rs = lineage.get("ruleset") or {}
    migrated = df[df["state"] == "migrated"] if df is not None else None
    return {
        "study_date": p.study_date.isoformat(),
        "modality": p.modality,
        "state": state.value,
        "expected": counts.expected if counts else 0,
        "migrated": counts.migrated if counts else 0,
        "quarantined": counts.quarantined if counts else 0,
        "unresolved": counts.unresolved if counts else 0,
        "bytes": int(migrated["object_size"].fillna(0).sum()) if migrated is not None else 0,
        "reasons": json.dumps(counts.reasons if counts else {}, sort_keys=True),
        "failed_expectations": ";".join(str(x) for x in verdict.get("failed_expectations", []) or []),
        "run_id": verdict.get("run_id") or "",
        "ruleset": f"{rs.get('id')}@{rs.get('version')}" if rs else "",
        "rollback_id": verdict.get("rolled_back") or "",
        "updated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "source": p.source,
    }


def frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    for col in ("expected", "migrated", "quarantined", "unresolved", "bytes"):
        df[col] = df[col].astype("int64")
    return df


def read(store: ObjectStore) -> pd.DataFrame:
    """The index (empty when none was written yet; written before sources existed: the first source's)."""
    data = store.get_or_none(store.target.key(INDEX_KEY))
    return frame([]) if data is None else _with_source(pd.read_parquet(io.BytesIO(data)))


def _with_source(df: pd.DataFrame) -> pd.DataFrame:
    if "source" not in df:
        df["source"] = ""
    df["source"] = df["source"].fillna("")
    return df


def _bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.sort_values(["study_date", "modality", "source"]).to_parquet(buf, index=False)
    return buf.getvalue()


def update(
    store: ObjectStore,
    partitions: list[Partition],
    attempts: int = 8,
    transfers: dict[Partition, pd.DataFrame] | None = None,
) -> pd.DataFrame:
    """Replace these partitions' rows with what their manifests say now
    (``transfers``: their transfer manifests, when the caller has just read them)."""
    rows = [summarize(PartitionManifests(store, p), (transfers or {}).get(p)) for p in partitions]
    key = store.target.key(INDEX_KEY)
    for attempt in range(attempts):
        data, etag = store.get_versioned(key)
        current = frame([]) if data is None else _with_source(pd.read_parquet(io.BytesIO(data)))
        mine = {(r["source"], r["study_date"], r["modality"]) for r in rows}
        ids = zip(current["source"], current["study_date"], current["modality"], strict=True)
        kept = current[[i not in mine for i in ids]]
        merged = pd.concat([kept, frame(rows)], ignore_index=True) if len(kept) else frame(rows)
        if store.put_if_unchanged(key, _bytes(merged), "application/vnd.apache.parquet", etag, {}):
            return merged
        time.sleep(random.uniform(0.05, 0.2) * (attempt + 1))  # another partition's update won: read again
    raise IndexContention(f"{key}: still changing after {attempts} attempts")


def rebuild(store: ObjectStore) -> int:
    """The index made again from every partition's manifests (live or rolled back)."""
    rows = [summarize(PartitionManifests(store, p)) for p in transferred_partitions(store, rolled_back=True)]
    store.put(store.target.key(INDEX_KEY), _bytes(frame(rows)), "application/vnd.apache.parquet")
    return len(rows)
