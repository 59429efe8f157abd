"""Manifests and object keys: the contract of DESIGN.md section 4.

Census manifest: one row per series. Transfer manifest: one row per SOP
instance (every instance of E, plus any that arrived unasked). Both are Parquet
under ``_manifests/date=.../modality=.../`` in the target bucket.
"""

from __future__ import annotations

import datetime as dt
import io
import json
from typing import Any

import pandas as pd

from .census import CensusSeries, ExpectedInstance
from .partition import Partition
from .store import ObjectStore
from .uids import is_valid_uid

CENSUS = "census.parquet"
TRANSFER = "transfer.parquet"
VALIDATION = "validation.json"
LINEAGE = "lineage.json"

TRANSFER_COLUMNS: tuple[str, ...] = (
    "study_instance_uid",
    "series_instance_uid",
    "sop_instance_uid",
    "sop_class_uid",
    "in_census",
    "state",
    "reason",
    "received_sha256",
    "received_size",
    "transfer_syntax_in",
    "transfer_syntax_out",
    "study_date",
    "modality",
    "patient_key",
    "object_key",
    "object_sha256",
    "object_size",
    "load_action",
    "quarantine_key",
    "pixel_sha256_before",
    "pixel_sha256_after",
    "changes",
    "rules_applied",
    "run_id",
)


def instance_key(prefix: str, study_uid: str, series_uid: str, sop_uid: str) -> str:
    """``studies/<StudyUID>/series/<SeriesUID>/instances/<SOPUID>.dcm``, from validated UIDs only."""
    for name, uid in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid), ("SOPInstanceUID", sop_uid)):
        if not is_valid_uid(uid):
            raise ValueError(f"{name} is not a valid UID; it cannot be used in a key")
    return f"{prefix}studies/{study_uid}/series/{series_uid}/instances/{sop_uid}.dcm"


def quarantine_key(prefix: str, partition: Partition, sha256_hex: str) -> str:
    """Quarantined bytes are keyed by their hash: their UIDs are not trusted."""
    return f"{prefix}quarantine/{partition.hive_path}/{sha256_hex}.dcm"


def manifest_prefix(prefix: str, partition: Partition) -> str:
    return f"{prefix}_manifests/{partition.hive_path}/"


def _parquet(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def write_census(store: ObjectStore, partition: Partition, series: list[CensusSeries]) -> str:
    rows = [
        {
            "study_instance_uid": s.study_instance_uid,
            "series_instance_uid": s.series_instance_uid,
            "modality": s.modality,
            "study_date": s.study_date.isoformat(),
            "reported_instances": s.reported_instances,
            "expected_instances": len(s.instances),
            "sop_instance_uids": [i.sop_instance_uid for i in s.instances],
            "sop_class_uids": [i.sop_class_uid for i in s.instances],
        }
        for s in series
    ]
    df = pd.DataFrame(
        rows,
        columns=[
            "study_instance_uid",
            "series_instance_uid",
            "modality",
            "study_date",
            "reported_instances",
            "expected_instances",
            "sop_instance_uids",
            "sop_class_uids",
        ],
    )
    key = manifest_prefix(store.target.prefix, partition) + CENSUS
    store.put(key, _parquet(df), "application/vnd.apache.parquet")
    return key


def read_census(store: ObjectStore, partition: Partition) -> list[CensusSeries]:
    data = store.get(manifest_prefix(store.target.prefix, partition) + CENSUS)
    df = pd.read_parquet(io.BytesIO(data))
    out = []
    for row in df.itertuples(index=False):
        reported = None if pd.isna(row.reported_instances) else int(row.reported_instances)
        out.append(
            CensusSeries(
                study_instance_uid=row.study_instance_uid,
                series_instance_uid=row.series_instance_uid,
                modality=row.modality,
                study_date=dt.date.fromisoformat(row.study_date),
                reported_instances=reported,
                instances=tuple(
                    ExpectedInstance(str(u), str(c)) for u, c in zip(row.sop_instance_uids, row.sop_class_uids)
                ),
            )
        )
    return out


def transfer_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(TRANSFER_COLUMNS))
    df["in_census"] = df["in_census"].astype(bool)
    for col in ("received_size", "object_size"):
        df[col] = df[col].astype("Int64")
    return df


def write_transfer(store: ObjectStore, partition: Partition, df: pd.DataFrame) -> str:
    key = manifest_prefix(store.target.prefix, partition) + TRANSFER
    store.put(key, _parquet(df), "application/vnd.apache.parquet")
    return key


def read_transfer(store: ObjectStore, partition: Partition) -> pd.DataFrame:
    data = store.get(manifest_prefix(store.target.prefix, partition) + TRANSFER)
    return pd.read_parquet(io.BytesIO(data))


def write_json(store: ObjectStore, partition: Partition, name: str, value: Any) -> str:
    key = manifest_prefix(store.target.prefix, partition) + name
    store.put(key, json.dumps(value, indent=2, sort_keys=True, default=str).encode(), "application/json")
    return key


def read_json(store: ObjectStore, partition: Partition, name: str) -> Any | None:
    data = store.get_or_none(manifest_prefix(store.target.prefix, partition) + name)
    return None if data is None else json.loads(data)
