"""Verify a partition: Great Expectations (GX Core 1.x) over its manifests,
after re-reading every migrated object from the bucket.

The suite checks what compliance must be able to prove: every expected
instance has exactly one end state, SOP Instance UIDs are present and unique,
migrated instances carry the partition's StudyDate and Modality, and every
stored object re-reads with the checksum the manifest recorded.
"""

from __future__ import annotations

import hashlib
import io
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pydicom

from .census import CensusSeries
from .partition import Partition
from .reasons import InstanceState
from .store import ObjectStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpectationOutcome:
    batch: str
    expectation: str
    column: str | None
    success: bool
    observed: Any
    unexpected_count: int | None

    def to_json(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "expectation": self.expectation,
            "column": self.column,
            "success": self.success,
            "observed": self.observed,
            "unexpected_count": self.unexpected_count,
        }


@dataclass(frozen=True)
class ValidationReport:
    partition: Partition
    success: bool
    outcomes: tuple[ExpectationOutcome, ...]
    reread_objects: int
    reread_failures: int

    @property
    def failed(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success]

    def to_json(self) -> dict[str, Any]:
        return {
            "partition": self.partition.key,
            "success": self.success,
            "reread_objects": self.reread_objects,
            "reread_failures": self.reread_failures,
            "expectations": [o.to_json() for o in self.outcomes],
        }


def reread(store: ObjectStore, key: str, sha256_hex: str) -> bool:
    """Fetch one object; True if its SHA-256 matches and it parses as DICOM."""
    try:
        data = store.get(key)
    except Exception:
        return False
    if hashlib.sha256(data).hexdigest() != sha256_hex:
        return False
    try:
        pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception:
        return False
    return True


def _expected_frame(series: list[CensusSeries]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"sop_instance_uid": i.sop_instance_uid, "series_instance_uid": s.series_instance_uid}
            for s in series
            for i in s.instances
        ],
        columns=["sop_instance_uid", "series_instance_uid"],
    )


def _gx_run(frames: dict[str, pd.DataFrame], suites: dict[str, list[Any]]) -> list[ExpectationOutcome]:
    import great_expectations as gx  # heavy: imported only where used
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas("manifests")
    outcomes: list[ExpectationOutcome] = []
    for name, df in frames.items():
        asset = source.add_dataframe_asset(name)
        batch = asset.add_batch_definition_whole_dataframe(f"{name}_all").get_batch(batch_parameters={"dataframe": df})
        suite = gx.ExpectationSuite(name=f"{name}_suite", expectations=suites[name])
        result = batch.validate(suite, result_format="SUMMARY")
        for r in result.results:
            cfg = r.expectation_config
            res = r.result or {}
            observed = res.get("observed_value")
            outcomes.append(
                ExpectationOutcome(
                    batch=name,
                    expectation=cfg.type,
                    column=cfg.kwargs.get("column"),
                    success=bool(r.success),
                    observed=observed if isinstance(observed, int | float | str | bool | type(None)) else str(observed),
                    unexpected_count=res.get("unexpected_count"),
                )
            )
    return outcomes


def validate_partition(
    store: ObjectStore, partition: Partition, series: list[CensusSeries], transfer: pd.DataFrame
) -> ValidationReport:
    """Run the partition's suite; re-read every migrated object first."""
    import great_expectations as gx

    migrated = transfer[transfer["state"] == InstanceState.MIGRATED.value].copy()
    pairs = list(zip(migrated["object_key"], migrated["object_sha256"]))
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="reread") as pool:
        verified = list(pool.map(lambda p: reread(store, p[0], p[1]), pairs))
    migrated["checksum_verified"] = verified

    expected = _expected_frame(series)
    in_census = transfer[transfer["in_census"]][["sop_instance_uid", "state"]]
    expected = expected.merge(in_census, on="sop_instance_uid", how="left")
    n_expected = len(expected)
    E = gx.expectations
    frames = {"expected": expected, "transfer": transfer, "migrated": migrated}
    suites = {
        "expected": [
            # Conservation: every instance of E has exactly one end state.
            E.ExpectTableRowCountToEqual(value=n_expected),
            E.ExpectColumnValuesToNotBeNull(column="state"),
            E.ExpectColumnValuesToBeInSet(column="state", value_set=[s.value for s in InstanceState]),
            E.ExpectColumnValuesToBeUnique(column="sop_instance_uid"),
        ],
        "transfer": [
            E.ExpectTableRowCountToBeBetween(min_value=n_expected),
            E.ExpectColumnValuesToNotBeNull(column="sop_instance_uid"),
            E.ExpectColumnValuesToBeUnique(column="sop_instance_uid"),
            E.ExpectColumnValuesToNotBeNull(column="state"),
        ],
        "migrated": [
            E.ExpectColumnValuesToBeInSet(column="study_date", value_set=[partition.dicom_date]),
            E.ExpectColumnValuesToBeInSet(column="modality", value_set=[partition.modality]),
            E.ExpectColumnValuesToBeInSet(column="checksum_verified", value_set=[True]),
            E.ExpectColumnValuesToBeUnique(column="object_key"),
            E.ExpectColumnValuesToNotBeNull(column="object_sha256"),
        ],
    }
    outcomes = _gx_run(frames, suites)
    failures = sum(1 for v in verified if not v)
    report = ValidationReport(
        partition=partition,
        success=all(o.success for o in outcomes),
        outcomes=tuple(outcomes),
        reread_objects=len(verified),
        reread_failures=failures,
    )
    log.info("partition %s validation %s (%d objects re-read, %d failed)", partition.key,
             "passed" if report.success else "FAILED", len(verified), failures)
    return report
