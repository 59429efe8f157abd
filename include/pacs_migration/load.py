"""Load: decide each arrival's row of the transfer manifest and put what
migrates into the bucket, write-once.

An arrival is placed in the census (:class:`Membership`), normalized, then
loaded. Under the ``inconsistent_patient: quarantine`` policy a study's
instances wait (:class:`StudyHold`) until every series of the study is
retrieved and normalized: only then is it known whether the study names one
patient, and nothing of a study that names two may go live.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from .census import CensusSeries, ExpectedInstance
from .counts import StageTimes
from .dimse import ReceivedInstance
from .manifest import TRANSFER_COLUMNS, PartitionManifests, source_label, writer_tag
from .normalize import NormalizeResult, normalize
from .normalize_file import STREAM_FROM_BYTES, normalize_file
from .normalize_processes import NormalizeProcesses
from .privacy import PatientKeyer
from .reasons import InstanceState, ReasonCode, reason
from .rules import PatientPolicy, RuleSet
from .store import Body, ObjectStore, PutOutcome, body_size, file_sha256
from .uids import InstanceUIDs

Expected = InstanceUIDs  # (study, series, SOP Instance UID), as the census names it
Row = dict[str, Any]


@dataclass
class LoadContext:
    """What the loads of one partition's transfer share."""

    manifests: PartitionManifests
    run_id: str
    ruleset: RuleSet
    source_ae: str | None
    keyer: PatientKeyer
    times: StageTimes | None = None
    normalizer: NormalizeProcesses | None = None
    stream_from: int = STREAM_FROM_BYTES  # bytes: larger instances are never held whole

    @property
    def store(self) -> ObjectStore:
        return self.manifests.store

    @property
    def source(self) -> str:
        """The legacy archive this partition comes from ("": the first, unnamed one)."""
        return self.manifests.partition.source

    @property
    def writer(self) -> str:
        """The run's tag in object metadata (decides 'created by this run'): per
        source, since one run moves every source's partitions of a date."""
        return writer_tag(f"{self.run_id}/{self.source}" if self.source else self.run_id)


@dataclass
class Prepared:
    """A normalized instance that will migrate once its study is cleared.
    Its object bytes are ``data``, or the file ``out`` (rewritten, on disk
    while it waits), or the received file itself."""

    row: Row
    expected: Expected
    item: ReceivedInstance
    data: bytes | None = None
    out: Path | None = None

    def object_body(self) -> tuple[Body, str]:
        """(bytes or the file holding them, SHA-256): passed through unchanged,
        the hash taken on arrival is the object's. Files are read by the upload
        in parts, never whole above the multipart threshold."""
        if self.data is not None:
            return self.data, hashlib.sha256(self.data).hexdigest()
        if self.out is not None:
            return self.out, file_sha256(self.out)
        return self.item.path, self.item.sha256


def row_for(item: ReceivedInstance, expected: Expected | None, run_id: str, membership: str | None) -> Row:
    row: Row = {c: None for c in TRANSFER_COLUMNS}
    row.update(
        sop_instance_uid=item.sop_instance_uid,
        sop_class_uid=item.sop_class_uid,
        in_census=expected is not None,
        received_sha256=item.sha256,
        received_size=item.size,
        run_id=run_id,
        membership=membership,
    )
    if expected is not None:
        row.update(study_instance_uid=expected[0], series_instance_uid=expected[1])
    return row


def quarantine(ctx: LoadContext, row: Row, original: Path, code: str) -> None:
    """Keep the original bytes (the staged file) under their hash; an existing
    object that no longer matches its hash is rewritten (quarantine is proven
    like migration)."""
    digest = row["received_sha256"] or file_sha256(original)
    key = ctx.manifests.quarantine_key(digest)
    put = ctx.store.put_verified(key, original, digest, {"reason": code}, writer=ctx.writer)
    row.update(state=InstanceState.QUARANTINED.value, reason=code, quarantine_key=key, load_action=put.outcome.value)


