"""Phased nightly loads: the plan's units in order, the ledger of what each
night did, and the choice of one night's work inside the clinical window and
the budgets. Pure: time comes in as an argument, storage through the caller.

A *unit* is one study date with a modality filter (a phase's). Migrating a
unit censuses the date and moves each matching partition that is not yet
validated, or whose census changed since (delta sync); nothing already
migrated is rewritten.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any
from zoneinfo import ZoneInfo

from .config import Phase, PlanConfig, Window
from .counts import PartitionCounts

LEDGER_KEY = "_plan/ledger.json"
ASSESSED = "*"  # by-date estimates: the modality key marking a date the assessment covered


class UnitState(str, Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"
    DEFERRED = "deferred"  # tonight's result only: not started, the window had closed (still pending)
    WINDOW_CLOSED = "window_closed"  # tonight's result only: stopped part-way at the window's end (still pending)


@dataclass(frozen=True)
class Unit:
    study_date: dt.date
    modalities: tuple[str, ...] | None  # None: every modality of the date
    phase: str
    kind: str = "phase"  # or "delta": a done date re-censused for new or changed studies

    @property
    def key(self) -> str:
        return f"{self.study_date.isoformat()}|{','.join(self.modalities) if self.modalities else '*'}"

    def wants(self, modality: str) -> bool:
        return self.modalities is None or modality in self.modalities

    def to_json(self) -> dict[str, Any]:
        return {
            "study_date": self.study_date.isoformat(),
            "modalities": list(self.modalities or []) or None,
            "phase": self.phase,
            "kind": self.kind,
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Unit:
        mods = value.get("modalities")
        return cls(
            dt.date.fromisoformat(value["study_date"]),
            tuple(mods) if mods else None,
            value["phase"],
            value.get("kind", "phase"),
        )


class PartitionAction(str, Enum):
    UNCHANGED = "unchanged"  # validated before, the source holds what it held then
    MIGRATED = "migrated"
    DELTA = "delta"  # migrated before; only series with new instances retrieved


@dataclass(frozen=True)
class PartitionResult:
    """What one unit did to one of its partitions."""

    partition: str
    action: PartitionAction
    validation_passed: bool
    counts: PartitionCounts | None = None  # None when unchanged

    def to_json(self) -> dict[str, Any]:
        out = {"partition": self.partition, "action": self.action.value, "validation_passed": self.validation_passed}
        return {**out, **(self.counts.to_json() if self.counts else {})}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> PartitionResult:
        counted = "expected" in value
        return cls(
            value["partition"],
            PartitionAction(value["action"]),
            bool(value.get("validation_passed")),
            PartitionCounts.from_json(value) if counted else None,
        )


@dataclass(frozen=True)
class UnitResult:
    """What migrating one unit did tonight (XCom, the ledger, the progress mail)."""

    unit: Unit
    state: UnitState
    migrated: int = 0  # objects created
    seconds: float = 0.0
    partitions: tuple[PartitionResult, ...] = ()
    error: str | None = None  # the exception's class, never its message

    @classmethod
    def deferred(cls, unit: Unit) -> UnitResult:
        return cls(unit, UnitState.DEFERRED)

    @classmethod
    def failed(cls, unit: Unit, error: str) -> UnitResult:
        return cls(unit, UnitState.FAILED, error=error)

    def to_json(self) -> dict[str, Any]:
        return {
            "unit": self.unit.to_json(),
            "state": self.state.value,
            "migrated": self.migrated,
            "seconds": self.seconds,
            "partitions": [p.to_json() for p in self.partitions],
            "error": self.error,
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> UnitResult:
        return cls(
            Unit.from_json(value["unit"]),
            UnitState(value.get("state", UnitState.FAILED.value)),
            int(value.get("migrated", 0)),
            float(value.get("seconds", 0.0)),
            tuple(PartitionResult.from_json(p) for p in value.get("partitions") or ()),
            value.get("error"),
        )


@dataclass
class UnitRecord:
    """What the ledger knows of one unit."""

    state: UnitState = UnitState.PENDING
    attempts: int = 0
    phase: str = ""
    last_run_id: str | None = None
    instances: int = 0  # migrated by this unit, all nights
    seconds: float = 0.0  # spent migrating it, all nights
    finished_at: str | None = None
    checked_at: str | None = None  # last delta census
    delta_instances: int = 0  # instances that arrived after the date was done


@dataclass
class Ledger:
    units: dict[str, UnitRecord] = field(default_factory=dict)
    nights: list[dict[str, Any]] = field(default_factory=list)
    rollbacks: list[dict[str, Any]] = field(default_factory=list)  # which units each rollback reopened

    def get(self, unit: Unit) -> UnitRecord:
        return self.units.get(unit.key) or UnitRecord(phase=unit.phase)

    def to_bytes(self) -> bytes:
        units = {k: asdict(v) for k, v in sorted(self.units.items())}
        return json.dumps({"units": units, "nights": self.nights, "rollbacks": self.rollbacks}, indent=1).encode()

    @classmethod
    def from_bytes(cls, data: bytes | None) -> Ledger:
        if not data:
            return cls()
        raw = json.loads(data)
        units = {
            k: UnitRecord(**{**v, "state": UnitState(v.get("state", "pending"))})
            for k, v in raw.get("units", {}).items()
        }
        return cls(units, list(raw.get("nights", [])), list(raw.get("rollbacks", [])))

    def measured_rate(self) -> float | None:
        """Instances per second over every unit migrated so far."""
        seconds = sum(r.seconds for r in self.units.values())
        instances = sum(r.instances + r.delta_instances for r in self.units.values())
        return instances / seconds if seconds > 0 and instances > 0 else None


def reopen(ledger: Ledger, partitions: list[tuple[dt.date, str]], rollback_id: str, at: dt.datetime) -> list[str]:
    """A rollback took these (date, modality) partitions out of the archive:
    every unit covering one is pending again (its attempts reset), so the
    nightly plan migrates it anew. Returns the units reopened (also logged in
    ``rollbacks``); reopening twice for one rollback changes nothing more."""
    if any(r.get("rollback_id") == rollback_id for r in ledger.rollbacks):
        return []
    reopened = []
    for key, rec in sorted(ledger.units.items()):
        day, _, mods = key.partition("|")
        if any(d.isoformat() == day and (mods == "*" or m in mods.split(",")) for d, m in partitions):
            rec.state, rec.attempts, rec.finished_at = UnitState.PENDING, 0, None
            reopened.append(key)
    ledger.rollbacks.append({"rollback_id": rollback_id, "at": at.isoformat(), "units": reopened})
    return reopened


def _months_before(day: dt.date, months: int) -> dt.date:
    y, m = divmod(day.year * 12 + day.month - 1 - months, 12)
    m += 1
    last = (dt.date(y + (m == 12), m % 12 + 1, 1) - dt.timedelta(days=1)).day
    return dt.date(y, m, min(day.day, last))


def phase_dates(phase: Phase, night: dt.date) -> list[dt.date]:
    """The phase's study dates, in its order. Dates end the day before the
    night: today's studies are still arriving (delta sync picks them up)."""
    start = phase.date_from or _months_before(night, phase.last_months or 0)
    end = min(phase.date_to or night, night - dt.timedelta(days=1))
    if end < start:
        return []
    days = [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]
    return days[::-1] if phase.newest_first else days


