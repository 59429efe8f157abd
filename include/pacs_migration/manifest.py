"""Manifests and object keys: the contract of DESIGN.md section 4.

Census manifest: one row per series. Transfer manifest: one row per SOP
instance (every instance of E, plus any that arrived unasked). Both are Parquet
under ``_manifests/date=.../modality=.../`` in the target bucket.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any

import pandas as pd

from .census import CensusSeries, ExpectedInstance, census_hash
from .partition import Partition
from .store import ObjectStore
from .uids import is_valid_uid

CENSUS = "census.parquet"
TRANSFER = "transfer.parquet"
VALIDATION = "validation.json"
LINEAGE = "lineage.json"
CENSUS_SUMMARY = "census.json"

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
    "membership",  # "census" (named by C-FIND) or "retrieval" (a capped/failed series' member, named by its C-GET)
    "findings",  # ';'-joined: reported, not changed (INCONSISTENT_PATIENT under the flag policy, charset:...)
    # The archive whose copy of this SOP instance is live (already_present from it, or UID_CONFLICT with
    # it), when not this partition's source: a study held by two legacy archives.
    "other_source",
)

FIRST_SOURCE = "default"  # how reports name the unnamed first source (config.source)


def source_label(name: str) -> str:
    """A source as reports and manifests name it."""
    return name or FIRST_SOURCE


def instance_key(prefix: str, study_uid: str, series_uid: str, sop_uid: str) -> str:
    """``studies/<StudyUID>/series/<SeriesUID>/instances/<SOPUID>.dcm``, from validated UIDs only."""
    for name, uid in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid), ("SOPInstanceUID", sop_uid)):
        if not is_valid_uid(uid):
            raise ValueError(f"{name} is not a valid UID; it cannot be used in a key")
    return f"{series_prefix(prefix, study_uid, series_uid)}{sop_uid}.dcm"


def _parquet(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


class StaleCensus(RuntimeError):
    """The census manifest is not the census this run took (lost or stale write)."""


PARQUET = "application/vnd.apache.parquet"


class StaleManifest(RuntimeError):
    """The transfer manifest was written by another run (e.g. a killed run's late PUT)."""


def writer_tag(run_id: str) -> str:
    """A run's tag in object metadata (no run id, which may name a person, in S3 metadata)."""
    return hashlib.sha256(run_id.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CensusSummary:
    """``census.json``: the expected set's hash, its size and the census's warnings (codes only)."""

    census_sha256: str
    series: int
    instances: int
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "census_sha256": self.census_sha256,
            "series": self.series,
            "instances": self.instances,
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> CensusSummary:
        return cls(
            str(value.get("census_sha256", "")),
            int(value.get("series", 0)),
            int(value.get("instances", 0)),
            tuple(value.get("warnings", ())),
        )


_CENSUS_COLUMNS = [
    "study_instance_uid",
    "series_instance_uid",
    "modality",
    "study_date",
    "reported_instances",
    "expected_instances",
    "sop_instance_uids",
    "sop_class_uids",
    "census_gap",
]


class PartitionManifests:
    """The one owner of a partition's keys and manifests: every object key of
    the partition (instances, quarantine, manifests, GX artifacts) is built
    here, and every manifest is read and written here.

    "This run's verdict" is :meth:`verdict`: a validation counts only for the
    run that reached it.
    """

    def __init__(self, store: ObjectStore, partition: Partition) -> None:
        self.store = store
        self.partition = partition
        self._transfer_read = False  # transfer_or_none() ran: write_transfer() is conditional on ...
        self._transfer_etag: str | None = None  # ... this version (None: on there being none)

    # --- keys
    @property
    def prefix(self) -> str:
        return f"{self.store.target.prefix}_manifests/{self.partition.hive_path}/"

    def key(self, name: str) -> str:
        return self.prefix + name

    @property
    def quarantine_prefix(self) -> str:
        return f"{self.store.target.prefix}quarantine/{self.partition.hive_path}/"

    def quarantine_key(self, sha256_hex: str) -> str:
        """Quarantined bytes are keyed by their hash: their UIDs are not trusted."""
        return f"{self.quarantine_prefix}{sha256_hex}.dcm"

    def instance_key(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        return instance_key(self.store.target.prefix, study_uid, series_uid, sop_uid)

    def series_prefix(self, study_uid: str, series_uid: str) -> str:
        return series_prefix(self.store.target.prefix, study_uid, series_uid)

    @property
    def gx_prefix(self) -> str:
        return self.key("gx/")

    @property
    def objects_dataset(self) -> str:
        """The migrated objects as one dataset (OpenLineage's name for them)."""
        return f"{self.store.target.prefix}{STUDIES}"

    @property
    def manifests_dataset(self) -> str:
        return self.prefix.rstrip("/")

    def lineage_run_key(self, run_id: str) -> str:
        return self.key(f"lineage/{hashlib.sha256(run_id.encode()).hexdigest()[:16]}.json")

    # --- rollbacks (rollback.py): the record beside the lineage, and where the copies go
    def rollback_record_key(self, rollback_id: str) -> str:
        return self.key(f"{ROLLBACKS}{rollback_id}.json")

    def write_rollback_record(self, record: dict[str, Any]) -> str:
        key = self.rollback_record_key(str(record["rollback_id"]))
        self.store.put(key, _json(record), "application/json")
        return key

    def read_key_json(self, key: str) -> Any | None:
        """A JSON object of this target by its full key (a run's lineage, a rolled-back copy)."""
        data = self.store.get_or_none(key)
        return None if data is None else json.loads(data)

    def rolled_back_copy(self, rollback_id: str, live_key: str) -> str:
        """Where a rollback keeps its verified copy of a live object (or manifest)."""
        prefix = self.store.target.prefix
        if not live_key.startswith(prefix):
            raise ValueError("not a key of this target")
        return f"{rolled_back_prefix(prefix, rollback_id)}{live_key[len(prefix) :]}"

    def rolled_back_manifests(self, rollback_id: str) -> str:
        """The prefix of the copies of this partition's manifests, as the rollback found them."""
        return self.rolled_back_copy(rollback_id, self.prefix)

    def rollback_records(self) -> list[dict[str, Any]]:
        """This partition's rollback records, oldest first."""
        found = [json.loads(self.store.get(k)) for k in self.store.list_keys(self.key(ROLLBACKS))]
        return sorted(found, key=lambda r: str(r.get("rolled_back_at", "")))

    def rolled_back_transfer(self, rollback_id: str) -> pd.DataFrame | None:
        """The transfer manifest as a rollback found it (its copy)."""
        data = self.store.get_or_none(self.rolled_back_manifests(rollback_id) + TRANSFER)
        return None if data is None else pd.read_parquet(io.BytesIO(data))

    # --- census
    def write_census(self, series: list[CensusSeries], warnings: list[str]) -> CensusSummary:
        """Write the expected set and its summary, then read both back: a
        census write that was lost or garbled fails here, not later."""
        summary = CensusSummary(
            census_hash(series), len(series), sum(len(s.instances) for s in series), tuple(warnings)
        )
        self._put_parquet(CENSUS, _census_frame(series))
        self.write_json(CENSUS_SUMMARY, summary.to_json())
        if self.summary() != summary:
            raise StaleCensus(f"partition {self.partition.key}: the census summary did not read back as written")
        self.census(summary.census_sha256)
        return summary

    def census(self, expected_sha256: str | None = None) -> list[CensusSeries]:
        """The expected set; with ``expected_sha256`` (this run's census hash,
        carried through XCom) a manifest from another census is refused."""
        data = self.store.get_or_none(self.key(CENSUS))
        if data is None:
            raise StaleCensus(f"partition {self.partition.key}: no census manifest")
        series = _census_series(pd.read_parquet(io.BytesIO(data)))
        if expected_sha256 is not None and census_hash(series) != expected_sha256:
            raise StaleCensus(
                f"partition {self.partition.key}: the census manifest is not this run's census "
                f"(hash {census_hash(series)[:12]}, expected {expected_sha256[:12]})"
            )
        return series

    def summary(self) -> CensusSummary | None:
        value = self.read_json(CENSUS_SUMMARY)
        return None if value is None else CensusSummary.from_json(value)

    # --- transfer
    def write_transfer(self, df: pd.DataFrame, run_id: str | None = None) -> str:
        """The transfer manifest, tagged with the run that wrote it. After
        :meth:`transfer_or_none` on this object, written only over the version
        read then: a write that came in between (a killed run's PUT landing
        late) is never replaced unseen, and a late PUT of ours cannot land over
        a newer manifest (:class:`StaleManifest`; the task's retry starts over)."""
        key = self.key(TRANSFER)
        meta = {"writer": writer_tag(run_id)} if run_id else {}
        if self._transfer_read:
            if not self.store.put_if_unchanged(key, _parquet(df), PARQUET, self._transfer_etag, meta):
                raise StaleManifest(f"partition {self.partition.key}: the transfer manifest changed during this run")
        else:
            self.store.put(key, _parquet(df), PARQUET, meta or None)
        return key

    def transfer(self, run_id: str | None = None) -> pd.DataFrame:
        """The transfer manifest; with ``run_id``, only if that run wrote it
        (a killed run's PUT landing late must not be validated as this run's)."""
        if run_id is not None:
            stored = self.store.head(self.key(TRANSFER))
            if stored is not None and (stored.metadata or {}).get("writer") != writer_tag(run_id):
                raise StaleManifest(f"partition {self.partition.key}: the transfer manifest was written by another run")
        df = self.transfer_or_none()
        if df is None:
            raise FileNotFoundError(f"partition {self.partition.key}: no transfer manifest")
        return df

    def transfer_or_none(self) -> pd.DataFrame | None:
        data, self._transfer_etag = self.store.get_versioned(self.key(TRANSFER))
        self._transfer_read = True
        if data is None:
            return None
        df = pd.read_parquet(io.BytesIO(data))
        # A manifest written before a column existed reads with it empty.
        return df.reindex(columns=[*TRANSFER_COLUMNS, *(c for c in df.columns if c not in TRANSFER_COLUMNS)])

    # --- verdict and lineage
    def write_verdict(self, verdict: dict[str, Any], run_id: str) -> str:
        return self.write_json(VALIDATION, {**verdict, "run_id": run_id})

    def latest_verdict(self) -> dict[str, Any] | None:
        """The last validation, whichever run reached it."""
        return self.read_json(VALIDATION)

    def verdict(self, run_id: str) -> dict[str, Any] | None:
        """This run's validation, or None: a previous run's verdict is not this run's."""
        value = self.read_json(VALIDATION)
        return value if value is not None and value.get("run_id") == run_id else None

    def passed(self, run_id: str) -> bool:
        v = self.verdict(run_id)
        return bool(v and v.get("success"))

    def write_lineage(self, record: dict[str, Any], run_id: str) -> str:
        self.store.put(self.lineage_run_key(run_id), _json(record), "application/json")
        return self.write_json(LINEAGE, record)

    def lineage(self) -> dict[str, Any] | None:
        return self.read_json(LINEAGE)

    # --- plumbing
    def write_json(self, name: str, value: Any) -> str:
        key = self.key(name)
        self.store.put(key, _json(value), "application/json")
        return key

    def read_json(self, name: str) -> Any | None:
        data = self.store.get_or_none(self.key(name))
        return None if data is None else json.loads(data)

    def _put_parquet(self, name: str, df: pd.DataFrame) -> str:
        key = self.key(name)
        self.store.put(key, _parquet(df), "application/vnd.apache.parquet")
        return key


STUDIES = "studies"  # the migrated objects' top folder
ROLLBACKS = "rollbacks/"  # per-partition rollback records, beside the lineage
ROLLED_BACK = "rolled-back/"  # verified copies of what rollbacks took out of the live layout


def rolled_back_prefix(prefix: str, rollback_id: str) -> str:
    return f"{prefix}{ROLLED_BACK}{rollback_id}/"


def series_prefix(prefix: str, study_uid: str, series_uid: str) -> str:
    return f"{prefix}{STUDIES}/{study_uid}/series/{series_uid}/instances/"


def _json(value: Any) -> bytes:
    return json.dumps(value, indent=2, sort_keys=True, default=str).encode()


def _census_frame(series: list[CensusSeries]) -> pd.DataFrame:
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
            "census_gap": s.census_gap,
        }
        for s in series
    ]
    return pd.DataFrame(rows, columns=_CENSUS_COLUMNS)


def _census_series(df: pd.DataFrame) -> list[CensusSeries]:
    out = []
    for row in df.to_dict("records"):
        reported = row["reported_instances"]
        gap = row.get("census_gap")
        out.append(
            CensusSeries(
                study_instance_uid=row["study_instance_uid"],
                series_instance_uid=row["series_instance_uid"],
                modality=row["modality"],
                study_date=dt.date.fromisoformat(row["study_date"]),
                reported_instances=None if pd.isna(reported) else int(reported),
                instances=tuple(
                    ExpectedInstance(str(u), str(c))
                    for u, c in zip(row["sop_instance_uids"], row["sop_class_uids"], strict=True)
                ),
                census_gap=gap if isinstance(gap, str) and gap else None,
            )
        )
    return out


def transfer_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(TRANSFER_COLUMNS))
    df["in_census"] = df["in_census"].astype(bool)
    for col in ("received_size", "object_size"):
        df[col] = df[col].astype("Int64")
    return df


