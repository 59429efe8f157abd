"""Per-partition lineage record: enough to trace any instance to its source
and to every change made to it (JSON beside the manifests)."""

from __future__ import annotations

import datetime as dt
import hashlib
from importlib.metadata import version
from typing import Any

import pandas as pd

from . import __version__
from .config import SourceConfig
from .counts import PartitionCounts
from .manifest import PartitionManifests, source_label
from .reasons import InstanceState
from .rules import STRUCTURAL, RuleSet


def _rule_counts(transfer: pd.DataFrame) -> dict[str, int]:
    """How many instances each rule changed."""
    counts: dict[str, int] = {}
    for value in transfer.get("rules_applied", pd.Series(dtype=object)).dropna():
        for rule_id in str(value).split(";"):
            counts[rule_id] = counts.get(rule_id, 0) + 1
    return dict(sorted(counts.items()))


def checksum_summary(transfer: pd.DataFrame) -> dict[str, Any]:
    migrated = transfer[transfer["state"] == InstanceState.MIGRATED.value]
    lines = sorted(f"{k} {s}" for k, s in zip(migrated["object_key"], migrated["object_sha256"], strict=True))
    return {
        "algorithm": "SHA-256",
        "objects": len(lines),
        "bytes": int(migrated["object_size"].fillna(0).sum()),
        "digest_of_key_checksum_list": hashlib.sha256("\n".join(lines).encode()).hexdigest(),
    }


def lineage_record(
    *,
    run_id: str,
    dag_id: str,
    manifests: PartitionManifests,
    source: SourceConfig,
    census_sha256: str,
    counts: PartitionCounts,
    transfer: pd.DataFrame,
    validation: dict[str, Any] | None,
    endpoint: str | None,
    ruleset: RuleSet = STRUCTURAL,
    supersedes: list[dict[str, Any]] | None = None,
    query: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the record; it carries UIDs and hashes, never patient attributes.
    ``supersedes``: the rollbacks (and the runs they undid) this run's objects
    replace (:func:`rollback.superseded`). ``query``: what the census asked
    (default: the partition's date and modality)."""
    partition, target = manifests.partition, manifests.store.target
    migrated = transfer[transfer["state"] == InstanceState.MIGRATED.value]
    changed = transfer["changes"].dropna()
    return {
        "schema": "pacs-migration/lineage/1",
        "recorded_at": dt.datetime.now(dt.UTC).isoformat(),
        "run_id": run_id,
        "dag_id": dag_id,
        "partition": partition.key,
        "source": {
            "name": source_label(partition.source),
            "uri": f"dicom://{source.host}:{source.port}/{source.called_ae_title}",
            "issuer_of_patient_id": source.issuer_of_patient_id,
            "calling_ae_title": source.calling_ae_title,
            "retrieve_method": source.retrieve_method,
            "query": query
            or {"QueryRetrieveLevel": "STUDY", "StudyDate": partition.dicom_date, "Modality": partition.modality},
        },
        "supersedes": list(supersedes or []),
        "census_sha256": census_sha256,
        "ruleset": {
            "id": ruleset.id,
            "version": ruleset.version,
            "instances_changed": int(len(changed)),
            "rules_applied": _rule_counts(transfer),
        },
        "counts": counts.to_json(),
        "target": {
            "uri": f"s3://{target.bucket}/{target.prefix}",
            "datasets": {"objects": manifests.objects_dataset, "manifests": manifests.manifests_dataset},
            "endpoint": endpoint,
            "keys": sorted(migrated["object_key"].tolist()),
            "quarantine_keys": sorted(transfer["quarantine_key"].dropna().tolist()),
        },
        "checksums": checksum_summary(transfer),
        # instances another archive's copy stands for (already present from it, or in conflict with it)
        "other_sources": {str(k): int(v) for k, v in transfer["other_source"].dropna().value_counts().items()},
        "validation": {
            "success": None if validation is None else bool(validation.get("success")),
            "failed_expectations": [] if validation is None else list(validation.get("failed_expectations", [])),
            "artifacts": [] if validation is None else list(validation.get("artifacts", [])),
        },
        "software": {
            "pacs_migration": __version__,
            "pydicom": version("pydicom"),
            "pynetdicom": version("pynetdicom"),
            "great_expectations": version("great-expectations"),
        },
    }
