"""OpenLineage event for one migrated partition (openlineage-python, no Airflow).

Input dataset: the legacy PACS, ``dicom://<host>:<port>`` / ``<AE>``. Outputs:
the partition's instances (``s3://<bucket>`` / ``<prefix>studies``, with output
statistics) and its manifests. A custom run facet carries the counts, the census
hash, the rule set and the validation verdict. Emitted by the DAG through the
Airflow OpenLineage provider's configured transport.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, ClassVar

import attr
from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.facet_v2 import output_statistics_output_dataset, parent_run
from openlineage.client.generated.base import RunFacet
from openlineage.client.uuid import generate_static_uuid

from .counts import COUNT_FIELDS, PartitionCounts

PRODUCER = "https://github.com/pacs-migration/pacs-migration"
FACET_SCHEMA = "https://github.com/pacs-migration/pacs-migration/blob/main/docs/openlineage-facet.json"


@attr.define
class PacsMigrationRunFacet(RunFacet):
    """Counts and proof of one partition's migration (custom facet ``pacsMigration``)."""

    partition: str
    expected: int
    migrated: int
    quarantined: int
    unresolved: int
    unsolicited: int
    written: int
    censusSha256: str  # noqa: N815
    rulesetId: str  # noqa: N815
    rulesetVersion: str  # noqa: N815
    validationSuccess: bool | None  # noqa: N815
    failedExpectations: list[str] = attr.field(factory=list)  # noqa: N815
    reasons: dict[str, int] = attr.field(factory=dict)
    _additional_skip_redact: ClassVar[list[str]] = [
        "partition",
        "expected",
        "migrated",
        "quarantined",
        "unresolved",
        "unsolicited",
        "written",
        "censusSha256",
        "rulesetId",
        "rulesetVersion",
        "validationSuccess",
        "failedExpectations",
        "reasons",
    ]

    @staticmethod
    def _get_schema() -> str:
        return FACET_SCHEMA


def _facet(record: dict[str, Any]) -> PacsMigrationRunFacet:
    counts = PartitionCounts.from_json(record["counts"])
    validation = record.get("validation") or {}
    return PacsMigrationRunFacet(
        partition=record["partition"],
        **{f: getattr(counts, f) for f in COUNT_FIELDS},
        censusSha256=record["census_sha256"],
        rulesetId=record["ruleset"]["id"],
        rulesetVersion=str(record["ruleset"]["version"]),
        validationSuccess=validation.get("success"),
        failedExpectations=list(validation.get("failed_expectations", [])),
        reasons=dict(counts.reasons),
        producer=PRODUCER,
    )


def _outputs(record: dict[str, Any]) -> list[OutputDataset]:
    """The partition's objects (with output statistics) and its manifests, named as the record says."""
    counts = PartitionCounts.from_json(record["counts"])
    bucket_ns = "s3://" + record["target"]["uri"][len("s3://") :].split("/", 1)[0]
    datasets = record["target"]["datasets"]
    statistics = output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(
        rowCount=counts.migrated, size=record["checksums"]["bytes"], fileCount=counts.written
    )
    return [
        OutputDataset(namespace=bucket_ns, name=datasets["objects"], outputFacets={"outputStatistics": statistics}),
        OutputDataset(namespace=bucket_ns, name=datasets["manifests"]),
    ]


def partition_run_event(
    record: dict[str, Any],
    namespace: str,
    parent: tuple[str, str, str] | None = None,
    event_time: dt.datetime | None = None,
) -> RunEvent:
    """Build the COMPLETE (or FAIL, when validation failed) event of a lineage record.

    Parameters
    ----------
    record : dict
        A record from :func:`lineage.lineage_record`.
    namespace : str
        The OpenLineage job namespace (the Airflow provider's).
    parent : (namespace, job name, run id), optional
        The Airflow task run this partition run belongs to.
    """
    now = event_time or dt.datetime.now(dt.UTC)
    src_namespace, _, ae = record["source"]["uri"].rpartition("/")  # dicom://host:port/AE
    validation = record.get("validation") or {}
    facets: dict[str, RunFacet] = {"pacsMigration": _facet(record)}
    if parent is not None:
        facets["parent"] = parent_run.ParentRunFacet(
            run=parent_run.Run(runId=parent[2]), job=parent_run.Job(namespace=parent[0], name=parent[1])
        )
    run_id = generate_static_uuid(now, f"{record['run_id']}|{record['partition']}".encode())
    outputs = _outputs(record)
    state = RunState.FAIL if validation.get("success") is False else RunState.COMPLETE
    return RunEvent(
        eventType=state,
        eventTime=now.isoformat(),
        run=Run(runId=str(run_id), facets=facets),
        job=Job(namespace=namespace, name=f"{record['dag_id']}.partition"),
        inputs=[InputDataset(namespace=src_namespace, name=ae)],
        outputs=outputs,
        producer=PRODUCER,
    )
