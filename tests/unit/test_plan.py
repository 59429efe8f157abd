"""The nightly planner, pure: phases in order, the window (local time,
wrapping midnight, DST), budgets, retries, delta checks, the ledger, the ETA,
and resume of a partition (only series with new instances are fetched)."""

from __future__ import annotations

import datetime as dt
import json
from zoneinfo import ZoneInfo

import pandas as pd
import pytest

from include.pacs_migration.census import CensusSeries, ExpectedInstance
from include.pacs_migration.config import ConfigError, load_config
from include.pacs_migration.plan import (
    Ledger,
    NightPlan,
    Unit,
    UnitResult,
    UnitState,
    eta,
    phase_dates,
    plan_units,
    record_night,
    select_night,
    window_bounds,
)
from include.pacs_migration.transfer import plan_resume

BXL = ZoneInfo("Europe/Brussels")
BASE = {
    "source": {"host": "pacs", "port": 104, "called_ae_title": "A", "calling_ae_title": "B"},
    "target": {"bucket": "b-1"},
    "report": {"recipients": ["c@example.org"], "from_address": "m@example.org"},
}


def _plan(**overrides):
    plan = {
        "timezone": "Europe/Brussels",
        "window": {"start": "20:00", "end": "06:00"},
        "budget": {"max_partitions": 4},
        "max_attempts": 2,
        "delta": {"recent_days": 2, "sweep_per_night": 1},
        "phases": [
            {"name": "recent", "last_months": 1, "modalities": "all"},
            {"name": "ct-mr", "from": "2019-01-01", "to": "2019-01-03", "modalities": ["CT", "MR"]},
            {"name": "rest", "from": "2019-01-01", "to": "2019-01-03", "order": "oldest_first"},
        ],
        **overrides,
    }
    return load_config({**BASE, "plan": plan}).plan


def test_config_names_bad_fields():
    with pytest.raises(ConfigError, match=r"plan\.timezone"):
        _plan(timezone="Mars/Olympus")
    with pytest.raises(ConfigError, match=r"plan\.phases\[0\]\.from"):
        _plan(phases=[{"name": "x", "modalities": "all"}])
    with pytest.raises(ConfigError, match=r"plan\.phases\[0\]\.modalities"):
        _plan(phases=[{"name": "x", "from": "2019-01-01", "modalities": "CT"}])
    with pytest.raises(ConfigError, match=r"plan\.window\.end"):
        _plan(window={"start": "20:00", "end": "20:00"})
    assert _plan(window={"start": 1200, "end": 360}).window.start == dt.time(20, 0)  # YAML 1.1 sexagesimal


def test_phases_in_order_each_pair_once():
    plan = _plan()
    night = dt.date(2019, 3, 3)
    recent = phase_dates(plan.phases[0], night)
    assert recent[0] == dt.date(2019, 3, 2) and recent[-1] == dt.date(2019, 2, 3)  # newest first, not tonight
    units = plan_units(plan, night)
    assert [u.phase for u in units[: len(recent)]] == ["recent"] * len(recent)
    ct_mr = [u for u in units if u.phase == "ct-mr"]
    assert [u.study_date.day for u in ct_mr] == [3, 2, 1] and ct_mr[0].modalities == ("CT", "MR")
    rest = [u for u in units if u.phase == "rest"]
    assert [u.study_date.day for u in rest] == [1, 2, 3]
    assert len({u.key for u in units}) == len(units)


@pytest.mark.parametrize(
    "local,inside",
    [
        ("2019-03-03T19:59:59", False),
        ("2019-03-03T20:00:00", True),
        ("2019-03-03T23:59:00", True),
        ("2019-03-04T00:30:00", True),
        ("2019-03-04T05:59:59", True),
        ("2019-03-04T06:00:00", False),
        ("2019-03-04T14:00:00", False),
    ],
)
def test_window_wraps_midnight_in_local_time(local, inside):
    now = dt.datetime.fromisoformat(local).replace(tzinfo=BXL).astimezone(dt.UTC)
    bounds = window_bounds(now, _plan().window)
    assert (bounds is not None) == inside
    if bounds:
        assert bounds[0].date() == dt.date(2019, 3, 3) and bounds[1] == dt.datetime(2019, 3, 4, 6, tzinfo=BXL)


def test_window_across_dst_change_is_local():
    # Europe/Brussels leaves summer time on 2019-10-27 at 03:00: the window still ends at 06:00 local.
    now = dt.datetime(2019, 10, 27, 4, 30, tzinfo=BXL)
    start, end = window_bounds(now, _plan().window)
    assert end == dt.datetime(2019, 10, 27, 6, 0, tzinfo=BXL)
    utc = dt.UTC
    assert end.astimezone(utc) - start.astimezone(utc) == dt.timedelta(hours=11)  # one hour longer that night


