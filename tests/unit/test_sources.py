"""Several source archives (issue 21), the pure parts: the config's sources,
partition keys with a source, the issuer given to instances without one, the
per-source report table and the overlap of two archives' studies and patients."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file

from include.pacs_migration.assessment import overlap
from include.pacs_migration.config import ConfigError, load_config
from include.pacs_migration.counts import PartitionCounts
from include.pacs_migration.partition import Partition
from include.pacs_migration.report import PartitionFigures, source_figures
from include.pacs_migration.rules.apply import apply_ruleset
from include.pacs_migration.rules.model import RuleSet

BASE = {
    "source": {"host": "pacs-a", "port": 104, "called_ae_title": "PACSA", "calling_ae_title": "MIGRATE"},
    "target": {"bucket": "pacs-archive"},
    "report": {"recipients": ["c@h.example"], "from_address": "p@h.example"},
}
NORTH = {"name": "north", "host": "pacs-b", "port": 11112, "called_ae_title": "PACSB", "calling_ae_title": "MIGRATE"}


def test_sources_are_named_unique_and_carry_their_window_and_budget():
    cfg = load_config(
        {
            **BASE,
            "plan": {"timezone": "Europe/Brussels", "budget": {"max_partitions": 9}},
            "sources": [{**NORTH, "window": {"start": "22:00", "end": "04:00"}, "budget": {"max_instances": 5}}],
        }
    )
    assert [s.label for s in cfg.archives] == ["", "north"]
    assert [cfg.pool_of(s) for s in cfg.archives] == ["pacs_source_associations", "pacs_source_associations_north"]
    north_plan, first_plan = cfg.plan_for(cfg.source_named("north")), cfg.plan_for(cfg.source)
    assert (north_plan.window.start, north_plan.window.timezone) == (dt.time(22), "Europe/Brussels")
    assert north_plan.max_instances == 5 and north_plan.max_partitions is None
    assert first_plan.window.start == dt.time(20) and first_plan.max_partitions == 9
    with pytest.raises(ConfigError, match="sources"):
        cfg.source_named("south")


@pytest.mark.parametrize(
    ("sources", "field"),
    [
        ([{**NORTH, "name": None}], "sources[0].name"),
        ([NORTH, NORTH], "sources[1].name"),
        ([{**NORTH, "name": "default"}], "sources[0].name"),  # how reports name the first source
        ([{**NORTH, "name": "North Site"}], "sources[0].name"),
        ([{**NORTH, "issuer_of_patient_id": "A\\B"}], "sources[0].issuer_of_patient_id"),
        ([{**NORTH, "window": {"start": "22:00", "end": "04:00", "timezone": "UTC"}}], "sources[0].window.timezone"),
    ],
)
def test_a_bad_source_names_its_field(sources, field):
    with pytest.raises(ConfigError) as err:
        load_config({**BASE, "sources": [{k: v for k, v in s.items() if v is not None} for s in sources]})
    assert err.value.field == field


def test_partition_keys_carry_the_source_only_when_named():
    first, north = Partition(dt.date(2019, 3, 1), "CT"), Partition(dt.date(2019, 3, 1), "CT", "north")
    assert (first.key, first.hive_path) == ("2019-03-01/CT", "date=2019-03-01/modality=CT")
    assert (north.key, north.hive_path) == ("north/2019-03-01/CT", "source=north/date=2019-03-01/modality=CT")
    assert north.date_key == first.date_key == "2019-03-01/CT"
    for p in (first, north):
        assert Partition.parse(p.key) == p == Partition.from_json(p.to_json()) == Partition.from_hive(p.hive_path)
    assert "source" not in first.to_json()
    for bad in ("a/b/2019-03-01/CT", "North/2019-03-01/CT"):
        with pytest.raises(ValueError):
            Partition.parse(bad)


def test_the_source_issuer_goes_to_instances_without_one_before_the_crosswalk():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientID = "12345"
    if "IssuerOfPatientID" in ds:
        del ds.IssuerOfPatientID
    out = apply_ruleset(RuleSet("site", "1", default_issuer="NORTH"), ds)
    assert ds.IssuerOfPatientID == "NORTH"
    assert [(c.keyword, c.rule_id, c.old, c.new) for c in out.changes] == [
        ("IssuerOfPatientID", "source-issuer", None, "NORTH")
    ]
    ds.IssuerOfPatientID = "HOSPITAL-A"  # an issuer the instance states is kept
    assert not apply_ruleset(RuleSet("site", "1", default_issuer="NORTH"), ds).changes
    assert ds.IssuerOfPatientID == "HOSPITAL-A"
    assert RuleSet("site", "1", default_issuer="NORTH").label == "site@1"  # same rule set, whatever the source


def test_the_report_sums_each_source_archive():
    def fig(key: str, migrated: int, shared: int = 0, conflicts: tuple[str, ...] = ()) -> PartitionFigures:
        c = PartitionCounts(migrated + len(conflicts), migrated, len(conflicts), 0, 0, migrated - shared, {}, shared)
        return PartitionFigures(key, c, True, source_conflicts=conflicts)

    assert source_figures([fig("2019-03-01/CT", 5)]) == []  # one unnamed source: no table
    rows = source_figures(
        [
            fig("2019-03-01/CT", 5),
            fig("north/2019-03-01/CT", 4, shared=3, conflicts=("1.2.3: ...",)),
            fig("north/2019-03-01/MR", 2),
        ]
    )
    assert rows == [
        {"source": "default", "partitions": 1, "expected": 5, "migrated": 5, "shared": 0, "quarantined": 0,
         "unresolved": 0, "written": 5, "conflicts": 0},
        {"source": "north", "partitions": 2, "expected": 7, "migrated": 6, "shared": 3, "quarantined": 1,
         "unresolved": 0, "written": 3, "conflicts": 1},
    ]  # fmt: skip


def test_overlap_counts_shared_studies_same_patients_and_collisions():
    south = pd.DataFrame({"study_instance_uid": ["s1", "s2", "s3"], "patient_key": ["pA", "pB", "pC"]})
    north = pd.DataFrame({"study_instance_uid": ["s1", "s4", "s5"], "patient_key": ["pA", "pB", None]})
    (row,) = overlap({"south": south, "north": north})
    assert row == {
        "source_a": "north",
        "source_b": "south",
        "studies_a": 3,
        "studies_b": 3,
        "studies_in_both": 1,
        "patient_ids_a": 2,
        "patient_ids_b": 3,
        "patient_ids_in_both": 2,
        "same_patient_by_shared_study": 1,  # pA: study s1 names it at both sites
        "colliding_patient_ids": 1,  # pB: the same ID, no common study
    }


def test_a_requested_study_must_be_found_by_some_archive():
    from include.pacs_migration.request import RunRequest
    from include.pacs_migration.steps import requested_not_found

    request = RunRequest.from_params({"study_uids": ["1.2.3", "1.2.4"]}, None)
    found = [{"study_date": "2019-03-01", "modality": "CT", "studies": ["1.2.3"]}]
    assert requested_not_found(request, found) == ["study_uids[1]"]
    assert requested_not_found(request, [*found, {"source": "north", "studies": ["1.2.4"]}]) == []
    assert requested_not_found(request, []) == ["the requested studies: no source archive holds any of them"]
    assert requested_not_found(RunRequest.from_params({"study_date": "2019-03-01"}, None), []) == []
