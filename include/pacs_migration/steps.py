"""The pipeline's steps, one function each, shared by the DAGs
(``pacs_migration`` runs them as separate tasks, ``pacs_nightly`` per unit):
census, transfer, validate, lineage, and :func:`migrate_unit`, which chains
them over one study date for the nightly plan."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from .census import Census, census_hash, take_census
from .config import MigrationConfig
from .dimse import FindSession
from .lineage import lineage_record
from .manifest import LINEAGE, VALIDATION, read_census, read_json, read_transfer, write_census, write_json
from .partition import Partition
from .plan import Unit
from .retrieve import GetFn
from .store import ObjectStore
from .transfer import PartitionCounts, counts_from_frame, normalize_processes, plan_resume, transfer_partition
from .validate import ValidationReport, validate_partition

log = logging.getLogger(__name__)

CENSUS_SUMMARY = "census.json"
RetrieverFactory = Callable[[], AbstractContextManager[GetFn]]


def take_date_census(cfg: MigrationConfig, study_date: dt.date) -> Census:
    with FindSession(cfg.source) as session:
        return take_census(session.find, study_date, cfg.source.find_limit, cfg.source.census_split_depth)


def record_census(store: ObjectStore, census: Census, partition: Partition) -> str:
    """Write a partition's expected set and its summary (hash, counts, warnings)."""
    series = census.for_partition(partition)
    write_census(store, partition, series)
    digest = census_hash(series)
    write_json(store, partition, CENSUS_SUMMARY, {
        "census_sha256": digest,
        "series": len(series),
        "instances": sum(len(s.instances) for s in series),
        "warnings": [w.code for w in census.warnings_for(partition)],
    })
    return digest


def transfer_step(cfg: MigrationConfig, store: ObjectStore, partition: Partition, run_id: str, get: GetFn,
                  max_associations: int, resume: bool = False) -> PartitionCounts:
    """Retrieve, normalize and load one partition. ``resume``: retrieve only
    the series with instances not yet migrated (delta sync), carrying the rest."""
    series = read_census(store, partition)
    carried = None
    if resume:
        try:
            previous = read_transfer(store, partition)
        except Exception:  # no earlier manifest
            previous = None
        series, carried = plan_resume(series, previous)
    instances = sum(len(s.instances) for s in series)
    processes = cfg.normalize_processes if instances >= cfg.normalize_processes_from else 0
    normalizer = normalize_processes(processes, cfg.ruleset, cfg.source.called_ae_title)
    log.info("partition %s: %d instances to retrieve, normalized in %s", partition.key, instances,
             f"{processes} normalize process(es)" if processes else "the load threads")
    try:
        return transfer_partition(
            get=get, store=store, partition=partition, series=series, staging_root=cfg.staging_dir, run_id=run_id,
            attempts=cfg.source.retrieve_attempts, max_associations=max_associations,
            upload_threads=cfg.target.upload_threads, ruleset=cfg.ruleset, source_ae=cfg.source.called_ae_title,
            carried=carried, normalizer=normalizer,
        )
    finally:
        if normalizer is not None:
            normalizer.close()


def validate_step(cfg: MigrationConfig, store: ObjectStore, partition: Partition, run_id: str) -> ValidationReport:
    """Validate one partition and record the verdict with the run that reached it."""
    warnings = (read_json(store, partition, CENSUS_SUMMARY) or {}).get("warnings", [])
    result = validate_partition(store, partition, read_census(store, partition), read_transfer(store, partition),
                                cfg.validation, census_warnings=warnings)
    write_json(store, partition, VALIDATION, {**result.to_json(), "run_id": run_id})
    return result


def lineage_step(cfg: MigrationConfig, store: ObjectStore, partition: Partition, run_id: str, dag_id: str,
                 endpoint: str | None) -> dict[str, Any]:
    """Build and store the partition's lineage record (this run's, and the latest)."""
    transfer_df = read_transfer(store, partition)
    validation = read_json(store, partition, VALIDATION)
    if validation is not None and validation.get("run_id") != run_id:
        validation = None  # a previous run's verdict is not this run's
    record = lineage_record(
        run_id=run_id, dag_id=dag_id, partition=partition, source=cfg.source,
        census_sha256=(read_json(store, partition, CENSUS_SUMMARY) or {}).get("census_sha256", ""),
        counts=counts_from_frame(transfer_df).to_json(), transfer=transfer_df, validation=validation,
        bucket=cfg.target.bucket, prefix=cfg.target.prefix, endpoint=endpoint, ruleset=cfg.ruleset,
    )
    write_json(store, partition, f"lineage/{hashlib.sha256(run_id.encode()).hexdigest()[:16]}.json", record)
    write_json(store, partition, LINEAGE, record)
    return record


def _is_settled(store: ObjectStore, partition: Partition, digest: str) -> bool:
    """Validated, and the source holds exactly what it held then."""
    summary = read_json(store, partition, CENSUS_SUMMARY) or {}
    verdict = read_json(store, partition, VALIDATION) or {}
    return summary.get("census_sha256") == digest and bool(verdict.get("success"))


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
        had_manifest = read_json(store, partition, CENSUS_SUMMARY) is not None
        record_census(store, census, partition)
        with retriever() as get:
            counts = transfer_step(cfg, store, partition, run_id, get, max_associations, resume=had_manifest)
        report = validate_step(cfg, store, partition, run_id)
        record = lineage_step(cfg, store, partition, run_id, dag_id, endpoint)
        if emit:
            emit(record)
        moved += counts.written
        results.append({"partition": partition.key, "action": "delta" if had_manifest else "migrated",
                        "validation_passed": report.success, **counts.to_json()})
    ok = all(r["validation_passed"] for r in results)
    return {"unit": unit.to_json(), "state": "done" if ok else "failed", "migrated": moved,
            "seconds": round(time.monotonic() - started, 3), "partitions": results}