def _normalized(
    ctx: LoadContext, expected: Expected, item: ReceivedInstance, spill: bool
) -> tuple[NormalizeResult, bytes | None, Path | None]:
    """(result, rewritten bytes in memory, rewritten bytes on disk); neither
    when the received bytes pass unchanged. ``spill``: keep them on disk."""
    out_path = item.path.with_name(item.path.name + ".out")
    if ctx.normalizer is None and item.size >= ctx.stream_from:
        started = time.perf_counter()
        result, rewritten = normalize_file(
            item.path, expected, out_path, ctx.ruleset, ctx.source_ae, stream_from=ctx.stream_from
        )
        elapsed, data, out = time.perf_counter() - started, None, out_path if rewritten else None
    elif ctx.normalizer is None:
        raw = item.path.read_bytes()
        started = time.perf_counter()
        result = normalize(raw, expected, ctx.ruleset, ctx.source_ae)
        elapsed = time.perf_counter() - started
        data = result.data if result.data is not raw else None
        out = None
        if data is not None and spill:
            out_path.write_bytes(data)
            data, out = None, out_path
    else:
        result, rewritten, elapsed = ctx.normalizer.normalize(item.path, expected)
        data, out = None, out_path if rewritten else None
    if ctx.times:
        ctx.times.add("normalize", elapsed)
    return result, data, out


def prepare(
    ctx: LoadContext, expected: Expected | None, item: ReceivedInstance, membership: str | None, spill: bool = False
) -> Row | Prepared:
    """Normalize one arrival: its final row when quarantined, else what will migrate."""
    row = row_for(item, expected, ctx.run_id, membership if expected else None)
    if expected is None:
        quarantine(ctx, row, item.path, reason(ReasonCode.UNSOLICITED))
        return row
    result, data, out = _normalized(ctx, expected, item, spill)
    row.update(
        transfer_syntax_in=result.transfer_syntax_in,
        transfer_syntax_out=result.transfer_syntax_out,
        study_date=result.study_date,
        modality=result.modality,
        patient_key=ctx.keyer.key(result.patient_digest),
        pixel_sha256_before=result.pixel_sha256_before,
        pixel_sha256_after=result.pixel_sha256_after,
        changes=";".join(result.changes) or None,
        findings=";".join(result.findings) or None,
        rules_applied=";".join(result.rules_applied) or None,
    )
    if result.reason is not None:
        quarantine(ctx, row, item.path, result.reason)
        return row
    return Prepared(row, expected, item, data, out)


def load(ctx: LoadContext, p: Prepared) -> Row:
    """Put a prepared instance live, write-once; a different object already
    under its key quarantines it ``UID_CONFLICT``."""
    data, digest = p.object_body()
    key = ctx.manifests.instance_key(*p.expected)
    started = time.perf_counter()
    meta = {"source-sha256": p.item.sha256, "ruleset": ctx.ruleset.label}
    if ctx.source:
        meta["source"] = ctx.source  # which archive's copy this is (none: the first, unnamed source)
    put = ctx.store.put_new(key, data, digest, meta, same_if=("source-sha256", "ruleset"), writer=ctx.writer)
    if ctx.times:
        ctx.times.add("upload", time.perf_counter() - started, body_size(data))
    theirs = (put.metadata or {}).get("source", "")
    if put.outcome is not PutOutcome.CREATED and theirs != ctx.source:
        p.row["other_source"] = source_label(theirs)  # the same instance, migrated from another archive
    if put.outcome is PutOutcome.CONFLICT:
        if theirs == ctx.source and _source_changed(ctx, key, p):
            return p.row
        quarantine(ctx, p.row, p.item.path, reason(ReasonCode.UID_CONFLICT))
        return p.row
    p.row.update(
        state=InstanceState.MIGRATED.value,
        object_key=key,
        object_sha256=put.sha256,
        object_size=put.size,
        load_action=put.outcome.value,
    )
    return p.row


