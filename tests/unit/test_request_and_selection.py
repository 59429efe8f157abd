"""Issue 17: a run's request (a date, or studies) and a rollback's selection,
from user input: each bad entry is named, no value that may identify a patient is echoed."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest

from include.pacs_migration.partition import Partition
from include.pacs_migration.request import RequestError, RunRequest
from include.pacs_migration.rollback import Selection, rollback_id

DAY = dt.date(2019, 3, 1)


def test_a_run_moves_a_date_or_requested_studies():
    assert RunRequest.from_params({}, DAY) == RunRequest(DAY)
    assert RunRequest.from_params({"study_date": "2019-03-02"}, DAY).study_date == dt.date(2019, 3, 2)
    r = RunRequest.from_params({"study_uids": ["1.2.3", " 1.2.4 "], "modalities": ["ct"]}, DAY)
    assert r.by_study and r.study_date is None and r.study_uids == ("1.2.3", "1.2.4") and r.modalities == ("CT",)
    assert r.wants("CT") and not r.wants("MR") and r.label() == "2 requested studies"
    assert RunRequest.from_params({"accession_numbers": "A1, A2"}, None).accession_numbers == ("A1", "A2")


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"study_uids": ["1.2.3", "1.2.x"]}, "study_uids[1]"),
        ({"accession_numbers": ["ACC-THAT-IS-FAR-TOO-LONG"]}, "accession_numbers[0]"),
        ({"modalities": ["C T"]}, "modalities[0]"),
        ({"study_date": "2019-03-01", "study_uids": ["1.2.3"]}, "study_date"),
        ({"study_date": "01/03/2019"}, "study_date"),
    ],
)
def test_bad_params_are_named(params, field):
    with pytest.raises(RequestError) as err:
        RunRequest.from_params(params, DAY)
    assert err.value.field == field
    assert "FAR-TOO-LONG" not in str(err.value)  # an accession number is not echoed


def test_every_selection_criterion_narrows_the_others():
    df = pd.DataFrame({"study_instance_uid": ["1.1", "1.1", "1.2", None], "run_id": ["r1", "r2", "r1", "r1"]})
    ct, mr = Partition(DAY, "CT"), Partition(DAY, "MR")
    assert Selection.parse(["2019-03-01/CT"]).mask(ct, df).tolist() == [True] * 4
    assert not Selection.parse(["2019-03-01/CT"]).mask(mr, df).any()
    assert Selection.parse(study_uids=["1.1"]).mask(mr, df).tolist() == [True, True, False, False]
    both = Selection.parse(["2019-03-01/CT"], ["1.1"], ["r2"])
    assert both.mask(ct, df).tolist() == [False, True, False, False]
    assert Selection.from_json(both.to_json()) == both


def test_the_rollback_id_is_the_runs_so_a_retry_resumes_it():
    at = dt.datetime(2026, 12, 6, 2, 0, tzinfo=dt.UTC)
    assert rollback_id("pacs_rollback/manual__1", at) == rollback_id("pacs_rollback/manual__1", at)
    assert rollback_id("pacs_rollback/manual__1", at) != rollback_id("pacs_rollback/manual__2", at)
    assert rollback_id("x", at).startswith("rb-20261206T020000Z-")


def test_progress_lines_say_done_rate_and_what_is_left():
    from include.pacs_migration.progress import ProgressLog

    now, lines = [0.0], []
    p = ProgressLog("partition 2019-03-01/CT", 1000, "instances", every_n=400, every_s=30, clock=lambda: now[0],
                    emit=lines.append)  # fmt: skip
    for _ in range(399):
        now[0] += 0.01
        p.tick()
    assert lines == []  # neither 400 instances nor 30 s yet
    now[0] += 0.01
    p.tick()
    assert lines == ["partition 2019-03-01/CT: 400/1000 instances (40%), 100.0/s, 600 left, ~6 s left"]
    now[0] += 31
    p.tick()
    assert len(lines) == 2 and lines[1].startswith("partition 2019-03-01/CT: 401/1000")
