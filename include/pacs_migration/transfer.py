"""The data path of one partition: retrieve -> normalize -> load.

DICOM bytes stay on the worker that runs this: they go from the association
into staging, through normalize, into S3, and staging is removed afterwards.
Only counts leave (for XCom); the per-instance record is the transfer manifest.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import queue
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom

from .census import CensusSeries, ExpectedInstance
from .dimse import ReceivedInstance, StagingSink
from .manifest import TRANSFER_COLUMNS, PartitionManifests, transfer_frame
from .normalize import NormalizeResult, normalize
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

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> PartitionCounts:
        return cls(**{f: int(value.get(f, 0)) for f in COUNT_FIELDS}, reasons=dict(value.get("reasons") or {}))

    @property
    def conserved(self) -> bool:
        return self.expected == self.migrated + self.quarantined + self.unresolved

    def summary(self) -> str:
        return " ".join(f"{f}={getattr(self, f)}" for f in COUNT_FIELDS)


COUNT_FIELDS = ("expected", "migrated", "quarantined", "unresolved", "unsolicited", "written")


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
    fetch = [s for s in series if s.census_gap or any(i.sop_instance_uid not in done for i in s.instances)]
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
        written=int(((df["load_action"] == PutOutcome.CREATED.value)
                     & (df["state"] == InstanceState.MIGRATED.value)).sum()),
        reasons=dict(sorted(reasons.items())),
    )


def peak_rss_kb(pid: int | str = "self") -> int:
    """Peak resident set of a process as Linux records it for that process
    (VmHWM; 0 where unknown). Not ru_maxrss: a child started by (v)fork + exec
    inherits its parent's high-water mark there."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def normalize_staged(path: str, expected: tuple[str, str, str], ruleset: RuleSet,
                     source_ae: str | None) -> tuple[NormalizeResult, bool, float]:
    """Normalize a staged file in a normalize process. Rewritten bytes go to
    ``<path>.out`` beside it, not through the pipe; returns the result without
    its data, whether it was rewritten, and the seconds it took."""
    started = time.perf_counter()
    raw = Path(path).read_bytes()
    result = normalize(raw, expected[2], expected[1], expected[0], ruleset, source_ae)
    rewritten = result.data is not None and result.data is not raw
    if rewritten:
        Path(path + ".out").write_bytes(result.data)
    result.data = None
    return result, rewritten, time.perf_counter() - started


def _send(stream: Any, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _receive(stream: Any) -> Any:
    head = stream.read(8)
    if len(head) < 8:
        raise EOFError("normalize process closed its pipe")
    size = struct.unpack("<Q", head)[0]
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("normalize process closed its pipe")
    return pickle.loads(data)


def serve_normalize() -> None:
    """A normalize process's loop (``python -m include.pacs_migration.transfer``):
    the rule set once, then (path, expected) requests until the pipe closes.
    Replies on the original stdout; anything printed goes to stderr."""
    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr
    ruleset, source_ae = _receive(requests)
    while True:
        try:
            path, expected = _receive(requests)
        except EOFError:
            return
        try:
            reply: Any = ("ok", normalize_staged(path, expected, ruleset, source_ae))
        except Exception as exc:  # reported to the task, which fails the instance's future
            reply = ("error", f"{type(exc).__name__}: {exc}")
        _send(replies, reply)


class NormalizeProcesses:
    """Worker processes for normalize: pure Python, so in a thread it holds
    the GIL that retrieval and uploads need; in a process it uses another
    core. Plain subprocesses over pipes, not multiprocessing: Airflow's Celery
    and local executors run tasks in daemonic processes, which multiprocessing
    forbids to have children. The rule set is sent once per process (a
    crosswalk can be large), not with each instance."""

    def __init__(self, processes: int, ruleset: RuleSet, source_ae: str | None) -> None:
        self.ruleset = ruleset
        self.source_ae = source_ae
        self._procs: list[subprocess.Popen[bytes]] = []
        self._idle: queue.Queue[subprocess.Popen[bytes]] = queue.Queue()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        try:
            for _ in range(processes):
                proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=env)
                self._procs.append(proc)
                _send(proc.stdin, (ruleset, source_ae))
                self._idle.put(proc)
        except BaseException:
            self.close()
            raise

    def normalize(self, path: Path, expected: tuple[str, str, str]) -> tuple[NormalizeResult, bool, float]:
        proc = self._idle.get(timeout=3600)  # bounded: one instance never takes an hour
        try:
            _send(proc.stdin, (str(path), expected))
            status, value = _receive(proc.stdout)
        except (EOFError, OSError) as exc:
            self._idle.put(proc)  # back, dead: whoever takes it next fails at once instead of waiting
            raise RuntimeError(f"normalize process {proc.pid} ended (exit {proc.poll()})") from exc
        self._idle.put(proc)
        if status != "ok":
            raise RuntimeError(f"normalize failed: {value}")
        return value

    def peak_rss_kb(self) -> int:
        """The largest peak resident set of the normalize processes (Linux
        VmHWM; 0 where unknown), for benchmarks and monitoring."""
        return max((peak_rss_kb(proc.pid) for proc in self._procs), default=0)

    def close(self) -> None:
        for proc in self._procs:
            if proc.stdin and not proc.stdin.closed:
                try:
                    proc.stdin.close()  # end of requests: the process returns
                except OSError:
                    pass
        for proc in self._procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
            if proc.stdout:
                proc.stdout.close()
        self._procs = []

    def __enter__(self) -> NormalizeProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def normalize_processes(processes: int, ruleset: RuleSet, source_ae: str | None) -> NormalizeProcesses | None:
    """``processes`` normalize processes, or None (0) to normalize in the load threads."""
    return NormalizeProcesses(processes, ruleset, source_ae) if processes > 0 else None


