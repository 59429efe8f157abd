"""The migration dashboard's answers, from the coverage index, the nightly
ledger, the plan and the assessment (pure: the caller reads them): how far
we are (a date x modality heat map by state), how fast, when we finish, and
what needs a person. Figures and codes only: no patient data, no UIDs."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections import Counter, defaultdict
from typing import Any

import pandas as pd

from .config import PlanConfig
from .coverage import CellState
from .manifest import source_label
from .plan import Ledger, UnitState, eta, plan_units, window_bounds
from .reasons import describe

# The colour a month's cell takes: its most urgent partition's state.
URGENCY = (
    CellState.FAILED,
    CellState.ROLLED_BACK,
    CellState.PENDING,
    CellState.PARTLY_QUARANTINED,
    CellState.MIGRATED,
)
COUNTS = ("expected", "migrated", "quarantined", "unresolved", "bytes")


def _cells(index: pd.DataFrame, by_date: dict[tuple[str, str], tuple[int, int]]) -> pd.DataFrame:
    """One row per (date, modality): the index's, plus assessed partitions never migrated (pending)."""
    have = set(zip(index["study_date"], index["modality"], strict=True))
    pending = [
        {"study_date": d, "modality": m, "state": CellState.PENDING.value, "expected": n, "bytes": 0}
        for (d, m), (n, _b) in by_date.items()
        if m != "*" and (d, m) not in have
    ]
    cells = index[["study_date", "modality", "state", *COUNTS]]
    return pd.concat([cells, pd.DataFrame(pending, columns=cells.columns)], ignore_index=True).fillna(0)


def heatmap(
    index: pd.DataFrame,
    by_date: dict[tuple[str, str], tuple[int, int]],
    granularity: str = "month",
    year: int | None = None,
) -> dict[str, Any]:
    """Rows (months, or the days of ``year``) x modalities; each cell: its
    partitions by state, the most urgent state (its colour), instances migrated."""
    cells = _cells(index, by_date)
    if year is not None:
        cells = cells[cells["study_date"].str.startswith(f"{year:04d}-")]
    key = cells["study_date"].str[:7] if granularity == "month" else cells["study_date"]
    out: dict[str, dict[str, Any]] = defaultdict(dict)
    for (row, modality), group in cells.groupby([key, "modality"], sort=True):
        states = Counter(group["state"])
        worst = next(s.value for s in URGENCY if states.get(s.value))
        out[str(row)][str(modality)] = {
            "state": worst,
            "partitions": dict(sorted(states.items())),
            "migrated": int(group["migrated"].sum()),
            "expected": int(group["expected"].sum()),
        }
    return {
        "granularity": granularity,
        "year": year,
        "rows": sorted(out),
        "modalities": sorted({m for row in out.values() for m in row}),
        "cells": out,
        "states": [s.value for s in URGENCY],
    }


def totals(index: pd.DataFrame) -> dict[str, Any]:
    states = Counter(index["state"])
    out = {
        "partitions": int(len(index)),
        "by_state": {s.value: int(states.get(s.value, 0)) for s in URGENCY},
        **{c: int(index[c].sum()) for c in COUNTS},
    }
    sources = sorted(set(index["source"])) if "source" in index else []
    if len(sources) > 1 or any(sources):  # several legacy archives: each one's share
        by = {s: index[index["source"] == s].drop(columns="source") for s in sources}
        out["by_source"] = {source_label(s): totals(df) for s, df in by.items()}
    return out


def progress(
    plan: PlanConfig,
    ledger: Ledger,
    by_date: dict[tuple[str, str], tuple[int, int]],
    now: dt.datetime,
    fallback_rate: float,
) -> dict[str, Any]:
    """The rate night by night, the plan's ETA, and tonight's window and budget use."""
    night = now.astimezone(dt.UTC).date()
    bounds = window_bounds(now, plan.window)
    last = ledger.nights[-1] if ledger.nights else None
    return {
        "nights": [
            {
                "night": n.get("night"),
                "migrated": n.get("migrated", 0),
                "done": n.get("done", 0),
                "failed": n.get("failed", 0),
                "deferred": n.get("deferred", 0),
            }
            for n in ledger.nights[-60:]
        ],
        "eta": eta(plan, ledger, night, by_date, fallback_rate),
        "window": {
            "start": plan.window.start.strftime("%H:%M"),
            "end": plan.window.end.strftime("%H:%M"),
            "timezone": plan.window.timezone,
            "open_now": bounds is not None,
            "closes_at": bounds[1].isoformat() if bounds else None,
        },
        "budget": {
            "max_partitions": plan.max_partitions,
            "max_instances": plan.max_instances,
            "max_bytes": plan.max_bytes,
            "last_night": {
                k: last.get(k) for k in ("night", "planned", "done", "failed", "deferred", "migrated", "reason")
            }
            if last
            else None,
        },
    }