def _by_date(days: list[dt.date], per_modality: int = 10) -> dict:
    out = {}
    for d in days:
        out[(d.isoformat(), "*")] = (0, 0)
        for m in ("CR", "CT", "MR", "US"):
            out[(d.isoformat(), m)] = (per_modality, per_modality * 1000)
    return out


def test_outside_window_starts_nothing():
    night = select_night(_plan(), Ledger(), dt.datetime(2019, 3, 4, 14, 0, tzinfo=BXL))
    assert night.units == () and "outside the window" in night.reason


def test_budget_and_order():
    plan = _plan(
        phases=[
            {"name": "ct-mr", "from": "2019-01-01", "to": "2019-01-03", "modalities": ["CT", "MR"]},
            {"name": "rest", "from": "2019-01-01", "to": "2019-01-03"},
        ]
    )
    by_date = _by_date([dt.date(2019, 1, d) for d in (1, 2, 3)])
    night = select_night(plan, Ledger(), dt.datetime(2019, 3, 3, 21, tzinfo=BXL), by_date)
    assert [(u.study_date.day, u.modalities) for u in night.units] == [(3, ("CT", "MR")), (2, ("CT", "MR"))]
    assert night.reason == "budget reached: max_partitions"
    # max_instances binds first when tighter
    plan2 = _plan(phases=[{"name": "all", "from": "2019-01-01", "to": "2019-01-03"}], budget={"max_instances": 85})
    night2 = select_night(plan2, Ledger(), dt.datetime(2019, 3, 3, 21, tzinfo=BXL), by_date)
    assert len(night2.units) == 2 and night2.reason == "budget reached: max_instances"


def test_first_unit_is_taken_even_over_budget():
    plan = _plan(phases=[{"name": "all", "from": "2019-01-01", "to": "2019-01-02"}], budget={"max_instances": 5})
    night = select_night(plan, Ledger(), dt.datetime(2019, 3, 3, 21, tzinfo=BXL), _by_date([dt.date(2019, 1, 2)]))
    assert len(night.units) == 1


def test_no_unit_projected_to_start_after_the_window():
    plan = _plan(phases=[{"name": "all", "from": "2019-01-01", "to": "2019-01-03"}], budget={})
    by_date = _by_date([dt.date(2019, 1, d) for d in (1, 2, 3)], per_modality=100)  # 400 instances a day
    # 05:50 with 40 instances/s: each day takes 10 s, so all fit; at 05:59:55 only one starts.
    assert len(select_night(plan, Ledger(), dt.datetime(2019, 3, 4, 5, 50, tzinfo=BXL), by_date, 40).units) == 3
    late = select_night(plan, Ledger(), dt.datetime(2019, 3, 4, 5, 59, 55, tzinfo=BXL), by_date, 40)
    assert len(late.units) == 1 and "window closes" in late.reason


def test_failed_units_retried_until_attempts_spent_and_delta_checks_first():
    plan = _plan(phases=[{"name": "all", "from": "2019-03-01", "to": "2019-03-02"}], budget={})
    ledger = Ledger()
    now = dt.datetime(2019, 3, 3, 21, tzinfo=BXL)
    first = select_night(plan, ledger, now)
    assert [u.study_date.day for u in first.units] == [2, 1]
    results = [
        {"unit": first.units[0].to_json(), "state": "done", "migrated": 40, "seconds": 4.0},
        {"unit": first.units[1].to_json(), "state": "failed", "migrated": 0, "seconds": 1.0},
    ]
    entry = record_night(ledger, first, [UnitResult.from_json(r) for r in results], now, "run-1")
    assert entry["done"] == 1 and entry["failed"] == 1
    assert ledger.measured_rate() == pytest.approx(40 / 5)
    second = select_night(plan, ledger, now + dt.timedelta(days=1))
    assert [(u.study_date.day, u.kind) for u in second.units] == [(2, "delta"), (1, "phase")]
    record_night(
        ledger, second, [UnitResult.from_json({"unit": second.units[1].to_json(), "state": "failed"})], now, "run-2"
    )
    third = select_night(plan, ledger, now + dt.timedelta(days=2))
    assert [u.kind for u in third.units] == ["delta"] and third.given_up == ("2019-03-01|*",)


