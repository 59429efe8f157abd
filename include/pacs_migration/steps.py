"""The pipeline's steps, one function each, shared by the DAGs
(``pacs_migration`` runs them as separate tasks, ``pacs_nightly`` per unit):
census, transfer, validate, lineage, and :func:`migrate_unit`, which chains
them over one study date for the nightly plan."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from .census import Census, census_hash, take_census
from .config import MigrationConfig
from .counts import PartitionCounts, counts_from_frame
from .dimse import FindSession
from .lineage import lineage_record
from .manifest import PartitionManifests
from .normalize_processes import normalize_processes
from .partition import Partition
from .plan import Unit
from .retrieve import GetFn
from .store import ObjectStore
from .transfer import plan_resume, transfer_partition
from .validate import ValidationReport, validate_partition

log = logging.getLogger(__name__)

RetrieverFactory = Callable[[], AbstractContextManager[GetFn]]


def take_date_census(cfg: MigrationConfig, study_date: dt.date) -> Census:
    with FindSession(cfg.source) as session:
        return take_census(
            session.find,
            study_date,
            cfg.source.find_limit,
            cfg.source.census_split_depth,
            cfg.source.find_limit_instances,
        )


def record_census(store: ObjectStore, census: Census, partition: Partition) -> str:
    """Write a partition's expected set and its summary (hash, counts,
    warnings), read back; returns the census hash that travels with the
    partition (the later steps refuse a manifest with another)."""
    summary = PartitionManifests(store, partition).write_census(
        census.for_partition(partition), [w.code for w in census.warnings_for(partition)]
    )
    return summary.census_sha256


def transfer_step(
    cfg: MigrationConfig,
    store: ObjectStore,
    partition: Partition,
    run_id: str,
    get: GetFn,
    max_associations: int,
    resume: bool = False,
    census_sha256: str | None = None,
) -> PartitionCounts:
    """Retrieve, normalize and load one partition. ``resume``: retrieve only
    the series with instances not yet migrated (delta sync), carrying the rest.
    ``census_sha256``: this run's census (a stale manifest is refused)."""
    manifests = PartitionManifests(store, partition)
    series = manifests.census(census_sha256)
    carried = None
    if resume:
        series, carried = plan_resume(series, manifests.transfer_or_none())
    instances = sum(len(s.instances) for s in series)
    processes = cfg.normalize_processes if instances >= cfg.normalize_processes_from else 0
    normalizer = normalize_processes(processes, cfg.ruleset, cfg.source.called_ae_title)
    log.info(
        "partition %s: %d instances to retrieve, normalized in %s",
        partition.key,
        instances,
        f"{processes} normalize process(es)" if processes else "the load threads",
    )
    try:
        return transfer_partition(
            get=get,
            store=store,
            partition=partition,
            series=series,
            staging_root=cfg.staging_dir,
            run_id=run_id,
            attempts=cfg.source.retrieve_attempts,
            max_associations=max_associations,
            upload_threads=cfg.target.upload_threads,
            ruleset=cfg.ruleset,
            source_ae=cfg.source.called_ae_title,
            carried=carried,
            normalizer=normalizer,
        )
    finally:
        if normalizer is not None:
            normalizer.close()


def validate_step(
    cfg: MigrationConfig, store: ObjectStore, partition: Partition, run_id: str, census_sha256: str | None = None
) -> ValidationReport:
    """Validate one partition and record the verdict with the run that reached it."""
    manifests = PartitionManifests(store, partition)
    series = manifests.census(census_sha256)
    summary = manifests.summary()
    result = validate_partition(
        store,
        partition,
        series,
        manifests.transfer(),
        cfg.validation,
        census_warnings=list(summary.warnings) if summary else [],
    )
    manifests.write_verdict(result.to_json(), run_id)
    return result


def lineage_step(
    cfg: MigrationConfig, store: ObjectStore, partition: Partition, run_id: str, dag_id: str, endpoint: str | None
) -> dict[str, Any]:
    """Build and store the partition's lineage record (this run's, and the latest)."""
    manifests = PartitionManifests(store, partition)
    transfer_df = manifests.transfer()
    summary = manifests.summary()
    record = lineage_record(
        run_id=run_id,
        dag_id=dag_id,
        partition=partition,
        source=cfg.source,
        census_sha256=summary.census_sha256 if summary else "",
        counts=counts_from_frame(transfer_df).to_json(),
        transfer=transfer_df,
        validation=manifests.verdict(run_id),
        bucket=cfg.target.bucket,
        prefix=cfg.target.prefix,
        endpoint=endpoint,
        ruleset=cfg.ruleset,
    )
    manifests.write_lineage(record, run_id)
    return record


def _is_settled(store: ObjectStore, partition: Partition, digest: str) -> bool:
    """Validated, and the source holds exactly what it held then."""
    manifests = PartitionManifests(store, partition)
    summary = manifests.summary()
    verdict = manifests.latest_verdict() or {}
    return summary is not None and summary.census_sha256 == digest and bool(verdict.get("success"))


def migrate_unit(
    cfg: MigrationConfig,
    store: ObjectStore,
    unit: Unit,
    run_id: str,
    dag_id: str,
    retriever: RetrieverFactory,
    max_associations: int,
    endpoint: str | None = None,
    emit: Callable[[dict[str, Any]], Any] | None = None,
) -> dict[str, Any]:
    """Census one study date and move each of the unit's partitions that is
    not settled: new, failed before, or changed at the source since (delta
    sync: only the series with new instances are retrieved; nothing already
    migrated is rewritten). Returns the unit's result for the ledger."""
    started = time.monotonic()
    census = take_date_census(cfg, unit.study_date)
    results: list[dict[str, Any]] = []
    moved = 0
    for partition in (p for p in census.partitions() if unit.wants(p.modality)):
        digest = census_hash(census.for_partition(partition))
        if _is_settled(store, partition, digest):
            results.append({"partition": partition.key, "action": "unchanged", "validation_passed": True})
            continue
        had_manifest = PartitionManifests(store, partition).summary() is not None
        digest = record_census(store, census, partition)
        with retriever() as get:
            counts = transfer_step(
                cfg, store, partition, run_id, get, max_associations, resume=had_manifest, census_sha256=digest
            )
        report = validate_step(cfg, store, partition, run_id, digest)
        record = lineage_step(cfg, store, partition, run_id, dag_id, endpoint)
        if emit:
            emit(record)
        moved += counts.written
        results.append(
            {
                "partition": partition.key,
                "action": "delta" if had_manifest else "migrated",
                "validation_passed": report.success,
                **counts.to_json(),
            }
        )
    ok = all(r["validation_passed"] for r in results)
    return {
        "unit": unit.to_json(),
        "state": "done" if ok else "failed",
        "migrated": moved,
        "seconds": round(time.monotonic() - started, 3),
        "partitions": results,
    }