@dataclass
class _Load:
    """What the loads of one partition's transfer share."""

    manifests: PartitionManifests
    run_id: str
    ruleset: RuleSet
    source_ae: str | None
    times: StageTimes | None = None
    normalizer: NormalizeProcesses | None = None

    @property
    def store(self) -> ObjectStore:
        return self.manifests.store

    @property
    def writer(self) -> str:
        """The run's tag in object metadata (decides 'created by this run')."""
        return hashlib.sha256(self.run_id.encode()).hexdigest()[:16]


Expected = tuple[str, str, str]  # (study, series, SOP Instance UID)


def _row(item: ReceivedInstance, expected: Expected | None, run_id: str, membership: str | None) -> dict[str, Any]:
    row: dict[str, Any] = {c: None for c in TRANSFER_COLUMNS}
    row.update(sop_instance_uid=item.sop_instance_uid, sop_class_uid=item.sop_class_uid,
               in_census=expected is not None, received_sha256=item.sha256, received_size=item.size,
               run_id=run_id, membership=membership)
    if expected is not None:
        row.update(study_instance_uid=expected[0], series_instance_uid=expected[1])
    return row


def _quarantine(ctx: _Load, row: dict[str, Any], raw: bytes, code: str) -> None:
    """Keep the original bytes under their hash; an existing object that no
    longer matches its hash is rewritten (quarantine is proven like migration)."""
    digest = row["received_sha256"] or hashlib.sha256(raw).hexdigest()
    key = ctx.manifests.quarantine_key(digest)
    put = ctx.store.put_verified(key, raw, digest, {"reason": code}, writer=ctx.writer)
    row.update(state=InstanceState.QUARANTINED.value, reason=code, quarantine_key=key, load_action=put.outcome.value)


def _normalized(ctx: _Load, expected: Expected, item: ReceivedInstance) -> tuple[NormalizeResult, bytes | None, bytes | None]:
    """(result, object bytes or None, the raw bytes if read)."""
    if ctx.normalizer is None:
        raw = item.path.read_bytes()
        started = time.perf_counter()
        result = normalize(raw, expected[2], expected[1], expected[0], ctx.ruleset, ctx.source_ae)
        elapsed = time.perf_counter() - started
        data = result.data
    else:
        raw = None
        result, rewritten, elapsed = ctx.normalizer.normalize(item.path, expected)
        data = None
        if result.reason is None:
            data = item.path.with_name(item.path.name + ".out").read_bytes() if rewritten else \
                (raw := item.path.read_bytes())
    if ctx.times:
        ctx.times.add("normalize", elapsed)
    return result, data, raw