def test_eta_from_measured_rate():
    plan = _plan(phases=[{"name": "all", "from": "2019-03-01", "to": "2019-03-02"}], budget={})
    ledger = Ledger()
    u = Unit(dt.date(2019, 3, 2), None, "all")
    night = NightPlan(dt.date(2019, 3, 3), None, (u,), "", 1)
    record_night(
        ledger,
        night,
        [UnitResult.from_json({"unit": u.to_json(), "state": "done", "migrated": 100, "seconds": 10})],
        dt.datetime(2019, 3, 3, 22, tzinfo=BXL),
        "r",
    )
    status = eta(plan, ledger, dt.date(2019, 3, 3), _by_date([dt.date(2019, 3, 1)], per_modality=9000), 1.0)
    assert status["units_done"] == 1 and status["units_left"] == 1
    assert status["instances_left"] == 36000 and status["rate_instances_s"] == 10 and status["rate_measured"]
    assert status["hours_left"] == 1.0 and status["nights_left"] == 1
    assert Ledger.from_bytes(ledger.to_bytes()).units[u.key].state == UnitState.DONE


def _series(uid: str, sops: list[str]) -> CensusSeries:
    return CensusSeries("1.2.3", uid, "CT", dt.date(2019, 3, 1), None, tuple(ExpectedInstance(s, "") for s in sops))


def test_resume_fetches_only_series_with_new_or_unresolved_instances():
    old = _series("1.2.3.1", ["1", "2"])
    grown = _series("1.2.3.2", ["3", "4"])  # "4" arrived after the first run
    retry = _series("1.2.3.3", ["5"])  # unresolved last time
    previous = pd.DataFrame(
        [
            {"sop_instance_uid": "1", "in_census": True, "state": "migrated", "series_instance_uid": "1.2.3.1"},
            {"sop_instance_uid": "2", "in_census": True, "state": "quarantined", "series_instance_uid": "1.2.3.1"},
            {"sop_instance_uid": "3", "in_census": True, "state": "migrated", "series_instance_uid": "1.2.3.2"},
            {"sop_instance_uid": "5", "in_census": True, "state": "unresolved", "series_instance_uid": "1.2.3.3"},
            {"sop_instance_uid": "9", "in_census": False, "state": "quarantined", "series_instance_uid": "1.2.3.9"},
        ]
    )
    fetch, carried = plan_resume([old, grown, retry], previous)
    assert [s.series_instance_uid for s in fetch] == ["1.2.3.2", "1.2.3.3"]
    assert sorted(carried.sop_instance_uid) == ["1", "2"]
    assert plan_resume([old], None) == ([old], None)


def test_estimates_leave_out_what_done_units_moved():
    plan = _plan(
        phases=[
            {"name": "ct-mr", "from": "2019-01-01", "to": "2019-01-01", "modalities": ["CT", "MR"]},
            {"name": "rest", "from": "2019-01-01", "to": "2019-01-01"},
        ],
        budget={"max_partitions": 2},
    )
    ledger = Ledger()
    by_date = _by_date([dt.date(2019, 1, 1)])
    now = dt.datetime(2019, 3, 3, 21, tzinfo=BXL)
    first = select_night(plan, ledger, now, by_date)
    assert [u.phase for u in first.units] == ["ct-mr"]  # CT+MR = 2 partitions, the rest would be 4 more
    record_night(
        ledger,
        first,
        [UnitResult.from_json({"unit": first.units[0].to_json(), "state": "done", "migrated": 20, "seconds": 1})],
        now,
        "r1",
    )
    second = select_night(plan, ledger, now + dt.timedelta(days=1), by_date)
    assert [(u.phase, u.kind) for u in second.units] == [("ct-mr", "delta"), ("rest", "phase")]  # CR+US: 2
    assert eta(plan, ledger, now.date(), by_date, 1.0)["instances_left"] == 20


def test_unit_results_and_night_plans_cross_xcom_typed():
    """A result crosses XCom as JSON and comes back equal, in every state the
    code uses (``deferred`` included); a failure keeps the error class only."""
    from include.pacs_migration.counts import PartitionCounts
    from include.pacs_migration.plan import PartitionAction, PartitionResult, UnitState

    u = Unit(dt.date(2019, 3, 2), ("CT",), "p1", "delta")
    done = UnitResult(
        u,
        UnitState.DONE,
        3,
        1.5,
        (
            PartitionResult("2019-03-02/CT", PartitionAction.DELTA, True, PartitionCounts(3, 3, 0, 0, 0, 3, {})),
            PartitionResult("2019-03-02/MR", PartitionAction.UNCHANGED, True),
        ),
    )
    for result in (done, UnitResult.deferred(u), UnitResult.failed(u, "DicomNetworkError")):
        assert UnitResult.from_json(json.loads(json.dumps(result.to_json()))) == result
    night = NightPlan(dt.date(2019, 3, 3), dt.datetime(2019, 3, 4, 6, tzinfo=BXL), (u,), "budget", 4, ("x",))
    assert NightPlan.from_json(json.loads(json.dumps(night.to_json()))) == night
    assert {s.value for s in UnitState} >= {"pending", "done", "failed", "deferred"}
