"""Validate a date's reports (GX, like the partitions): every message of the
inbox has one row and one end state, a reason code where it was not placed,
and every stored report object re-reads with its SHA-256."""

from __future__ import annotations

import datetime as dt
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd

from ..store import ObjectStore
from ..validate import ExpectationOutcome, gx, reread, run_suites
from .place import ReportCounts, ReportReason, ReportState

PARSE_ERROR = re.compile(r"^HL7_PARSE_ERROR:[A-Z][A-Z0-9]{2}$")


def _accounted(row: dict[str, Any]) -> bool:
    state, why = row.get("state"), row.get("reason")
    if state == ReportState.MIGRATED.value:
        return why is None or (isinstance(why, float) and pd.isna(why))
    if state == ReportState.UNMATCHED.value:
        return why in (ReportReason.NO_MATCHING_STUDY.value, ReportReason.AMBIGUOUS_MATCH.value)
    if state == ReportState.REJECTED.value:
        return bool(why) and (PARSE_ERROR.match(str(why)) is not None or why == ReportReason.UID_CONFLICT.value)
    return False


def validate_reports(
    store: ObjectStore, study_date: dt.date, ledger: pd.DataFrame, objects: list[dict[str, Any]], messages: int
) -> dict[str, Any]:
    """The date's reports verdict (JSON): success, outcomes, counts."""
    E = gx().expectations
    reports = ledger.assign(accounted=[_accounted(r) for r in ledger.to_dict("records")])
    objs = pd.DataFrame(objects, columns=["object_key", "object_sha256", "sop_instance_uid"])
    with ThreadPoolExecutor(8, thread_name_prefix="reread-report") as pool:
        objs["checksum_verified"] = list(pool.map(lambda r: reread(store, r[0], r[1]), objs.values.tolist()))
    frames = {"reports": reports, "report_objects": objs}
    suites: dict[str, list[Any]] = {
        "reports": [
            E.ExpectTableRowCountToEqual(value=messages),  # every message of the inbox, once
            E.ExpectColumnValuesToBeUnique(column="message_sha256"),
            E.ExpectColumnValuesToBeInSet(column="state", value_set=[s.value for s in ReportState]),
            E.ExpectColumnValuesToBeInSet(column="accounted", value_set=[True]),
        ],
        "report_objects": [
            E.ExpectColumnValuesToBeUnique(column="object_key"),
            E.ExpectColumnValuesToBeInSet(column="checksum_verified", value_set=[True]),
        ],
    }
    with tempfile.TemporaryDirectory(prefix="gx-reports-") as tmp:
        outcomes: list[ExpectationOutcome] = run_suites(Path(tmp), frames, suites, f"{study_date}.reports")
    counts = ReportCounts.of(ledger)
    return {
        "study_date": study_date.isoformat(),
        "success": all(o.success for o in outcomes) and counts.conserved,
        "failed_expectations": [o.label for o in outcomes if not o.success],
        "expectations": [o.to_json() for o in outcomes],
        "reread_objects": len(objs),
        "reread_failures": int((~objs["checksum_verified"].astype(bool)).sum()),
        "counts": counts.to_json(),
    }