def _process(ctx: _Load, expected: Expected | None, item: ReceivedInstance,
             membership: str | None = "census") -> tuple[dict[str, Any], bool]:
    """Normalize and load one received instance; returns its row and whether this run created an object."""
    row = _row(item, expected, ctx.run_id, membership if expected else None)
    if expected is None:
        _quarantine(ctx, row, item.path.read_bytes(), reason(ReasonCode.UNSOLICITED))
        return row, False
    result, data, raw = _normalized(ctx, expected, item)
    row.update(
        transfer_syntax_in=result.transfer_syntax_in, transfer_syntax_out=result.transfer_syntax_out,
        study_date=result.study_date, modality=result.modality, patient_key=result.patient_key,
        pixel_sha256_before=result.pixel_sha256_before, pixel_sha256_after=result.pixel_sha256_after,
        changes=";".join(result.changes) or None,
    )
    if result.reason is not None or data is None:
        _quarantine(ctx, row, raw if raw is not None else item.path.read_bytes(),
                    result.reason or reason(ReasonCode.NOT_DICOM))
        return row, False
    key = ctx.manifests.instance_key(*expected)
    started = time.perf_counter()
    # Passed through unchanged: the hash taken on arrival is the object's.
    digest = item.sha256 if data is raw else hashlib.sha256(data).hexdigest()
    put = ctx.store.put_new(key, data, digest, {"source-sha256": item.sha256, "ruleset": ctx.ruleset.label},
                            same_if=("source-sha256", "ruleset"), writer=ctx.writer)
    if ctx.times:
        ctx.times.add("upload", time.perf_counter() - started, len(data))
    if put.outcome is PutOutcome.CONFLICT:
        _quarantine(ctx, row, raw if raw is not None else item.path.read_bytes(), reason(ReasonCode.UID_CONFLICT))
        return row, False
    row.update(state=InstanceState.MIGRATED.value, object_key=key, object_sha256=put.sha256, object_size=put.size,
               load_action=put.outcome.value, rules_applied=";".join(result.rules_applied) or None)
    return row, put.outcome is PutOutcome.CREATED


