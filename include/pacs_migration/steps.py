"""The pipeline's steps, one function each, shared by the DAGs
(``pacs_migration`` runs them as separate tasks, ``pacs_nightly`` per unit):
census, transfer, validate, lineage, and :func:`migrate_unit`, which chains
them over one study date for the nightly plan. Every I/O comes in through
:class:`Services`, built once by the Airflow glue (tests and tools build their own)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from . import coverage, references, study_index
from .audit import AuditTrail, Outcome
from .census import Census, census_hash, take_census, take_study_census
from .config import MigrationConfig, SourceConfig
from .counts import PartitionCounts, counts_from_frame
from .dimse import FindSession, retriever
from .lease import DateLease, LeaseHeld
from .ledger_store import read_ledger, update_ledger
from .lineage import lineage_record
from .manifest import PartitionManifests
from .normalize_processes import NormalizeProcesses, normalize_processes
from .partition import Partition
from .plan import PartitionAction, PartitionResult, Unit, UnitResult, UnitState, reopen
from .privacy import PatientKeyer
from .reasons import ReasonCode
from .reports.check import validate_reports
from .reports.intake import import_folder
from .reports.ledger import ReportLedger
from .reports.place import REPORTS_MODALITY, ReportCounts, index_partition_of, place_reports
from .request import RunRequest
from .retrieve import GetFn
from .rollback import (
    RollbackPlan,
    RollbackRefused,
    Selection,
    execute,
    plan_rollback,
    purge,
    read_record,
    superseded,
)
from .rules import RuleSet
from .store import ObjectStore
from .transfer import plan_resume, transfer_partition
from .validate import ValidationReport, validate_partition

log = logging.getLogger(__name__)

RetrieverFactory = Callable[[], AbstractContextManager[GetFn]]
FindFactory = Callable[[], AbstractContextManager[Any]]  # yields an object with .find(identifier)


@dataclass(frozen=True)
class Services:
    """What the steps read, write and talk to."""

    config: MigrationConfig
    store: ObjectStore
    max_associations: int  # this task's share of the PACS pool
    endpoint: str | None = None  # the S3 endpoint, for lineage
    emit: Callable[[dict[str, Any]], Any] | None = None  # lineage events (OpenLineage)
    retriever: RetrieverFactory | None = None  # default: C-GET or C-MOVE as configured
    finder: FindFactory | None = None  # default: a C-FIND session to the source
    clock: Callable[[], float] = field(default=time.monotonic)
    patient_secret: str | bytes | None = field(default=None, repr=False)  # see privacy.py
    actor: str = "pacs-migration"  # who started the work, for the audit trail (e.g. the Airflow run)
    source_name: str = ""  # the legacy archive this task talks to (config.sources; "": config.source)

    @property
    def source(self) -> SourceConfig:
        return self.config.source_named(self.source_name)

    def for_source(self, name: str) -> Services:
        """The same services, talking to another legacy archive (a partition's)."""
        return self if name == self.source_name else dataclasses.replace(self, source_name=name)

    @property
    def ruleset(self) -> RuleSet:
        """The rule set, with this source's Issuer of Patient ID for instances that carry none."""
        issuer = self.source.issuer_of_patient_id
        return dataclasses.replace(self.config.ruleset, default_issuer=issuer) if issuer else self.config.ruleset

    def keyer(self) -> PatientKeyer:
        """Fails naming where the secret is expected when it is not there."""
        return PatientKeyer.from_secret(self.patient_secret)

    def retrieve(self, trail: AuditTrail | None = None) -> AbstractContextManager[GetFn]:
        if self.retriever:
            return self.retriever()
        alert = trail.router_alert if trail else None
        return retriever(self.source, self.config.staging_dir, on_alert=alert)

    def audit(self) -> AuditTrail:
        """This task's audit trail (flush it, or use ``with services.audit().session()``)."""
        return AuditTrail(self.store, self.config.audit, self.source, self.actor)

    def find_session(self) -> AbstractContextManager[Any]:
        return self.finder() if self.finder else FindSession(self.source)

    def normalizer(self, instances: int) -> NormalizeProcesses | None:
        """Normalize processes for a partition of ``instances`` (None: normalize in the load threads)."""
        cfg = self.config
        processes = cfg.normalize_processes if instances >= cfg.normalize_processes_from else 0
        n = cfg.normalization
        return normalize_processes(
            processes, self.ruleset, self.source.called_ae_title, n.instance_seconds, n.stream_from_mb << 20
        )

    def manifests(self, partition: Partition) -> PartitionManifests:
        return PartitionManifests(self.store, partition)

    def lease(self, study_date: dt.date, holder: str) -> DateLease:
        """Take (or take again, as the same holder) the date's lease; see :mod:`lease`."""
        t = self.config.timeouts
        return DateLease(self.store, study_date, holder, t.lease_ttl_seconds).acquire(t.lease_wait_seconds)


def run_started(services: Services) -> None:
    """Audit: the application's activity for this run begins (110100 start)."""
    with services.audit().session() as trail:
        trail.application(start=True)


def run_ended(services: Services, success: bool) -> None:
    """Audit: the run's end (110100 stop; outcome 4 when it did not pass)."""
    with services.audit().session() as trail:
        trail.application(start=False, outcome=Outcome.SUCCESS if success else Outcome.MINOR_FAILURE)


def take_date_census(services: Services, study_date: dt.date) -> Census:
    """The date's census of the services' source; every C-FIND of it is audited (110112)."""
    source = services.source
    with services.audit().session() as trail, services.find_session() as session:
        census = take_census(
            trail.auditing_find(session.find),
            study_date,
            source.find_limit,
            source.census_split_depth,
            source.find_limit_instances,
            source.census_associations,
        )
    return dataclasses.replace(census, source=services.source_name)


def take_studies_census(
    services: Services, study_uids: tuple[str, ...], accession_numbers: tuple[str, ...] = ()
) -> list[Census]:
    """The census of just the requested studies, one per StudyDate they fall on (audited as a date's)."""
    source = services.source
    with services.audit().session() as trail, services.find_session() as session:
        found = take_study_census(
            trail.auditing_find(session.find),
            study_uids,
            accession_numbers,
            source.find_limit,
            source.census_split_depth,
            source.find_limit_instances,
            missing_ok=len(services.config.archives) > 1,  # another archive may hold it (see requested_not_found)
        )
    return [dataclasses.replace(c, source=services.source_name) for c in found]


def requested_not_found(request: RunRequest, partitions: list[dict[str, Any]]) -> list[str]:
    """The requested StudyInstanceUIDs no source archive's census found (several archives: each
    skips what it does not hold), or the whole request when nothing at all was found."""
    if not request.by_study:
        return []
    found = {u for p in partitions for u in p.get("studies") or ()}
    if not found:
        return ["the requested studies: no source archive holds any of them"]
    return [f"study_uids[{i}]" for i, uid in enumerate(request.study_uids) if uid not in found]


def record_census(services: Services, census: Census, partition: Partition, studies: Any = None) -> str:
    """Write a partition's expected set and its summary (hash, counts,
    warnings), read back; returns the census hash that travels with the
    partition (the later steps refuse a manifest with another).

    ``studies`` (a run of requested studies): their series replace theirs in
    the partition's census already there; the date's other studies stay expected."""
    manifests = services.manifests(partition)
    series, warnings = census.for_partition(partition), [w.code for w in census.warnings_for(partition)]
    if studies is not None and (before := manifests.summary()) is not None:
        kept = [s for s in manifests.census() if s.study_instance_uid not in set(studies)]
        series, warnings = kept + series, sorted({*before.warnings, *warnings})
    return manifests.write_census(series, warnings).census_sha256


def transfer_step(
    services: Services,
    partition: Partition,
    run_id: str,
    resume: bool = False,
    census_sha256: str | None = None,
    studies: Any = None,
    should_stop: Callable[[], bool] | None = None,
) -> PartitionCounts:
    """Retrieve, normalize and load one partition. ``resume``: retrieve only
    the series with instances not yet migrated (delta sync), carrying the rest.
    ``census_sha256``: this run's census (a stale manifest is refused).
    ``studies``: retrieve only these (a run of requested studies); the rows of
    the partition's other studies are carried as they are. ``should_stop``:
    the clinical window (see :func:`transfer.transfer_partition`)."""
    services = services.for_source(partition.source)
    cfg, source, manifests = services.config, services.source, services.manifests(partition)
    keyer = services.keyer()  # before any retrieval: a missing secret fails the task at once
    series = manifests.census(census_sha256)
    carried = None
    if resume:
        series, carried = plan_resume(series, manifests.transfer_or_none())
    elif studies is not None:
        series, carried = _requested(series, manifests.transfer_or_none(), set(studies))
    instances = sum(len(s.instances) for s in series)
    normalizer = services.normalizer(instances)
    where = f"{normalizer.count} normalize process(es)" if normalizer else "the load threads"
    log.info("partition %s: %d instances to retrieve, normalized in %s", partition.key, instances, where)
    trail, began = services.audit(), dt.datetime.now(dt.UTC)
    try:
        with trail.session():  # the audit records are written whatever happens
            try:
                with services.retrieve(trail) as get:
                    counts = transfer_partition(
                        get=get,
                        store=services.store,
                        partition=partition,
                        series=series,
                        staging_root=cfg.staging_dir,
                        run_id=run_id,
                        attempts=source.retrieve_attempts,
                        max_associations=min(source.max_associations, services.max_associations),
                        upload_threads=cfg.target.upload_threads,
                        ruleset=services.ruleset,
                        source_ae=source.called_ae_title,
                        carried=carried,
                        normalizer=normalizer,
                        keyer=keyer,
                        should_stop=should_stop,
                        stream_from=cfg.normalization.stream_from_mb << 20,
                    )
            except BaseException:
                trail.transfer(_expected_rows(series), began, failed=True)  # what this run set out to move
                raise
            trail.transfer(manifests.transfer(run_id).to_dict("records"), began)
            return counts
    finally:
        if normalizer is not None:
            normalizer.close()


def _requested(series: list[Any], previous: Any, studies: set[str]) -> tuple[list[Any], Any]:
    """(the requested studies' series, every row of the other studies)."""
    fetch = [s for s in series if s.study_instance_uid in studies]
    return fetch, None if previous is None else previous[~previous["study_instance_uid"].isin(studies)]


def _expected_rows(series: list[Any]) -> list[dict[str, Any]]:
    return [{"study_instance_uid": s.study_instance_uid, "state": "unresolved"} for s in series for _ in s.instances]


def validate_step(
    services: Services, partition: Partition, run_id: str, census_sha256: str | None = None
) -> ValidationReport:
    """Validate one partition and record the verdict with the run that reached it."""
    manifests = services.manifests(partition)
    series = manifests.census(census_sha256)
    summary = manifests.summary()
    result = validate_partition(
        services.store,
        partition,
        series,
        manifests.transfer(run_id),
        services.config.validation,
        census_warnings=list(summary.warnings) if summary else [],
        index=True,  # lineage's index update then reads no header again
    )
    manifests.write_verdict(result.to_json(), run_id)
    return result


def lineage_step(
    services: Services, partition: Partition, run_id: str, dag_id: str, studies: Any = None
) -> dict[str, Any]:
    """Build and store the partition's lineage record (this run's, and the
    latest); emit it. ``studies``: the run moved just these (its census asked for them)."""
    services = services.for_source(partition.source)
    manifests = services.manifests(partition)
    transfer_df = manifests.transfer(run_id)
    summary = manifests.summary()
    record = lineage_record(
        run_id=run_id,
        dag_id=dag_id,
        manifests=manifests,
        source=services.source,
        census_sha256=summary.census_sha256 if summary else "",
        counts=counts_from_frame(transfer_df),
        transfer=transfer_df,
        validation=manifests.verdict(run_id),
        endpoint=services.endpoint,
        ruleset=services.ruleset,
        supersedes=_superseded(manifests, run_id),
        query={"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": sorted(studies)} if studies is not None else None,
    )
    manifests.write_lineage(record, run_id)
    _index(services, [partition], {partition: transfer_df})
    study_index.update(services.store, [partition], {partition: transfer_df})
    if services.emit:
        services.emit(record)
    return record


def reports_step(services: Services, study_date: dt.date, run_id: str, partitions: list[Partition]) -> dict[str, Any]:
    """After every partition of the date: the RIS export read into the inbox,
    the date's reports placed in their studies and validated, and the
    references of the date's presentation states, KOS and SRs checked (a
    dangling one fails its partition's verdict of this run)."""
    cfg, store = services.config.reports, services.store
    if cfg.export_dir is not None:
        import_folder(store, cfg.export_dir, cfg.accession_field, cfg.default_charset)
    verdict, ledger = _place_reports(services, study_date, run_id)
    study_index.index_partition(store, index_partition_of(study_date), ReportLedger(store, study_date).objects(ledger))
    dangling = {}
    for check in references.check_date(store, study_date, [p for p in partitions if p.study_date == study_date]):
        if references.amend_verdict(store, check, run_id) is not None and check.dangling:
            dangling[check.partition.key] = len(check.dangling)
    counts = ReportCounts.of(ledger if verdict is not None else None)
    log.info("reports %s: %s", study_date, counts.to_json())
    return {
        "study_date": study_date.isoformat(),
        "reports": counts.to_json(),
        "reports_passed": None if verdict is None else verdict["success"],
        "dangling_references": dangling,
    }


def _place_reports(services: Services, study_date: dt.date, run_id: str) -> tuple[dict[str, Any] | None, Any]:
    """Place the date's messages (audited), write the ledger and validate it as
    stored: (the verdict, the ledger read back); no verdict when the date has no message."""
    cfg, store = services.config.reports, services.store
    rows, objects = place_reports(
        store,
        study_date,
        run_id,
        cfg.accession_field,
        cfg.default_charset,
        cfg.match_days,
        services.config.ruleset.crosswalk,
        services.keyer(),
    )
    with services.audit().session() as trail:
        trail.reports_stored(rows)
    ledger = ReportLedger(store, study_date)
    if not rows:
        return None, ledger.read()
    ledger.write(rows, run_id)
    written = ledger.read()  # the ledger as stored must account for every message placed
    assert written is not None
    verdict = validate_reports(store, study_date, written, objects, len(rows))
    ledger.write_verdict(verdict, run_id)
    return verdict, written


def _index(services: Services, partitions: list[Partition], transfers: dict[Partition, Any] | None = None) -> None:
    """The dashboard's coverage index; losing every race only makes it stale (``index-rebuild``)."""
    try:
        coverage.update(services.store, partitions, transfers=transfers)
    except coverage.IndexContention as exc:
        log.warning("coverage index not updated: %s", exc)


def _superseded(manifests: PartitionManifests, run_id: str) -> list[dict[str, Any]]:
    """The rollbacks this run's lineage supersedes; a retried lineage task keeps its first answer."""
    if (mine := manifests.read_key_json(manifests.lineage_run_key(run_id))) is not None:
        return list(mine.get("supersedes", []))
    return superseded(manifests)


def _is_settled(manifests: PartitionManifests, digest: str) -> bool:
    """Validated, and the source holds exactly what it held then."""
    summary = manifests.summary()
    verdict = manifests.latest_verdict() or {}
    return summary is not None and summary.census_sha256 == digest and bool(verdict.get("success"))


def migrate_unit(
    services: Services, unit: Unit, run_id: str, dag_id: str, should_stop: Callable[[], bool] | None = None
) -> UnitResult:
    """Census one study date and move each of the unit's partitions that is
    not settled: new, failed before, or changed at the source since (delta
    sync: only the series with new instances are retrieved; nothing already
    migrated is rewritten).

    ``should_stop`` (the window closed): no partition starts after it says so,
    and the one under way asks for no further series; what was moved is
    recorded, the rest is ``WINDOW_CLOSED`` and the unit stays pending
    (``UnitState.WINDOW_CLOSED``): the next night resumes it as a delta."""
    started = services.clock()
    census = take_date_census(services, unit.study_date)
    results: list[PartitionResult] = []
    moved, closed = 0, False
    for partition in (p for p in census.partitions() if unit.wants(p.modality)):
        manifests = services.manifests(partition)
        if _is_settled(manifests, census_hash(census.for_partition(partition))):
            results.append(PartitionResult(partition.key, PartitionAction.UNCHANGED, True))
            continue
        if should_stop is not None and should_stop():
            closed = True
            break
        had_manifest = manifests.summary() is not None
        digest = record_census(services, census, partition)
        counts = transfer_step(services, partition, run_id, had_manifest, digest, should_stop=should_stop)
        moved += counts.written
        action = PartitionAction.DELTA if had_manifest else PartitionAction.MIGRATED
        if counts.reasons.get(ReasonCode.WINDOW_CLOSED.value):
            closed = True  # not validated: a later night finishes it
            lineage_step(services, partition, run_id, dag_id)
            results.append(PartitionResult(partition.key, action, False, counts))
            break
        report = validate_step(services, partition, run_id, digest)
        lineage_step(services, partition, run_id, dag_id)
        results.append(PartitionResult(partition.key, action, report.success, counts))
    if not closed and results:  # the date's reports and references, once its partitions are all in
        done = [Partition.parse(r.partition) for r in results]
        outcome = reports_step(services, unit.study_date, run_id, done)
        for i, r in enumerate(results):
            if outcome["dangling_references"].get(r.partition):
                results[i] = dataclasses.replace(r, validation_passed=False)
        reports_ok = outcome["reports_passed"] is not False
    else:
        reports_ok = True
    ok = all(r.validation_passed for r in results) and reports_ok
    state = UnitState.WINDOW_CLOSED if closed else UnitState.DONE if ok else UnitState.FAILED
    return UnitResult(unit, state, moved, round(services.clock() - started, 3), tuple(results))


def roll_back(
    services: Services,
    selection: Selection,
    reason: str,
    requested_by: str,
    rollback_id: str,
    dry_run: bool = True,
    moved_hook: Callable[[Any], Any] | None = None,
) -> dict[str, Any]:
    """Plan a rollback (``dry_run``: only that, writing nothing) or carry it
    out under the selected dates' leases, record it in the audit trail and
    reopen the nightly units it undid. An id whose journal exists resumes.

    Raises
    ------
    RollbackRefused
        A run holds one of the dates (it names the run).
    """
    store = services.store
    journal = read_record(store, rollback_id)
    if journal is not None:
        plan = RollbackPlan.from_json(journal["plan"])
    else:
        plan = plan_rollback(store, selection, reason, requested_by, rollback_id)
    if dry_run:
        return {"dry_run": True, "rollback_id": rollback_id, "totals": plan.totals(), "partitions": _figures(plan)}
    leases = []
    try:
        for day in sorted({p.partition.study_date for p in plan.partitions}):
            t = services.config.timeouts
            try:
                leases.append(DateLease(store, day, f"rollback/{rollback_id}", t.lease_ttl_seconds).acquire(0))
            except LeaseHeld as exc:
                raise RollbackRefused(f"rollback refused: {exc}; run it again when that run has ended") from None
        result = execute(store, plan, dt.datetime.now(dt.UTC), moved_hook)
    finally:
        for lease in leases:
            lease.release()
    study_index.update(services.store, [p.partition for p in plan.partitions])  # what left is not found any more
    _rollback_recorded(services, plan, result.record)
    return {"dry_run": False, "rollback_id": rollback_id, "resumed": result.resumed, **_summary(result.record)}


def _figures(plan: RollbackPlan) -> list[dict[str, Any]]:
    return [p.figures() for p in plan.partitions]


def _summary(record: dict[str, Any]) -> dict[str, Any]:
    plan = record["plan"]
    figures = [{k: v for k, v in p.items() if k not in _NOT_FIGURES} for p in plan["partitions"]]
    return {"state": record["state"], "totals": plan["totals"], "partitions": figures}


_NOT_FIGURES = {"run_ids", "study_uids", "patient_keys", "moved"}


def _rollback_recorded(services: Services, plan: RollbackPlan, record: dict[str, Any]) -> None:
    """Audit (110105 per partition) and the nightly ledger, once per rollback."""
    images = [p.partition for p in plan.partitions if p.partition.modality != REPORTS_MODALITY]
    sources = sorted({p.source for p in images}) or [""]
    if any(r.get("rollback_id") == plan.rollback_id for r in read_ledger(services.store, sources[-1]).rollbacks):
        return  # a resumed rollback recorded itself before (the last ledger it reopens is written last)
    with services.audit().session() as trail:
        for pp in plan.partitions:
            where = f"rolled-back/{plan.rollback_id}/"
            note = f"rollback {plan.rollback_id} of {pp.partition.key}: {len(pp.objects)} object(s) moved to {where}"
            trail.deleted(plan.requested_by, pp.study_uids, pp.patient_keys, f"{note}; reason: {plan.reason}")
    at = dt.datetime.fromisoformat(record["finished_at"])
    for source in sources:  # each source archive's nightly ledger reopens its own units
        parts = [(p.study_date, p.modality) for p in images if p.source == source]
        update_ledger(
            services.store,
            functools.partial(reopen, partitions=parts, rollback_id=plan.rollback_id, at=at),
            source=source,
        )
    _index(services, images)


def purge_rolled_back(services: Services, rollback_id: str, purged_by: str, reason: str) -> dict[str, Any]:
    """Delete a rollback's copies after its retention (:func:`rollback.purge`), audited (110105)."""
    before = read_record(services.store, rollback_id) or {}
    record = purge(
        services.store, rollback_id, dt.datetime.now(dt.UTC), services.config.rollback.retention_days, purged_by, reason
    )
    if before.get("state") == "purged":
        return {"rollback_id": rollback_id, "state": record["state"], "purged_at": record["purged_at"]}
    plan = RollbackPlan.from_json(record["plan"])
    with services.audit().session() as trail:
        for pp in plan.partitions:
            note = f"purge of rollback {rollback_id} ({pp.partition.key}): {len(pp.objects)} copy(ies) deleted"
            trail.deleted(purged_by, pp.study_uids, pp.patient_keys, f"{note}; reason: {reason}")
    return {"rollback_id": rollback_id, "state": record["state"], "purged_at": record["purged_at"]}


def census_step(
    services: Services, request: RunRequest, hold: Callable[[dt.date], AbstractContextManager[Any]]
) -> list[dict[str, Any]]:
    """The run's census: the date's (under its lease, ``hold``), or the
    requested studies' (each date they fall on held while its partitions'
    census is recorded). One entry per partition, with its census hash and,
    for requested studies, the studies it holds."""
    if request.by_study:
        censuses: list[Census | None] = list(
            take_studies_census(services, request.study_uids, request.accession_numbers)
        )
    else:
        censuses = [None]
    out = []
    for found in censuses:
        day = found.study_date if found is not None else request.study_date
        assert day is not None
        with hold(day):
            census = found or take_date_census(services, day)
            for p in census.partitions():
                if not request.wants(p.modality):
                    continue
                studies = sorted({s.study_instance_uid for s in census.for_partition(p)}) if found else None
                digest = record_census(services, census, p, studies)
                out.append({**p.to_json(), "census_sha256": digest, **({"studies": studies} if studies else {})})
    return out
