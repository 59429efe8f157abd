"""Strict config (issue 13.10): unknown keys name the nearest valid one, types
are exact, crosswalk errors name file, line and column; parsing and tasks read one file."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from include.pacs_migration.config import ConfigError, load_config, read_yaml
from include.pacs_migration.rules import RuleSetError, parse_ruleset

CONFIG_DIR = Path(__file__).resolve().parents[2] / "include" / "config"


def _base() -> dict:
    data = read_yaml(CONFIG_DIR / "migration.yaml")
    data["source"].update(host="pacs.local", port=104)
    return data


def _error(data: dict) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(data, CONFIG_DIR)
    return info.value


def test_bundled_config_is_valid():
    assert load_config(_base(), CONFIG_DIR).ruleset.id != "structural"


@pytest.mark.parametrize(
    "path, wrong, near",
    [
        ((), "normalisation", "normalization"),
        ((), "validaton", "validation"),
        (("source",), "max_asociations", "source.max_associations"),
        (("plan", "window"), "strat", "plan.window.start"),
    ],
)
def test_unknown_key_names_the_nearest(path, wrong, near):
    data = _base()
    section = data
    for p in path:
        section = section[p]
    right = near.split(".")[-1]
    section[wrong] = section.pop(right)
    err = _error(data)
    assert err.field == ".".join((*path, wrong)) and f"did you mean '{near}'" in str(err)


def test_unknown_key_inside_a_list_item():
    data = _base()
    data["plan"]["phases"][0]["modalitys"] = ["CT"]
    assert _error(data).field == "plan.phases[0].modalitys"


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("validation", "max_quarantined_fraction", True),
        ("target", "upload_threads", "8"),
        ("source", "max_associations", 2.5),
        ("source", "port", "104"),
    ],
)
def test_types_are_exact(section, key, value):
    data = copy.deepcopy(_base())
    data[section][key] = value
    assert _error(data).field == f"{section}.{key}"


def _crosswalk(tmp_path: Path, raw: bytes, **extra) -> RuleSetError | None:
    (tmp_path / "cw.csv").write_bytes(raw)
    try:
        parse_ruleset({"id": "x", "version": "1", "crosswalk": {"file": "cw.csv", **extra}}, tmp_path)
    except RuleSetError as exc:
        return exc
    return None


HEADER = b"old_patient_id,old_issuer,new_patient_id,new_issuer\n"


def test_crosswalk_short_row_names_line(tmp_path):
    err = _crosswalk(tmp_path, HEADER + b"A1,H,M1,MPI\nA2,H\n")
    assert err is not None and "cw.csv line 3" in str(err) and "2 columns" in str(err)


def test_crosswalk_empty_cell_names_line_and_column(tmp_path):
    err = _crosswalk(tmp_path, HEADER + b"A1,H,,MPI\n")
    assert err is not None and "line 2 column 3 (new_patient_id)" in str(err)


def test_crosswalk_bom_is_handled(tmp_path):
    assert _crosswalk(tmp_path, b"\xef\xbb\xbf" + HEADER + b"A1,H,M1,MPI\n") is None


def test_crosswalk_latin1_needs_a_declared_encoding(tmp_path):
    raw = HEADER + b"A1,H\xf4pital,M1,MPI\n"
    err = _crosswalk(tmp_path, raw)
    assert err is not None and "line 2" in str(err) and "encoding" in str(err)
    assert _crosswalk(tmp_path, raw, encoding="latin-1") is None


def test_crosswalk_missing_column_names_header(tmp_path):
    err = _crosswalk(tmp_path, b"old_id,new_patient_id\nA,B\n")
    assert err is not None and "line 1" in str(err) and "old_patient_id" in str(err)


def test_dag_parsing_and_tasks_read_one_file(tmp_path, monkeypatch):
    from include import pacs_migration_dags as parse_time

    site = tmp_path / "site.yaml"
    data = _base()
    data["source"]["max_associations"] = 5
    data["plan"]["window"] = {"start": "21:30", "end": "05:00"}
    import yaml

    site.write_text(yaml.safe_dump(data))
    monkeypatch.setenv(parse_time.CONFIG_ENV, str(site))
    assert parse_time.config_path() == site
    assert parse_time.associations_per_task() == 5
    assert parse_time.nightly_cron()[0] == "30 21 * * *"


def test_census_associations_stay_within_max_associations():
    """Issue 22: the census asks ``census_associations`` studies at once, within the PACS's budget."""
    data = _base()
    data["source"].update(max_associations=2, census_associations=3)
    err = _error(data)
    assert err.field == "source.census_associations" and "more than max_associations (2)" in str(err)
    data["source"]["census_associations"] = 2
    assert load_config(data, CONFIG_DIR).source.census_associations == 2