def _source_changed(ctx: LoadContext, key: str, p: Prepared) -> bool:
    """The live object came from other source bytes under the same rule set:
    the instance changed at the source after it was migrated. The row stays
    migrated (the live object, re-read by validation), with reason
    ``SOURCE_CHANGED`` and the new version kept in quarantine: recorded once,
    never failing the partition for ever."""
    live = ctx.store.head(key)
    meta = (live.metadata or {}) if live else {}
    if live is None or meta.get("ruleset") != ctx.ruleset.label or meta.get("source-sha256") in (None, p.item.sha256):
        return False
    quarantine(ctx, p.row, p.item.path, reason(ReasonCode.SOURCE_CHANGED))
    p.row.update(
        state=InstanceState.MIGRATED.value,
        object_key=key,
        object_sha256=live.sha256,
        object_size=live.size,
        load_action=PutOutcome.ALREADY_PRESENT.value,
    )
    return True


def header_uids(path: Path) -> tuple[str, str] | None:
    """(StudyInstanceUID, SeriesInstanceUID) as the staged file states them, or None if unreadable."""
    try:
        ds = pydicom.dcmread(
            path, stop_before_pixels=True, force=True, specific_tags=["StudyInstanceUID", "SeriesInstanceUID"]
        )
        return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
    except Exception:
        return None


class Membership:
    """Which census series an arrival belongs to. A SOP Instance UID named
    once by the census belongs to that series; a series with a census gap
    also owns arrivals whose header places them in it; a UID the census
    names in two series, or that arrives with different bytes, is held until
    retrieval ends (it may not go live before its copies are compared)."""

    def __init__(self, series: list[CensusSeries]) -> None:
        self.named: dict[str, list[Expected]] = {}
        for s in series:
            for i in s.instances:
                self.named.setdefault(i.sop_instance_uid, []).append(
                    InstanceUIDs(s.study_instance_uid, s.series_instance_uid, i.sop_instance_uid)
                )
        self.gaps = {
            (s.study_instance_uid, s.series_instance_uid) for s in series if s.census_gap and s.series_instance_uid
        }

    def held(self, item: ReceivedInstance) -> bool:
        return item.copy > 0 or len(self.named.get(item.sop_instance_uid, ())) > 1

    def study_of_held(self, sop_instance_uid: str) -> str | None:
        named = self.named.get(sop_instance_uid)
        return named[0][0] if named else None

    def place(self, item: ReceivedInstance) -> tuple[Expected | None, str | None]:
        named = self.named.get(item.sop_instance_uid)
        if named:
            return named[0], "census"
        if self.gaps and (uids := header_uids(item.path)) in self.gaps:
            return InstanceUIDs(*uids, item.sop_instance_uid), "retrieval"
        return None, None

    def resolve_copies(
        self,
        ctx: LoadContext,
        copies: list[ReceivedInstance],
        prepared: Callable[[Expected | None, ReceivedInstance], list[Row]],
    ) -> list[Row]:
        """Resolve held arrivals of one SOP Instance UID: one distinct copy
        goes on as usual (``prepared``); several are all quarantined
        ``UID_CONFLICT``, each with the series its header names."""
        if len(copies) == 1:
            item = copies[0]
            uids = header_uids(item.path)
            named = self.named.get(item.sop_instance_uid, [])
            return prepared(next((e for e in named if uids == e[:2]), named[0] if named else None), item)
        return self.conflicting(ctx, copies)

    def conflicting(self, ctx: LoadContext, copies: list[ReceivedInstance]) -> list[Row]:
        """Quarantine every copy ``UID_CONFLICT``, each with the series its header names."""
        rows = []
        for item in copies:
            uids = header_uids(item.path)
            named = [e for e in self.named.get(item.sop_instance_uid, []) if e[:2] == uids]
            row = row_for(item, named[0] if named else None, ctx.run_id, "census" if named else None)
            if not named and uids:
                row.update(study_instance_uid=uids[0], series_instance_uid=uids[1])
            quarantine(ctx, row, item.path, reason(ReasonCode.UID_CONFLICT))
            rows.append(row)
        return rows


