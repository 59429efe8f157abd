"""The nightly plan's two ends, for ``pacs_nightly``: choose tonight's units,
and fold tonight's results into the ledger, with the progress mail's subject
and body. Storage through :class:`steps.Services`; time comes in as an argument."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from .assessment import read_by_date
from .ledger_store import read_ledger, update_ledger
from .plan import Ledger, NightPlan, UnitResult, eta, record_night, select_night
from .report import render_progress_html
from .steps import Services


def plan_night(services: Services, now: dt.datetime) -> NightPlan:
    """Tonight's units of the services' source archive (its window, budget and
    ledger), at the measured rate (the assessment's until something was measured)."""
    cfg, ledger = services.config, read_ledger(services.store, services.source_name)
    rate = ledger.measured_rate() or cfg.assessment.throughput_instances_s
    return select_night(
        cfg.plan_for(services.source), ledger, now, read_by_date(services.store, services.source_name), rate
    )


@dataclass(frozen=True)
class NightProgress:
    entry: dict[str, Any]  # the ledger's entry for tonight, with the ETA
    subject: str
    html: str
    ledger: bytes  # attached to the mail


def record_progress(
    services: Services, night: NightPlan, results: list[UnitResult], now: dt.datetime, run_id: str
) -> NightProgress:
    """Fold tonight's results into the ledger (stored) and say what is left."""
    cfg, store, plan = services.config, services.store, services.config.plan_for(services.source)
    by_date = read_by_date(store, services.source_name)

    def fold(ledger: Ledger) -> dict[str, Any]:  # may run again on a fresher ledger (a rollback reopened units)
        entry = record_night(ledger, night, results, now, run_id)
        entry["progress"] = eta(plan, ledger, night.night or now.date(), by_date, cfg.assessment.throughput_instances_s)
        return entry

    ledger, entry = update_ledger(store, fold, source=services.source_name)
    status, data = entry["progress"], ledger.to_bytes()
    html = render_progress_html(
        night.to_json(), results, status, run_id, f"s3://{cfg.target.bucket}/{cfg.target.prefix}"
    )
    archive = f" ({services.source_name})" if services.source_name else ""
    day = night.night.isoformat() if night.night else now.date().isoformat()
    subject = (
        f"{cfg.report.subject_prefix} Nightly{archive} {day}: "
        f"{entry['done']} done, {entry['failed']} failed, {entry['deferred']} deferred; "
        f"{status['units_left']} unit(s) left, ETA {status['nights_left']} night(s)"
    )
    return NightProgress(entry, subject, html, data)