def _header_uids(path: Path) -> tuple[str, str] | None:
    """(StudyInstanceUID, SeriesInstanceUID) as the staged file states them, or None if unreadable."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True,
                             specific_tags=["StudyInstanceUID", "SeriesInstanceUID"])
        return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
    except Exception:
        return None


class _Membership:
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
                    (s.study_instance_uid, s.series_instance_uid, i.sop_instance_uid))
        self.gaps = {(s.study_instance_uid, s.series_instance_uid) for s in series
                     if s.census_gap and s.series_instance_uid}

    def held(self, item: ReceivedInstance) -> bool:
        return item.copy > 0 or len(self.named.get(item.sop_instance_uid, ())) > 1

    def place(self, item: ReceivedInstance) -> tuple[Expected | None, str | None]:
        named = self.named.get(item.sop_instance_uid)
        if named:
            return named[0], "census"
        if self.gaps and (uids := _header_uids(item.path)) in self.gaps:
            return (*uids, item.sop_instance_uid), "retrieval"
        return None, None

    def copy_rows(self, ctx: _Load, copies: list[ReceivedInstance]) -> list[dict[str, Any]]:
        """Resolve held arrivals of one SOP Instance UID: one distinct copy
        is processed as usual; several are all quarantined ``UID_CONFLICT``,
        each with the series its header names."""
        if len(copies) == 1:
            item = copies[0]
            uids = _header_uids(item.path)
            named = self.named.get(item.sop_instance_uid, [])
            expected = next((e for e in named if uids == e[:2]), named[0] if named else None)
            return [_process(ctx, expected, item)[0]]
        rows = []
        for item in copies:
            uids = _header_uids(item.path)
            named = [e for e in self.named.get(item.sop_instance_uid, []) if e[:2] == uids]
            row = _row(item, named[0] if named else None, ctx.run_id, "census" if named else None)
            if not named and uids:
                row.update(study_instance_uid=uids[0], series_instance_uid=uids[1])
            _quarantine(ctx, row, item.path.read_bytes(), reason(ReasonCode.UID_CONFLICT))
            rows.append(row)
        return rows


def _unresolved(series: CensusSeries, sop: ExpectedInstance | None, why: str, run_id: str) -> dict[str, Any]:
    return {"study_instance_uid": series.study_instance_uid, "series_instance_uid": series.series_instance_uid or None,
            "sop_instance_uid": sop.sop_instance_uid if sop else None, "sop_class_uid": sop.sop_class_uid if sop else None,
            "in_census": True, "state": InstanceState.UNRESOLVED.value, "reason": why, "run_id": run_id,
            "membership": "census"}


def _gap_rows(series: CensusSeries, rows: list[dict[str, Any]], run_id: str) -> list[dict[str, Any]]:
    """Unresolved rows for what a series with a census gap is known to hold
    but nobody could name: the PACS's count minus the members found, or one
    row when the count is unknown and the census failed."""
    members = sum(1 for r in rows if r["in_census"] and r["series_instance_uid"] == series.series_instance_uid
                  and r["study_instance_uid"] == series.study_instance_uid)
    failed = (series.census_gap or "").startswith(ReasonCode.CENSUS_FAILED.value)
    if series.reported_instances is not None:
        deficit = series.reported_instances - members
    else:
        deficit = 1 if failed else 0
    why = series.census_gap if failed else reason(ReasonCode.NOT_RECEIVED, "not-sent")
    return [_unresolved(series, None, why or "", run_id) for _ in range(max(0, deficit))]


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
) -> PartitionCounts:
    """Move one partition and write its transfer manifest.

    Every instance of the census ends ``migrated``, ``quarantined`` or
    ``unresolved``; instances that arrived unasked are quarantined too.
    ``series`` are retrieved; ``carried`` (rows of an earlier manifest, for
    series not retrieved again) join the manifest as they were, with
    ``load_action`` ``carried`` (see :func:`plan_resume`). ``normalizer``:
    normalize processes for the same ``ruleset`` and ``source_ae`` (None:
    normalize in the load threads).
    """
    if normalizer is not None and (normalizer.ruleset != ruleset or normalizer.source_ae != source_ae):
        raise ValueError("normalizer was made for another rule set or source AE")
    ctx = _Load(PartitionManifests(store, partition), run_id, ruleset, source_ae, times, normalizer)
    staging = staging_root / ctx.writer / partition.hive_path
    if staging.exists():
        shutil.rmtree(staging)  # a retried task starts clean
    members = _Membership(series)
    held: dict[str, list[ReceivedInstance]] = {}
    # Each instance is normalized and loaded as soon as it is staged, while
    # the rest of the partition is still arriving.
    pool = ThreadPoolExecutor(max_workers=upload_threads, thread_name_prefix="load")
    futures = []

    def submit(item: ReceivedInstance) -> None:
        if members.held(item):
            held.setdefault(item.sop_instance_uid, []).append(item)
            return
        expected, membership = members.place(item)
        futures.append(pool.submit(_process, ctx, expected, item, membership))

    sink = StagingSink(staging, on_received=submit)
    try:
        started = time.perf_counter()
        retrievals = {r.series_instance_uid: r for r in retrieve_partition(get, series, sink, attempts, max_associations)}
        if times:
            times.retrieve_s += time.perf_counter() - started
            times.bytes_received += sum(r.size for r in sink.received.values())
        started = time.perf_counter()
        futures.extend(pool.submit(members.copy_rows, ctx, copies) for copies in held.values())
        pool.shutdown(wait=True)
        rows: list[dict[str, Any]] = []
        for f in futures:
            value = f.result()
            rows.extend(value if isinstance(value, list) else [value[0]])
        if times:
            times.process_s += time.perf_counter() - started
        for s in series:
            for i in s.instances:
                if i.sop_instance_uid not in sink.received:
                    rows.append(_unresolved(s, i, reason(ReasonCode.NOT_RECEIVED,
                                                         retrievals[s.series_instance_uid].why_missing(i.sop_instance_uid)),
                                            run_id))
            if s.census_gap:
                rows.extend(_gap_rows(s, rows, run_id))
        if carried is not None and len(carried):
            rows.extend({**r, "load_action": CARRIED} for r in carried.to_dict("records"))
        df = transfer_frame(sorted(rows, key=lambda r: (not r["in_census"], r["sop_instance_uid"] or "",
                                                        r.get("series_instance_uid") or "")))
        ctx.manifests.write_transfer(df)
        counts = counts_from_frame(df)
        log.info("partition %s: %s", partition.key, counts.summary())
        return counts
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(staging, ignore_errors=True)


if __name__ == "__main__":
    serve_normalize()