class StudyHold:
    """Counts, per study, series still being retrieved and arrivals still
    being normalized; keeps prepared instances until both are zero, then
    releases them with the study's verdict: one patient or several."""

    def __init__(self, series: list[CensusSeries]) -> None:
        self._lock = threading.Lock()
        self._series_left = Counter(s.study_instance_uid for s in series if s.series_instance_uid)
        self._arriving: Counter[str] = Counter()
        self._pending: dict[str, list[Prepared]] = defaultdict(list)
        self._patients: dict[str, set[str]] = defaultdict(set)

    def arriving(self, study: str) -> None:
        with self._lock:
            self._arriving[study] += 1

    def normalized(self, study: str, row: Row, prepared: Prepared | None) -> tuple[list[Prepared], bool]:
        """One arrival of ``study`` is normalized (``prepared`` None: it was
        quarantined). Returns what the study releases now, if anything."""
        with self._lock:
            self._arriving[study] -= 1
            if row.get("patient_key"):
                self._patients[study].add(row["patient_key"])
            if prepared is not None:
                self._pending[study].append(prepared)
            return self._release(study)

    def series_done(self, study: str) -> tuple[list[Prepared], bool]:
        with self._lock:
            self._series_left[study] -= 1
            return self._release(study)

    def _release(self, study: str) -> tuple[list[Prepared], bool]:
        if self._series_left[study] > 0 or self._arriving[study] > 0:
            return [], False
        return self._pending.pop(study, []), len(self._patients[study]) > 1

    @property
    def waiting(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._pending.values())


def settle(ctx: LoadContext, released: list[Prepared], inconsistent: bool) -> list[Row]:
    """Load a released study, or quarantine all of it ``INCONSISTENT_PATIENT``."""
    rows = []
    for p in released:
        if inconsistent:
            quarantine(ctx, p.row, p.item.path, reason(ReasonCode.INCONSISTENT_PATIENT))
            rows.append(p.row)
        else:
            rows.append(load(ctx, p))
    return rows


def flag_inconsistent(rows: list[Row], policy: PatientPolicy) -> None:
    """Under the flag policy, mark every row of a study that names more than
    one patient (the report names the study)."""
    if policy is not PatientPolicy.FLAG:
        return
    patients: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        if r.get("patient_key") and r.get("study_instance_uid"):
            patients[r["study_instance_uid"]].add(r["patient_key"])
    for r in rows:
        if len(patients.get(r.get("study_instance_uid") or "", ())) > 1:
            r["findings"] = ";".join(filter(None, [r.get("findings"), ReasonCode.INCONSISTENT_PATIENT.value]))


def unresolved(series: CensusSeries, sop: ExpectedInstance | None, why: str, run_id: str) -> Row:
    return {
        "study_instance_uid": series.study_instance_uid,
        "series_instance_uid": series.series_instance_uid or None,
        "sop_instance_uid": sop.sop_instance_uid if sop else None,
        "sop_class_uid": sop.sop_class_uid if sop else None,
        "in_census": True,
        "state": InstanceState.UNRESOLVED.value,
        "reason": why,
        "run_id": run_id,
        "membership": "census",
    }


def gap_rows(series: CensusSeries, rows: list[Row], run_id: str) -> list[Row]:
    """Unresolved rows for what a series with a census gap is known to hold
    but nobody could name: the PACS's count minus the members found, or one
    row when the count is unknown and the census failed."""
    members = sum(
        1
        for r in rows
        if r["in_census"]
        and r["series_instance_uid"] == series.series_instance_uid
        and r["study_instance_uid"] == series.study_instance_uid
    )
    failed = (series.census_gap or "").startswith(ReasonCode.CENSUS_FAILED.value)
    deficit = series.reported_instances - members if series.reported_instances is not None else 1 if failed else 0
    why = series.census_gap if failed else reason(ReasonCode.NOT_RECEIVED, "not-sent")
    return [unresolved(series, None, why or "", run_id) for _ in range(max(0, deficit))]