def plan_units(plan: PlanConfig, night: dt.date) -> list[Unit]:
    """Every unit of the plan in order; a (date, modalities) pair once, in its first phase."""
    seen: set[str] = set()
    out = []
    for phase in plan.phases:
        for day in phase_dates(phase, night):
            unit = Unit(day, phase.modalities, phase.name)
            if unit.key not in seen:
                seen.add(unit.key)
                out.append(unit)
    return out


def window_bounds(now: dt.datetime, window: Window) -> tuple[dt.datetime, dt.datetime] | None:
    """(start, end) of the window ``now`` is in (aware datetimes in the
    window's zone), or None outside it."""
    tz = ZoneInfo(window.timezone)
    local = now.astimezone(tz)
    for offset in (0, -1):  # the window that began today, or (wrapping midnight) yesterday
        day = local.date() + dt.timedelta(days=offset)
        start = dt.datetime.combine(day, window.start, tz)
        end = dt.datetime.combine(day if window.end > window.start else day + dt.timedelta(days=1), window.end, tz)
        if start <= local < end:
            return start, end
    return None


@dataclass(frozen=True)
class Estimate:
    partitions: int
    instances: int
    bytes: int


@dataclass(frozen=True)
class NightPlan:
    night: dt.date | None
    window_end: dt.datetime | None
    units: tuple[Unit, ...]
    reason: str  # why the list ends where it does
    left: int  # phase units still to do after tonight's selection
    given_up: tuple[str, ...] = ()  # units whose attempts are spent

    def to_json(self) -> dict[str, Any]:
        return {
            "night": self.night.isoformat() if self.night else None,
            "window_end": self.window_end.isoformat() if self.window_end else None,
            "units": [u.to_json() for u in self.units],
            "reason": self.reason,
            "left": self.left,
            "given_up": list(self.given_up),
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> NightPlan:
        return cls(
            dt.date.fromisoformat(value["night"]) if value.get("night") else None,
            dt.datetime.fromisoformat(value["window_end"]) if value.get("window_end") else None,
            tuple(Unit.from_json(u) for u in value.get("units", [])),
            value.get("reason", ""),
            int(value.get("left", 0)),
            tuple(value.get("given_up", ())),
        )


def covered(plan: PlanConfig, ledger: Ledger, night: dt.date) -> dict[dt.date, set[str] | None]:
    """Per study date, the modalities done units already moved (None: all of them)."""
    out: dict[dt.date, set[str] | None] = {}
    for u in plan_units(plan, night):
        if ledger.get(u).state != UnitState.DONE:
            continue
        if u.modalities is None:
            out[u.study_date] = None
        elif (done := out.setdefault(u.study_date, set())) is not None:
            done.update(u.modalities)
    return out


def estimate_unit(
    unit: Unit, by_date: dict[tuple[str, str], tuple[int, int]], done: dict[dt.date, set[str] | None] | None = None
) -> Estimate:
    """From the assessment's by-date figures ((date, modality) -> (instances,
    bytes); ``(date, "*")`` marks an assessed date), less the modalities
    ``done`` units already moved; a date no assessment covered counts as one
    partition of unknown size."""
    iso = unit.study_date.isoformat()
    moved = (done or {}).get(unit.study_date, set())
    if moved is None:
        return Estimate(0, 0, 0)
    rows = [
        v
        for (day, modality), v in by_date.items()
        if day == iso and modality != ASSESSED and unit.wants(modality) and modality not in moved
    ]
    if not rows:
        # assessed and empty (the "*" marker), or never assessed: size unknown
        return Estimate(0, 0, 0) if (iso, ASSESSED) in by_date else Estimate(1, 0, 0)
    return Estimate(len(rows), sum(r[0] for r in rows), sum(r[1] for r in rows))


def select_night(
    plan: PlanConfig,
    ledger: Ledger,
    now: dt.datetime,
    by_date: dict[tuple[str, str], tuple[int, int]] | None = None,
    rate_instances_s: float = 40.0,
) -> NightPlan:
    """Tonight's units, in plan order: delta checks of done dates first, then
    pending and failed units (attempts left), as long as the night's budgets
    hold and each unit's projected start is before the window closes.

    The first unit of a night is taken even if it alone exceeds a budget, so
    a large date can never block the plan.
    """
    bounds = window_bounds(now, plan.window)
    if bounds is None:
        return NightPlan(
            None,
            None,
            (),
            f"outside the window {plan.window.start:%H:%M}-{plan.window.end:%H:%M} {plan.window.timezone}: "
            "nothing started",
            _left(plan, ledger, now.date()),
        )
    start, end = bounds
    night = start.date()
    units = plan_units(plan, night)
    todo = [u for u in units if ledger.get(u).state != UnitState.DONE]
    given_up = tuple(u.key for u in todo if ledger.get(u).attempts >= plan.max_attempts)
    todo = [u for u in todo if u.key not in given_up]
    budget = _Budget(plan, end, now.astimezone(dt.UTC), rate_instances_s)  # elapsed time added in UTC: exact across DST
    moved = covered(plan, ledger, night)
    chosen: list[Unit] = []
    reason = "every pending unit fits"
    for u in _delta_units(plan, ledger, units, night) + todo:
        est = estimate_unit(u, by_date or {}, moved) if u.kind == "phase" else Estimate(0, 0, 0)
        stop = budget.refuses(est, first=not chosen)
        if stop:
            reason = stop
            break
        chosen.append(u)
        budget.take(est)
    left = len(todo) - sum(1 for u in chosen if u.kind == "phase")
    return NightPlan(night, end, tuple(chosen), reason, left, given_up)


class _Budget:
    """What tonight has taken so far, against the plan's caps and the window's end."""

    def __init__(self, plan: PlanConfig, end: dt.datetime, now: dt.datetime, rate_instances_s: float) -> None:
        self.caps = {"partitions": plan.max_partitions, "instances": plan.max_instances, "bytes": plan.max_bytes}
        self.used = {"partitions": 0, "instances": 0, "bytes": 0}
        self.end, self.now, self.rate, self.elapsed = end, now, rate_instances_s, 0.0

    def refuses(self, est: Estimate, first: bool) -> str | None:
        """Why the next unit may not start, or None. The first unit of a night
        is taken even if it alone exceeds a budget: a large date never blocks the plan."""
        if self.now + dt.timedelta(seconds=self.elapsed) >= self.end:
            return "the window closes before the next unit could start"
        add = {"partitions": est.partitions, "instances": est.instances, "bytes": est.bytes}
        over = [k for k, cap in self.caps.items() if cap is not None and self.used[k] + add[k] > cap]
        return f"budget reached: max_{over[0]}" if over and not first else None

    def take(self, est: Estimate) -> None:
        self.used = {
            "partitions": self.used["partitions"] + est.partitions,
            "instances": self.used["instances"] + est.instances,
            "bytes": self.used["bytes"] + est.bytes,
        }
        self.elapsed += est.instances / self.rate if self.rate > 0 else 0


def _delta_units(plan: PlanConfig, ledger: Ledger, units: list[Unit], night: dt.date) -> list[Unit]:
    done = [u for u in units if ledger.get(u).state == UnitState.DONE]
    recent = [u for u in done if u.study_date >= night - dt.timedelta(days=plan.delta_recent_days)]
    older = sorted((u for u in done if u not in recent), key=lambda u: (ledger.get(u).checked_at or "", u.study_date))[
        : plan.delta_sweep_per_night
    ]
    return [Unit(u.study_date, u.modalities, u.phase, "delta") for u in recent + older]


def _left(plan: PlanConfig, ledger: Ledger, night: dt.date) -> int:
    return sum(1 for u in plan_units(plan, night) if ledger.get(u).state != UnitState.DONE)


def record_night(
    ledger: Ledger, night_plan: NightPlan, results: list[UnitResult], now: dt.datetime, run_id: str
) -> dict[str, Any]:
    """Fold tonight's unit results into the ledger; returns the night's entry."""
    tally = {UnitState.DONE: 0, UnitState.FAILED: 0, UnitState.DEFERRED: 0, UnitState.WINDOW_CLOSED: 0}
    did = []
    for res in results:
        did.append(
            {
                "unit": res.unit.key,
                "kind": res.unit.kind,
                "state": res.state.value,
                "new_objects": res.migrated,
                "partitions": {p.partition: p.action.value for p in res.partitions},
            }
        )
        tally[_fold(ledger, res, now, run_id)] += 1
    entry = {
        "night": night_plan.night.isoformat() if night_plan.night else None,
        "run_id": run_id,
        "planned": len(night_plan.units),
        "done": tally[UnitState.DONE],
        "failed": tally[UnitState.FAILED],
        "deferred": tally[UnitState.DEFERRED],
        "window_closed": tally[UnitState.WINDOW_CLOSED],
        # a night the window cut short is not a failed night
        "status": "failed" if tally[UnitState.FAILED] else "window-closed" if tally[UnitState.WINDOW_CLOSED] else "ok",
        "migrated": sum(r.migrated for r in results if r.state is not UnitState.DEFERRED),
        "reason": night_plan.reason,
        "units": did,
    }
    ledger.nights.append(entry)
    return entry


def _fold(ledger: Ledger, res: UnitResult, now: dt.datetime, run_id: str) -> UnitState:
    """One result into its unit's record; returns how it counts tonight."""
    unit, rec = res.unit, ledger.get(res.unit)
    rec.phase = rec.phase or unit.phase
    if res.state is UnitState.DEFERRED:
        return UnitState.DEFERRED
    rec.last_run_id = run_id
    rec.seconds += res.seconds
    ledger.units[unit.key] = rec
    if unit.kind == "delta":
        rec.checked_at = now.isoformat()
        rec.delta_instances += res.migrated
    if res.state is UnitState.WINDOW_CLOSED:  # pending still, no attempt spent: the next night resumes it
        rec.instances += res.migrated
        return UnitState.WINDOW_CLOSED
    if res.state is not UnitState.DONE:
        rec.state, rec.attempts = UnitState.FAILED, rec.attempts + 1
        return UnitState.FAILED
    if unit.kind != "delta":
        rec.state, rec.finished_at, rec.checked_at = UnitState.DONE, now.isoformat(), now.isoformat()
        rec.instances += res.migrated
    return UnitState.DONE


def eta(
    plan: PlanConfig,
    ledger: Ledger,
    night: dt.date,
    by_date: dict[tuple[str, str], tuple[int, int]],
    fallback_rate: float,
) -> dict[str, Any]:
    """Units done and left, instances left (estimated), and the ETA at the
    measured rate (the assessment's throughput until something was measured)."""
    units = plan_units(plan, night)
    left = [u for u in units if ledger.get(u).state != UnitState.DONE]
    moved = covered(plan, ledger, night)
    left_instances = sum(estimate_unit(u, by_date, moved).instances for u in left)
    rate = ledger.measured_rate()
    used = rate or fallback_rate
    hours = left_instances / used / 3600 if used else 0.0
    return {
        "units_total": len(units),
        "units_done": len(units) - len(left),
        "units_left": len(left),
        "instances_left": left_instances,
        "rate_instances_s": round(used, 2),
        "rate_measured": rate is not None,
        "hours_left": round(hours, 2),
        "nights_left": int(-(-hours // plan.window.hours)) if hours else 0,
    }