# Short forms for callers holding a store and a partition (tests, tools).
def write_census(store: ObjectStore, partition: Partition, series: list[CensusSeries]) -> CensusSummary:
    return PartitionManifests(store, partition).write_census(series, [])


def read_census(store: ObjectStore, partition: Partition) -> list[CensusSeries]:
    return PartitionManifests(store, partition).census()


def read_transfer(store: ObjectStore, partition: Partition) -> pd.DataFrame:
    return PartitionManifests(store, partition).transfer()


def transferred_partitions(
    store: ObjectStore, study_date: dt.date | None = None, rolled_back: bool = False
) -> list[Partition]:
    """Partitions with a transfer manifest (of one study date, if given);
    ``rolled_back``: also those with a rollback record (a partition rolled back
    whole has no live transfer manifest)."""
    root = f"{store.target.prefix}_manifests/"
    day = f"date={study_date.isoformat()}/" if study_date else ""
    bases = [root + day] + ([f"{p}{day}" for p in store.list_prefixes(root + "source=")] if day else [])
    found = set()
    for key in (k for base in bases for k in store.list_keys(base)):
        if key.endswith("/" + TRANSFER) or (rolled_back and f"/{ROLLBACKS}" in key):
            p = Partition.from_hive(key[len(root) :].rsplit("/", 1)[0])
            if p is not None:
                found.add(p)
    return sorted(found)
