"""The data path of one partition: retrieve -> normalize -> load.

DICOM bytes stay on the worker that runs this: they go from the association
into staging, through normalize, into S3, and staging is removed afterwards.
Only counts leave (for XCom); the per-instance record is the transfer manifest.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from .census import CensusSeries
from .counts import PartitionCounts, StageTimes, counts_from_frame
from .dimse import ReceivedInstance, StagingSink
from .load import (
    Expected,
    LoadContext,
    Membership,
    Prepared,
    Row,
    StudyHold,
    flag_inconsistent,
    gap_rows,
    prepare,
    settle,
    unresolved,
)
from .manifest import TRANSFER_COLUMNS, PartitionManifests, transfer_frame
from .normalize_file import STREAM_FROM_BYTES
from .normalize_processes import NormalizeProcesses
from .partition import Partition
from .privacy import MissingSecret, PatientKeyer
from .progress import ProgressLog
from .reasons import InstanceState, ReasonCode, reason
from .retrieve import GetFn, retrieve_partition
from .rules import STRUCTURAL, PatientPolicy, RuleSet
from .staging import attempt_folder
from .store import ObjectStore

log = logging.getLogger(__name__)


CARRIED = "carried"  # load_action of a row kept from an earlier run's manifest


def plan_resume(series: list[CensusSeries], previous: Any) -> tuple[list[CensusSeries], Any]:
    """Split a partition's census against its previous transfer manifest:
    (series to retrieve, rows to carry). A series is retrieved again when any
    of its instances has no migrated or quarantined row (new at the source,
    or unresolved before); the rows of every other series are carried, so a
    delta run moves only what is new and rewrites nothing."""
    if previous is None or not len(previous):
        return series, None
    settled = previous[
        previous["in_census"] & previous["state"].isin([InstanceState.MIGRATED.value, InstanceState.QUARANTINED.value])
    ]
    done = set(settled["sop_instance_uid"])
    fetch = [s for s in series if s.census_gap or any(i.sop_instance_uid not in done for i in s.instances)]
    fetch_uids = {s.series_instance_uid for s in fetch}
    wanted = {i.sop_instance_uid for s in series if s.series_instance_uid not in fetch_uids for i in s.instances}
    carried = settled[settled["sop_instance_uid"].isin(wanted)]
    return fetch, carried


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
    normalizer: NormalizeProcesses | None = None,
    keyer: PatientKeyer | None = None,
    should_stop: Any = None,
    stream_from: int = STREAM_FROM_BYTES,
) -> PartitionCounts:
    """Move one partition and write its transfer manifest.

    Every instance of the census ends ``migrated``, ``quarantined`` or
    ``unresolved``; instances that arrived unasked are quarantined too.
    ``series`` are retrieved; ``carried`` (rows of an earlier manifest, for
    series not retrieved again) join the manifest as they were, with
    ``load_action`` ``carried`` (see :func:`plan_resume`). ``normalizer``:
    normalize processes for the same ``ruleset`` and ``source_ae`` (None:
    normalize in the load threads). ``keyer``: the patient-key secret
    (:mod:`privacy`); required. ``should_stop``: asked before each series; once
    true, the rest of the partition is left ``unresolved`` ``WINDOW_CLOSED``
    (what was moved is recorded: the manifest stays consistent).
    ``stream_from``: instances of this many bytes or more are normalized and
    uploaded from their staged file, never held whole in memory.
    """
    if keyer is None:
        raise MissingSecret("transfer_partition needs a PatientKeyer (the patient-key secret)")
    if normalizer is not None and (normalizer.ruleset != ruleset or normalizer.source_ae != source_ae):
        raise ValueError("normalizer was made for another rule set or source AE")
    ctx = LoadContext(
        PartitionManifests(store, partition), run_id, ruleset, source_ae, keyer, times, normalizer, stream_from
    )
    previous = ctx.manifests.transfer_or_none()
    pipeline = _LoadPipeline(ctx, series, upload_threads)
    progress = ProgressLog(f"partition {partition.key}", sum(len(s.instances) for s in series), "instances received")

    def arrived(item: ReceivedInstance) -> None:
        pipeline.arrived(item)
        progress.tick()

    try:
        with attempt_folder(staging_root, partition.hive_path, ctx.writer) as staging:
            sink = StagingSink(staging, on_received=arrived)
            started = time.perf_counter()
            retrieved = retrieve_partition(
                get, series, sink, attempts, max_associations, pipeline.series_done, should_stop
            )
            if times:
                times.retrieve_s += time.perf_counter() - started
                times.bytes_received += sum(r.size for r in sink.received.values())
            started = time.perf_counter()
            rows = pipeline.finish()
            if times:
                times.process_s += time.perf_counter() - started
            full = _staging_full(sink, staging, partition, series)
        rows.extend(_missing_rows(series, rows, sink, {r.series_instance_uid: r for r in retrieved}, run_id, full))
    finally:
        pipeline.close()
    if carried is not None and len(carried):
        rows.extend({**r, "load_action": CARRIED} for r in carried.to_dict("records"))
    rows.extend(_source_deleted(previous, rows, run_id))
    rows.extend(_orphans(store, ctx.manifests, series, rows, run_id))
    flag_inconsistent(rows, ruleset.inconsistent_patient)
    df = transfer_frame(
        sorted(
            rows, key=lambda r: (not r["in_census"], r["sop_instance_uid"] or "", r.get("series_instance_uid") or "")
        )
    )
    ctx.manifests.write_transfer(df, run_id)
    counts = counts_from_frame(df)
    log.info("partition %s: %s", partition.key, counts.summary())
    return counts


def _source_deleted(previous: Any, rows: list[Row], run_id: str) -> list[Row]:
    """Objects migrated before whose instance the source no longer holds: they
    stay (policy: keep), carried with reason ``SOURCE_DELETED``, out of this
    census (so neither expected nor unsolicited), and are still re-read."""
    if previous is None or not len(previous):
        return []
    present = {(r.get("series_instance_uid"), r.get("sop_instance_uid")) for r in rows}
    migrated = previous[previous["state"] == InstanceState.MIGRATED.value]
    still = [
        (s, u) in present for s, u in zip(migrated["series_instance_uid"], migrated["sop_instance_uid"], strict=True)
    ]
    gone = migrated[[not x for x in still]]
    return [
        {
            **r,
            "in_census": False,
            "reason": reason(ReasonCode.SOURCE_DELETED),
            "load_action": CARRIED,
            "membership": None,
        }
        for r in gone.to_dict("records")
    ]


def _orphans(
    store: ObjectStore, manifests: PartitionManifests, series: list[CensusSeries], rows: list[Row], run_id: str
) -> list[Row]:
    """Objects under the partition's series prefixes that no row names (left by
    a run killed before its manifest, for an instance nobody asks for now):
    adopted as migrated, reason ``ORPHAN_ADOPTED``, when their bytes hash to
    the checksum they were stored with; any other is left for validation to
    count (listed objects then exceed migrated ones and the partition fails)."""
    named = {r.get("object_key") for r in rows} | {r.get("quarantine_key") for r in rows}
    prefixes = {manifests.series_prefix(s.study_instance_uid, s.series_instance_uid) for s in series} | {
        manifests.series_prefix(r["study_instance_uid"], r["series_instance_uid"])
        for r in rows
        if r.get("object_key") and r.get("study_instance_uid") and r.get("series_instance_uid")
    }
    # A SOP instance a row names (e.g. a UID_CONFLICT with another archive's live copy) is not an orphan.
    named_sops = {f"{r['sop_instance_uid']}.dcm" for r in rows if r.get("sop_instance_uid")}
    adopted: list[Row] = []
    for prefix in sorted(prefixes):
        for key in store.list_keys(prefix):
            if key in named or key.rsplit("/", 1)[-1] in named_sops:
                continue
            head = store.head(key)
            if head is not None and (head.metadata or {}).get("source", "") != manifests.partition.source:
                continue  # another source archive's copy: that archive's partition names it
            row = _adopt(store, manifests, key, head, run_id)
            if row is None:
                log.warning(
                    "partition %s: an object with no manifest row fails its checksum; not adopted",
                    manifests.partition.key,
                )
            else:
                adopted.append(row)
    if adopted:
        log.info("partition %s: %d orphan object(s) adopted", manifests.partition.key, len(adopted))
    return adopted


def _adopt(store: ObjectStore, manifests: PartitionManifests, key: str, head: Any, run_id: str) -> Row | None:
    read = store.sha256_of(key) if head is not None else None  # streamed: an orphan may be of any size
    if head is None or read is None or read[0] != head.sha256:
        return None
    study, _, series, _, name = key[len(store.target.prefix) :].split("/")[1:6]
    return {
        **{c: None for c in TRANSFER_COLUMNS},
        "study_instance_uid": study,
        "series_instance_uid": series,
        "sop_instance_uid": name.removesuffix(".dcm"),
        "in_census": False,
        "state": InstanceState.MIGRATED.value,
        "reason": reason(ReasonCode.ORPHAN_ADOPTED),
        "study_date": manifests.partition.dicom_date,
        "modality": manifests.partition.modality,
        "object_key": key,
        "object_sha256": head.sha256,
        "object_size": read[1],
        "load_action": "adopted",
        "run_id": run_id,
    }


def _row_order(r: Row) -> tuple[bool, str, str]:
    return not r["in_census"], r["sop_instance_uid"] or "", r.get("series_instance_uid") or ""


def _staging_full(sink: StagingSink, staging: Path, partition: Partition, series: list[CensusSeries]) -> bool:
    """Did the staging disk fill up? Then what is missing is STAGING_FULL, not the source's fault."""
    if not sink.out_of_space():
        return False
    free = shutil.disk_usage(staging).free
    staged = sum(r.size for r in sink.received.values())
    log.error(
        "partition %s: staging %s is full (%d bytes free) after %d of %d instances (%d bytes); "
        "give staging_dir more room than the largest partition",
        partition.key,
        staging,
        free,
        len(sink.received),
        sum(len(s.instances) for s in series),
        staged,
    )
    return True