def worklist(index: pd.DataFrame, ledger: Ledger, plan: PlanConfig, today: dt.date) -> dict[str, Any]:
    """What needs a person: failed partitions (with the expectations that
    failed), quarantined instances by reason, unresolved instances, rolled-back
    partitions waiting for a run, and plan units whose attempts are spent."""

    def rows(df: pd.DataFrame, *extra: str) -> list[dict[str, Any]]:
        cols = ["study_date", "modality", "source", *extra, "run_id"]
        return [
            {k: (int(v) if isinstance(v, int | float) and k != "run_id" else v) for k, v in r.items()}
            for r in df[cols].to_dict("records")
        ]

    failed = index[index["state"] == CellState.FAILED.value]
    unresolved = index[index["unresolved"] > 0]
    rolled = index[index["state"] == CellState.ROLLED_BACK.value]
    given_up = [
        {"unit": u.key, "phase": u.phase, "attempts": ledger.get(u).attempts}
        for u in plan_units(plan, today)
        if ledger.get(u).state is UnitState.FAILED and ledger.get(u).attempts >= plan.max_attempts
    ]
    return {
        "failed": [
            {**r, "failed_expectations": [x for x in str(r["failed_expectations"]).split(";") if x]}
            for r in rows(failed.sort_values(["study_date", "modality"]), "failed_expectations")
        ],
        "quarantine": quarantine_by_reason(index),
        "unresolved": rows(unresolved.sort_values(["study_date", "modality"]), "unresolved"),
        "rolled_back": rows(rolled.sort_values(["study_date", "modality"]), "rollback_id"),
        "given_up": given_up,
    }


def _reasons(index: pd.DataFrame) -> list[tuple[str, str, str, int, str]]:
    """(date, modality, reason code, instances, source) for every quarantine and unresolved reason."""
    out = []
    sources = index["source"] if "source" in index else [""] * len(index)
    for d, m, src, raw in zip(index["study_date"], index["modality"], sources, index["reasons"], strict=True):
        for code, n in json.loads(raw or "{}").items():
            out.append((str(d), str(m), str(code), int(n), source_label(str(src))))
    return out


def quarantine_by_reason(index: pd.DataFrame) -> list[dict[str, Any]]:
    """Reason codes over the archive: instances and partitions, with a plain-language meaning."""
    instances: Counter[str] = Counter()
    partitions: Counter[str] = Counter()
    for _d, _m, code, n, _s in _reasons(index):
        instances[code] += n
        partitions[code] += 1
    return [
        {"reason": code, "meaning": describe(code), "instances": instances[code], "partitions": partitions[code]}
        for code in sorted(instances, key=lambda c: (-instances[c], c))
    ]


def quarantine_csv(index: pd.DataFrame) -> str:
    """Per partition and reason code: instances (the worklist's CSV export)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["study_date", "modality", "reason", "meaning", "instances", "source"])
    for d, m, code, n, src in sorted(_reasons(index)):
        w.writerow([d, m, code, describe(code), n, src])
    return buf.getvalue()


def answer(what: str, cfg: Any, store: Any, now: dt.datetime, **args: Any) -> dict[str, Any]:
    """One of the dashboard's answers (``overview``, ``heatmap``, ``worklist``) from the bucket as it is now."""
    from . import coverage
    from .assessment import read_by_date
    from .ledger_store import read_ledger

    index = coverage.read(store)
    if what == "heatmap":
        return heatmap(index, read_by_date(store), **args)
    ledger = read_ledger(store)
    if what == "worklist":
        return worklist(index, ledger, cfg.plan, now.date())
    return {
        "totals": totals(index),
        "progress": progress(cfg.plan, ledger, read_by_date(store), now, cfg.assessment.throughput_instances_s),
        "generated_at": now.isoformat(timespec="seconds"),
        "ruleset": cfg.ruleset.label,
    }
