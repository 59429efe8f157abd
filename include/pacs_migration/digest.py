"""The digest: one mail per day or week across all runs (``pacs_digest``),
from the coverage index: what the period validated, every partition that
failed, was partly quarantined or rolled back (with its reasons in plain
language and where its proof is), the rule sets that ran, and the archive's
totals so far. Figures and codes only."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pandas as pd

from .coverage import CellState
from .dashboard import totals
from .partition import Partition
from .reasons import describe
from .templates import render

COLUMNS = {
    "expected": "instances the census found at the source",
    "migrated": "instances stored in the archive and re-read against their checksum",
    "quarantined": "instances kept aside with their original bytes and a reason code",
    "unresolved": "instances the source did not deliver (named in the manifest)",
    "bytes": "bytes of the migrated objects",
}
NEEDS_A_LOOK = (CellState.FAILED.value, CellState.PARTLY_QUARANTINED.value, CellState.ROLLED_BACK.value)


def period(now: dt.datetime, every: str) -> tuple[dt.datetime, dt.datetime]:
    """The day (or the seven days) that ended at the last UTC midnight before ``now``."""
    end = dt.datetime.combine(now.astimezone(dt.UTC).date(), dt.time(0), dt.UTC)
    return end - dt.timedelta(days=7 if every == "week" else 1), end


def digest(index: pd.DataFrame, start: dt.datetime, end: dt.datetime, prefix: str = "") -> dict[str, Any]:
    """The period's figures (partitions whose proof was recorded in it) and the archive's so far."""
    when = pd.to_datetime(index["updated_at"], utc=True)
    rows = index[(when >= pd.Timestamp(start)) & (when < pd.Timestamp(end))]
    look = rows[rows["state"].isin(NEEDS_A_LOOK)].sort_values(["study_date", "modality"])
    return {
        "start": start.isoformat(),
        "end": end.isoformat(),
        "period": totals(rows),
        "archive": totals(index),
        "rulesets": sorted(r for r in set(rows["ruleset"]) if r),
        "runs": int(rows["run_id"].nunique()),
        "attention": [_attention(r, prefix) for r in look.to_dict("records")],
    }


def _attention(r: dict[str, Any], prefix: str) -> dict[str, Any]:
    p = Partition(dt.date.fromisoformat(r["study_date"]), r["modality"], r.get("source") or "")
    where = f"{prefix}_manifests/{p.hive_path}/"
    reasons = json.loads(r.get("reasons") or "{}")
    return {
        "partition": p.key,
        "state": r["state"],
        "expected": int(r["expected"]),
        "migrated": int(r["migrated"]),
        "quarantined": int(r["quarantined"]),
        "unresolved": int(r["unresolved"]),
        "reasons": [{"code": c, "instances": n, "meaning": describe(c)} for c, n in sorted(reasons.items())],
        "failed_expectations": [x for x in str(r.get("failed_expectations") or "").split(";") if x],
        "run_id": r.get("run_id") or "",
        "rollback_id": r.get("rollback_id") or "",
        "proof": {
            "verdict": where + "validation.json",
            "data_docs": where + "gx/data_docs/",
            "lineage": where + "lineage.json",
        },
    }


def render_digest_html(d: dict[str, Any], bucket_uri: str, generated_at: dt.datetime, every: str) -> str:
    return render(
        "digest.html.j2",
        d=d,
        bucket_uri=bucket_uri,
        generated_at=generated_at.isoformat(timespec="seconds"),
        every=every,
        columns=COLUMNS,
    )


def digest_subject(prefix: str, d: dict[str, Any], every: str) -> str:
    p, look = d["period"], d["attention"]
    tail = f"{len(look)} partition(s) need a look" if look else "nothing needs a look"
    return (
        f"{prefix} {'Weekly' if every == 'week' else 'Daily'} digest {d['start'][:10]}..{d['end'][:10]}: "
        f"{p['partitions']} partition(s), {p['migrated']} instance(s) migrated; {tail}"
    )