def _missing_rows(
    series: list[CensusSeries],
    rows: list[Row],
    sink: StagingSink,
    retrievals: dict[str, Any],
    run_id: str,
    staging_full: bool = False,
) -> list[Row]:
    """Unresolved rows: each census instance that never arrived (with why), and
    what a series with a census gap is known to hold but nobody named."""
    out: list[Row] = []
    for s in series:
        for i in s.instances:
            if i.sop_instance_uid not in sink.received:
                got = retrievals[s.series_instance_uid]
                code = (
                    reason(ReasonCode.STAGING_FULL)
                    if staging_full
                    else reason(ReasonCode.NOT_RECEIVED, got.why_missing(i.sop_instance_uid))
                )
                out.append(unresolved(s, i, reason(ReasonCode.WINDOW_CLOSED) if got.stopped else code, run_id))
        if s.census_gap:
            gaps = gap_rows(s, rows + out, run_id)
            if (got := retrievals.get(s.series_instance_uid)) is not None and got.stopped:
                gaps = [{**r, "reason": reason(ReasonCode.WINDOW_CLOSED)} for r in gaps]
            out.extend(gaps)
    return out


class _LoadPipeline:
    """Each arrival is normalized as soon as it is staged, while the rest of
    the partition is still arriving; a study's instances go live when its
    last series' retrieval has ended, so that every copy of a SOP Instance UID
    delivered meanwhile is compared first: differing copies are all
    ``UID_CONFLICT``, none goes live (a stranger's forged copy cannot win by
    arriving first). Under the quarantine policy for inconsistent patients the
    released study is checked for one patient."""

    def __init__(self, ctx: LoadContext, series: list[CensusSeries], threads: int) -> None:
        self.ctx = ctx
        self.members = Membership(series)
        self.hold = StudyHold(series)
        self.one_patient = ctx.ruleset.inconsistent_patient is PatientPolicy.QUARANTINE
        self.held: dict[str, list[ReceivedInstance]] = {}
        # The fate of each first arrival, for its later differing copies to be judged against:
        self.prepared: set[str] = set()  # normalized, waiting for its study's release
        self.live: set[str] = set()  # released to go live
        self.conflicted: set[str] = set()  # every copy, the first included, is UID_CONFLICT
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="load")
        self.futures: list[Future[list[Row]]] = []

    def arrived(self, item: ReceivedInstance) -> None:
        """Called by the staging sink (association threads)."""
        if self.members.held(item):
            with self.lock:
                copies = self.held.setdefault(item.sop_instance_uid, [])
                if not copies and (study := self.members.study_of_held(item.sop_instance_uid)):
                    self.hold.arriving(study)  # the copies settle as one arrival
                copies.append(item)
            return
        expected, membership = self.members.place(item)
        if expected is not None:
            self.hold.arriving(expected[0])
        self.futures.append(self.pool.submit(self._one, expected, item, membership))

    def series_done(self, series: CensusSeries) -> None:
        """Called when a series' retrieval ends (retrieve threads)."""
        released, inconsistent = self.hold.series_done(series.study_instance_uid)
        if released:
            self.futures.append(self.pool.submit(self._settle, released, inconsistent))

    def _settle(self, released: list[Prepared], inconsistent: bool) -> list[Row]:
        """Load a released study, but for instances a differing copy of which
        arrived meanwhile: those are ``UID_CONFLICT`` with their copies."""
        with self.lock:
            going, clash = [], []
            for p in released:
                uid = p.item.sop_instance_uid
                if uid in self.held or uid in self.conflicted:
                    self.conflicted.add(uid)
                    clash.append(p.item)
                else:
                    self.live.add(uid)
                    going.append(p)
        rows = self.members.conflicting(self.ctx, clash) if clash else []
        return rows + settle(self.ctx, going, inconsistent and self.one_patient)

    def _one(
        self, expected: Expected | None, item: ReceivedInstance, membership: str | None, study: str | None = None
    ) -> list[Row]:
        prepared = prepare(self.ctx, expected, item, membership, spill=True)
        row = prepared.row if isinstance(prepared, Prepared) else prepared
        if isinstance(prepared, Prepared):
            with self.lock:
                self.prepared.add(item.sop_instance_uid)
        study = study or (expected[0] if expected else None)
        if study is None:
            return [self._settle([prepared], False)[0] if isinstance(prepared, Prepared) else row]
        released, inconsistent = self.hold.normalized(study, row, prepared if isinstance(prepared, Prepared) else None)
        return ([] if isinstance(prepared, Prepared) else [row]) + self._settle(released, inconsistent)

    def _copies(self, copies: list[ReceivedInstance]) -> list[Row]:
        """One SOP Instance UID's held arrivals (after every load has ended).
        A single copy whose first arrival did not make it (quarantined, say
        truncated) goes on as usual; otherwise every copy conflicts, and so
        does the first arrival if it has not gone live (it waits in the hold)."""
        uid = copies[0].sop_instance_uid
        study = self.members.study_of_held(uid)
        with self.lock:
            first = uid in self.prepared or uid in self.live or uid in self.conflicted
            if len(copies) > 1 or first:
                self.conflicted.add(uid)
        if len(copies) == 1 and not first:
            return self.members.resolve_copies(self.ctx, copies, lambda e, item: self._one(e, item, "census", study))
        rows = self.members.conflicting(self.ctx, copies)
        if study is not None:  # the copies counted as one arrival of their study: release it
            released, inconsistent = self.hold.normalized(study, {}, None)
            rows += self._settle(released, inconsistent)
        return rows

    def finish(self) -> list[Row]:
        """Wait for every load, then resolve the held copies; the rows."""
        while pending := [f for f in self.futures if not f.done()]:
            wait(pending)
        copies = [self.pool.submit(self._copies, c) for c in self.held.values()]
        self.futures.extend(copies)
        self.pool.shutdown(wait=True)
        rows = [r for f in self.futures for r in f.result()]
        if self.hold.waiting:
            raise RuntimeError(f"{self.hold.waiting} instance(s) still held after retrieval ended")
        return rows

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
