"""The data path of one partition: retrieve -> normalize -> load.

DICOM bytes stay on the worker that runs this: they go from the association
into staging, through normalize, into S3, and staging is removed afterwards.
Only counts leave (for XCom); the per-instance record is the transfer manifest.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .census import CensusSeries
from .dimse import ReceivedInstance, StagingSink
from .manifest import instance_key, quarantine_key, transfer_frame, write_transfer
from .normalize import normalize
from .partition import Partition
from .reasons import InstanceState, ReasonCode, reason
from .retrieve import GetFn, retrieve_partition
from .rules import STRUCTURAL, RuleSet
from .store import ObjectStore, PutOutcome

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PartitionCounts:
    expected: int
    migrated: int
    quarantined: int
    unresolved: int
    unsolicited: int
    written: int  # objects created by this run (0 on an idempotent re-run)
    reasons: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return {
            "expected": self.expected,
            "migrated": self.migrated,
            "quarantined": self.quarantined,
            "unresolved": self.unresolved,
            "unsolicited": self.unsolicited,
            "written": self.written,
            "reasons": dict(self.reasons),
        }


CARRIED = "carried"  # load_action of a row kept from an earlier run's manifest


@dataclass
class StageTimes:
    """Where a partition's time went: wall seconds of the retrieve phase, and
    seconds summed over worker threads for normalize and upload (benchmarks)."""

    retrieve_s: float = 0.0
    process_s: float = 0.0
    normalize_s: float = 0.0
    upload_s: float = 0.0
    bytes_received: int = 0
    bytes_stored: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, seconds: float, nbytes: int = 0) -> None:
        with self._lock:
            setattr(self, f"{name}_s", getattr(self, f"{name}_s") + seconds)
            if name == "upload":
                self.bytes_stored += nbytes


def plan_resume(series: list[CensusSeries], previous: Any) -> tuple[list[CensusSeries], Any]:
    """Split a partition's census against its previous transfer manifest:
    (series to retrieve, rows to carry). A series is retrieved again when any
    of its instances has no migrated or quarantined row (new at the source,
    or unresolved before); the rows of every other series are carried, so a
    delta run moves only what is new and rewrites nothing."""
    if previous is None or not len(previous):
        return series, None
    settled = previous[previous["in_census"] & previous["state"].isin(
        [InstanceState.MIGRATED.value, InstanceState.QUARANTINED.value])]
    done = set(settled["sop_instance_uid"])
    fetch = [s for s in series if any(i.sop_instance_uid not in done for i in s.instances)]
    fetch_uids = {s.series_instance_uid for s in fetch}
    wanted = {i.sop_instance_uid for s in series if s.series_instance_uid not in fetch_uids for i in s.instances}
    carried = settled[settled["sop_instance_uid"].isin(wanted)]
    return fetch, carried


def counts_from_frame(df: Any) -> PartitionCounts:
    """Figures of a transfer manifest; the report and validation use the same."""
    census = df[df["in_census"]]
    states = Counter(census["state"])
    reasons = Counter(r for r in df["reason"] if isinstance(r, str) and r)
    return PartitionCounts(
        expected=len(census),
        migrated=states.get(InstanceState.MIGRATED.value, 0),
        quarantined=states.get(InstanceState.QUARANTINED.value, 0),
        unresolved=states.get(InstanceState.UNRESOLVED.value, 0),
        unsolicited=int((~df["in_census"]).sum()),
        written=int((df["load_action"] == PutOutcome.CREATED.value).sum()),
        reasons=dict(sorted(reasons.items())),
    )


def _quarantine(
    store: ObjectStore, partition: Partition, row: dict[str, Any], raw: bytes, code: str, run_id: str
) -> None:
    digest = row["received_sha256"] or hashlib.sha256(raw).hexdigest()
    key = quarantine_key(store.target.prefix, partition, digest)
    store.put_new(key, raw, digest, {"reason": code})
    row.update(state=InstanceState.QUARANTINED.value, reason=code, quarantine_key=key)


def _process(
    store: ObjectStore,
    partition: Partition,
    expected: tuple[str, str, str] | None,
    item: ReceivedInstance,
    run_id: str,
    ruleset: RuleSet,
    source_ae: str | None,
    times: StageTimes | None = None,
) -> tuple[dict[str, Any], bool]:
    """Normalize and load one received instance; returns its row and whether an object was created."""
    row: dict[str, Any] = {c: None for c in ("reason", "object_key", "object_sha256", "object_size", "load_action")}
    row.update(
        sop_instance_uid=item.sop_instance_uid,
        sop_class_uid=item.sop_class_uid,
        in_census=expected is not None,
        received_sha256=item.sha256,
        received_size=item.size,
        run_id=run_id,
    )
    if expected is not None:
        row.update(study_instance_uid=expected[0], series_instance_uid=expected[1])
    raw = item.path.read_bytes()
    if expected is None:
        _quarantine(store, partition, row, raw, reason(ReasonCode.UNSOLICITED), run_id)
        return row, False
    started = time.perf_counter()
    result = normalize(raw, expected[2], expected[1], expected[0], ruleset, source_ae)
    if times:
        times.add("normalize", time.perf_counter() - started)
    row.update(
        transfer_syntax_in=result.transfer_syntax_in,
        transfer_syntax_out=result.transfer_syntax_out,
        study_date=result.study_date,
        modality=result.modality,
        patient_key=result.patient_key,
        pixel_sha256_before=result.pixel_sha256_before,
        pixel_sha256_after=result.pixel_sha256_after,
        changes=";".join(result.changes) or None,
    )
    if result.reason is not None or result.data is None:
        _quarantine(store, partition, row, raw, result.reason or reason(ReasonCode.NOT_DICOM), run_id)
        return row, False
    key = instance_key(store.target.prefix, expected[0], expected[1], expected[2])
    started = time.perf_counter()
    digest = hashlib.sha256(result.data).hexdigest()
    put = store.put_new(
        key, result.data, digest, {"source-sha256": item.sha256, "ruleset": ruleset.label},
        same_if=("source-sha256", "ruleset"),
    )
    if times:
        times.add("upload", time.perf_counter() - started, len(result.data))
    if put.outcome is PutOutcome.CONFLICT:
        _quarantine(store, partition, row, raw, reason(ReasonCode.UID_CONFLICT), run_id)
        return row, False
    row.update(
        state=InstanceState.MIGRATED.value,
        object_key=key,
        object_sha256=put.sha256,
        object_size=put.size,
        load_action=put.outcome.value,
        rules_applied=";".join(result.rules_applied) or None,
    )
    return row, put.outcome is PutOutcome.CREATED


def transfer_partition(
    get: GetFn,
    store: ObjectStore,
    partition: Partition,
    series: list[CensusSeries],
    staging_root: Path,
    run_id: str,
    attempts: int,
    max_associations: int,
    upload_threads: int,
    ruleset: RuleSet = STRUCTURAL,
    source_ae: str | None = None,
    carried: Any = None,
    times: StageTimes | None = None,
) -> PartitionCounts:
    """Move one partition and write its transfer manifest.

    Every instance of the census ends ``migrated``, ``quarantined`` or
    ``unresolved``; instances that arrived unasked are quarantined too.
    ``series`` are retrieved; ``carried`` (rows of an earlier manifest, for
    series not retrieved again) join the manifest as they were, with
    ``load_action`` ``carried`` (see :func:`plan_resume`).
    """
    safe_run = hashlib.sha256(run_id.encode()).hexdigest()[:16]
    staging = staging_root / safe_run / partition.hive_path
    if staging.exists():
        shutil.rmtree(staging)  # a retried task starts clean
    expected = {
        i.sop_instance_uid: (s.study_instance_uid, s.series_instance_uid, i.sop_instance_uid)
        for s in series
        for i in s.instances
    }
    # Each instance is normalized and loaded as soon as it is staged, while
    # the rest of the partition is still arriving.
    pool = ThreadPoolExecutor(max_workers=upload_threads, thread_name_prefix="load")
    futures = []

    def submit(item: ReceivedInstance) -> None:
        futures.append(pool.submit(_process, store, partition, expected.get(item.sop_instance_uid), item, run_id,
                                   ruleset, source_ae, times))

    sink = StagingSink(staging, on_received=submit)
    try:
        started = time.perf_counter()
        retrievals = {r.series_instance_uid: r for r in retrieve_partition(get, series, sink, attempts, max_associations)}
        if times:
            times.retrieve_s += time.perf_counter() - started
            times.bytes_received += sum(r.size for r in sink.received.values())
        started = time.perf_counter()
        pool.shutdown(wait=True)
        results = [f.result() for f in futures]
        rows = [r for r, _ in results]
        if times:
            times.process_s += time.perf_counter() - started
        for s in series:
            for i in s.instances:
                if i.sop_instance_uid not in sink.received:
                    rows.append(
                        {
                            "study_instance_uid": s.study_instance_uid,
                            "series_instance_uid": s.series_instance_uid,
                            "sop_instance_uid": i.sop_instance_uid,
                            "sop_class_uid": i.sop_class_uid,
                            "in_census": True,
                            "state": InstanceState.UNRESOLVED.value,
                            "reason": reason(ReasonCode.NOT_RECEIVED,
                                             retrievals[s.series_instance_uid].why_missing(i.sop_instance_uid)),
                            "run_id": run_id,
                        }
                    )
        if carried is not None and len(carried):
            rows.extend({**r, "load_action": CARRIED} for r in carried.to_dict("records"))
        df = transfer_frame(sorted(rows, key=lambda r: (not r["in_census"], r["sop_instance_uid"])))
        write_transfer(store, partition, df)
        counts = counts_from_frame(df)
        log.info(
            "partition %s: expected=%d migrated=%d quarantined=%d unresolved=%d unsolicited=%d written=%d",
            partition.key,
            counts.expected,
            counts.migrated,
            counts.quarantined,
            counts.unresolved,
            counts.unsolicited,
            counts.written,
        )
        return counts
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(staging, ignore_errors=True)
