"""The fault suite's rig: a run of one study date the way ``pacs_migration``
runs it (the date's lease, census, per partition transfer -> validate ->
lineage, the report's figures and verdict, the lease given back), with the
core steps and real peers; and the invariants every scenario must end with."""

from __future__ import annotations

import datetime as dt
import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import boto3

from include.pacs_migration.config import MigrationConfig, ReportConfig, TargetConfig, TimeoutsConfig
from include.pacs_migration.counts import counts_from_frame
from include.pacs_migration.lease import DateLease
from include.pacs_migration.manifest import PartitionManifests
from include.pacs_migration.partition import Partition
from include.pacs_migration.report import (
    PartitionFigures,
    RunVerdict,
    TaskFailure,
    partition_figures,
    run_verdict,
)
from include.pacs_migration.steps import (
    Services,
    lineage_step,
    record_census,
    take_date_census,
    transfer_step,
    validate_step,
)
from include.pacs_migration.store import ObjectStore
from include.pacs_migration_airflow import error_label
from tests.conftest import PATIENT_SECRET
from tests.peers import loopback_source

DATE = dt.date(2019, 3, 1)
DAG_ID = "pacs_migration"


def migration_config(pacs_port: int, bucket: str, staging: Path, **target: float) -> MigrationConfig:
    """The embedded defaults, but a dead run's lease lapses after 30 s and a new run waits for it."""
    return MigrationConfig(
        source=loopback_source(pacs_port),
        target=TargetConfig(bucket=bucket, sse="none", **target),
        report=ReportConfig(recipients=("compliance@hospital.example",), from_address="pacs@hospital.example"),
        staging_dir=staging,
        timeouts=TimeoutsConfig(lease_ttl_seconds=30, lease_wait_seconds=60),
    )


def object_store(cfg: MigrationConfig, endpoint_url: str) -> ObjectStore:
    client = boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=cfg.target.client_config(),
    )
    return ObjectStore(client, cfg.target)


@dataclass(frozen=True)
class RunOutcome:
    run_id: str
    verdict: RunVerdict
    figures: tuple[PartitionFigures, ...]
    failures: tuple[TaskFailure, ...]
    partitions: tuple[Partition, ...]


def run_date(cfg: MigrationConfig, store: ObjectStore, run_id: str, date: dt.date = DATE) -> RunOutcome:
    """One run of the date, as the DAG's tasks run it; task failures are
    recorded (class only) as the DAG records them, never raised."""
    services = Services(cfg, store, cfg.source.max_associations, patient_secret=PATIENT_SECRET)
    holder = f"{DAG_ID}/{run_id}"
    failures: list[TaskFailure] = []
    partitions: list[Partition] = []
    digests: dict[str, str] = {}
    try:
        with services.lease(date, holder):
            census = take_date_census(services, date)
            partitions = census.partitions()
            digests = {p.key: record_census(services, census, p) for p in partitions}
    except Exception as exc:
        return RunOutcome(run_id, RunVerdict.INCOMPLETE, (), (TaskFailure("census", error_label(exc)),), ())
    for p in partitions:
        steps = (
            ("partition.transfer", lambda p=p: transfer_step(services, p, run_id, census_sha256=digests[p.key])),
            ("partition.validate", lambda p=p: _validate(services, p, run_id, digests[p.key])),
        )
        for task, step in steps:
            try:
                with services.lease(date, holder):
                    step()
            except Exception as exc:
                failures.append(TaskFailure(task, error_label(exc), p.key))
                try:  # the lineage task: only when validate did not finish
                    with services.lease(date, holder):
                        lineage_step(services, p, run_id, DAG_ID)
                except Exception as lineage_exc:
                    failures.append(TaskFailure("partition.lineage", error_label(lineage_exc), p.key))
                break
    try:  # the report task: S3 may be down too, then the report says so (as run_report does)
        figures = tuple(partition_figures(store, p, run_id) for p in partitions)
        DateLease(store, date, holder).release()  # the gate task
    except Exception as exc:
        figures = ()
        failures.append(TaskFailure("report", error_label(exc)))
    return RunOutcome(run_id, run_verdict(list(figures), tuple(failures)), figures, tuple(failures), tuple(partitions))


def _validate(services: Services, p: Partition, run_id: str, census_sha256: str) -> None:
    """The validate task: the verdict, then its lineage record."""
    validate_step(services, p, run_id, census_sha256)
    lineage_step(services, p, run_id, DAG_ID)


def etags(s3_client, bucket: str) -> dict[str, str]:
    """Every instance object's ETag (quarantine included)."""
    out: dict[str, str] = {}
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            if obj["Key"].startswith(("studies/", "quarantine/")) or "/quarantine/" in obj["Key"]:
                out[obj["Key"]] = obj["ETag"]
    return out


def assert_converged(
    store: ObjectStore, outcome: RunOutcome, staging: Path, before: dict[str, str], verdict=RunVerdict.PASSED
) -> dict[str, int]:
    """The invariants after a scenario's last run (``store``: straight to S3,
    no proxy). Returns the figures summed over the date."""
    client, bucket = store.client, store.bucket
    assert outcome.verdict is verdict, (outcome.verdict, [f.label for f in outcome.failures], outcome.figures)
    totals = {"expected": 0, "migrated": 0, "quarantined": 0, "unresolved": 0, "adopted": 0}
    migrated_keys: set[str] = set()
    for p, figures in zip(outcome.partitions, outcome.figures, strict=True):
        df = PartitionManifests(store, p).transfer(outcome.run_id)
        c = counts_from_frame(df)
        assert c.conserved, (p.key, c)  # conservation
        # the report's figures are the manifest's
        assert (figures.expected, figures.migrated, figures.quarantined, figures.unresolved) == (
            c.expected,
            c.migrated,
            c.quarantined,
            c.unresolved,
        ), p.key
        live = df[df["state"] == "migrated"]
        for key, sha in zip(live["object_key"], live["object_sha256"], strict=True):
            assert hashlib.sha256(store.get(key)).hexdigest() == sha, key  # every migrated object re-read
        migrated_keys |= set(live["object_key"])
        totals["adopted"] += int((df["reason"] == "ORPHAN_ADOPTED").sum())
        for k in ("expected", "migrated", "quarantined", "unresolved"):
            totals[k] += getattr(c, k)
    listed = {k for k in etags(client, bucket) if k.startswith("studies/")}
    assert listed == migrated_keys, (len(listed), len(migrated_keys))  # objects == migrated (+ adopted orphans)
    after = etags(client, bucket)
    rewritten = [k for k, e in before.items() if k in after and after[k] != e]
    assert not rewritten, rewritten  # no object rewritten
    assert not client.list_multipart_uploads(Bucket=bucket).get("Uploads"), "orphan multipart uploads"
    left = [p for p in staging.rglob("*") if p.is_file()] if staging.exists() else []
    assert not left, left  # nothing with patient data left on disk
    assert not list(Path(tempfile.gettempdir()).glob("tmp*.dcm"))
    return totals
