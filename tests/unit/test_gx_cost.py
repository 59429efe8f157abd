"""Issue 22: what every validate task paid again for GX. Data Docs' templates are
compiled once per process (and not at all in a task forked from a warmed-up
worker); GX no longer parses a YAML file on every read of a context variable."""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import sys
from pathlib import Path

import jinja2
import pandas as pd
import pytest
from great_expectations.core.yaml_handler import YAMLHandler

from include.pacs_migration.config import ValidationConfig
from include.pacs_migration.partition import Partition
from include.pacs_migration.validate import _suites, gx, run_suites, warm_up
from tests.forked import in_fork

P = Partition(dt.date(2020, 1, 2), "CT")


def _frames() -> dict[str, pd.DataFrame]:
    expected = pd.DataFrame(
        {"series_instance_uid": ["1.2.3"] * 3, "sop_instance_uid": ["1.2.3.1", "1.2.3.2", "1.2.3.3"]}
    )
    return {"expected": expected.assign(state=["migrated"] * 3)}


def _run(root: Path) -> list:
    frames = _frames()
    return run_suites(root, frames, {"expected": _suites(P, 3, ValidationConfig())["expected"]}, "2020-01-02.CT")


@pytest.fixture
def counted(monkeypatch):
    """Calls of jinja's template parser and of GX's YAML loader."""
    calls = {"templates": 0, "yaml": 0}
    parse, load = jinja2.Environment._parse, YAMLHandler.load

    def counting_parse(self, *a, **k):
        calls["templates"] += 1
        return parse(self, *a, **k)

    def counting_load(self, *a, **k):
        calls["yaml"] += 1
        return load(self, *a, **k)

    monkeypatch.setattr(jinja2.Environment, "_parse", counting_parse)
    monkeypatch.setattr(YAMLHandler, "load", counting_load)
    return calls


def test_data_docs_templates_are_compiled_once_per_process(tmp_path, counted):
    outcomes = _run(tmp_path / "first")
    assert [o.success for o in outcomes] == [True] * len(outcomes)
    counted["templates"] = 0
    _run(tmp_path / "second")
    assert counted["templates"] == 0  # every view of the second partition's docs took them compiled
    site = tmp_path / "second" / "gx" / "uncommitted" / "data_docs" / "local_site"
    pages = [p for p in site.rglob("*.html") if "validations" in p.parts]
    assert (site / "index.html").is_file() and len(pages) == 1
    assert "values must never be null" in pages[0].read_text()  # GX's page, rendered as GX renders it


def test_a_partition_reads_gx_context_variables_without_parsing_yaml_each_time(tmp_path, counted):
    _run(tmp_path / "warm")
    counted["yaml"] = 0
    gx().get_context(mode="file", project_root_dir=str(tmp_path / "bare"))
    scaffold, counted["yaml"] = counted["yaml"], 0  # what creating the project takes (~30)
    _run(tmp_path / "gx")
    # Before: one more per read of a context variable (its config_variables.yml; 17 here, ~90 a real partition).
    assert counted["yaml"] <= scaffold + 3, (scaffold, counted)
    assert not (tmp_path / "gx" / "gx" / "uncommitted" / "config_variables.yml").exists()


def test_a_task_forked_from_a_warmed_up_worker_compiles_no_template(tmp_path):
    """What ``airflow_local_settings`` does before it forks tasks: ``warm_up()``."""
    warm_up()

    def task() -> list[str]:
        compiled: list[str] = []
        parse = jinja2.Environment._parse
        jinja2.Environment._parse = lambda self, *a, **k: compiled.append(a[1]) or parse(self, *a, **k)
        _run(tmp_path / "task")
        return compiled

    assert in_fork(task) == []
    assert "include.pacs_migration.gx_views" in sys.modules


def test_the_uid_expectation_warns_nothing_into_task_logs(tmp_path):
    """Every validate task logged pandas' "This pattern is interpreted as a regular expression,
    and has match groups" (the UID pattern had capturing groups): noise in every task log,
    and a warning machinery pass per partition. The pattern still tells UIDs from non-UIDs."""
    import warnings

    suite = [e for e in _suites(P, 4, ValidationConfig())["migrated"] if "regex" in e.configuration.kwargs]
    frame = pd.DataFrame({"sop_instance_uid": ["1.2.3", "1.2.840.10008.1.2", "1.02.3", "1..2"]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (outcome,) = run_suites(tmp_path, {"migrated": frame}, {"migrated": suite}, "2020-01-02.CT")
    assert not [w for w in caught if "match groups" in str(w.message)]
    assert not outcome.success and outcome.unexpected_count == 2  # a leading zero, an empty component


def _failing_migrated() -> pd.DataFrame:
    """A migrated frame for which most of the suite's checks find something."""
    return pd.DataFrame(
        {
            "study_date": ["20200102", "20200102", "20200103", "20200102"],
            "modality": ["CT", "CT", "MR", "CT"],
            "sop_instance_uid": ["1.2.3", "1.2.840.10008.1.2", "1.02.3", "1..2"],
            "transfer_syntax_out": ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", None],
            "checksum_verified": [True, False, True, True],
            "object_key": ["a", "b", "b", "d"],
            "object_sha256": ["a", None, "c", "d"],
            "reason": [None, None, "SOURCE_DELETED", None],
        }
    )


def test_a_suite_run_builds_each_expectations_configuration_once(tmp_path, monkeypatch):
    """GX rebuilds an expectation's configuration (a pydantic dump) on every read: ~80 times
    an expectation in a suite run, a quarter of the suites' CPU. Our runs build each once,
    and GX reaches the same outcomes as without."""
    from great_expectations.expectations import expectation_configuration as ec

    from include.pacs_migration import validate

    built = {"n": 0}
    init = ec.ExpectationConfiguration.__init__

    def counting(self, *a, **k):
        built["n"] += 1
        return init(self, *a, **k)

    monkeypatch.setattr(ec.ExpectationConfiguration, "__init__", counting)

    def run(root: Path) -> tuple[list, int]:
        suite = _suites(P, 4, ValidationConfig(source_deleted="hold"))["migrated"]
        built["n"] = 0
        return run_suites(root, {"migrated": _failing_migrated()}, {"migrated": suite}, "2020-01-02.CT"), built["n"]

    memoized, once = run(tmp_path / "memoized")
    monkeypatch.setattr(validate, "_configurations_memoized", contextlib.nullcontext)
    as_gx, every_read = run(tmp_path / "as-gx")
    assert memoized == as_gx
    assert sum(not o.success for o in memoized) >= 6  # the comparison covers failures, not only passes
    assert once * 3 < every_read, (once, every_read)  # 176 against 798 here


def test_outside_our_suite_runs_gx_builds_the_configuration_as_it_always_did():
    """The memo lives only inside a suite run: a configuration read elsewhere (adding a
    suite, Data Docs, another thread) follows the expectation's changes."""
    (expectation,) = _suites(P, 4, ValidationConfig())["studies"]
    assert expectation.configuration.kwargs["max_value"] == 1
    expectation.max_value = 2
    assert expectation.configuration.kwargs["max_value"] == 2
    assert expectation.configuration is not expectation.configuration


def test_a_partitions_gx_project_file_is_not_rewritten_for_each_change(tmp_path, monkeypatch):
    """GX rewrote great_expectations.yml on each change of a partition's project (the Data Docs
    site, the data source, its asset, its batch definition: 4 YAML dumps, ~50 ms a partition).
    The file is built once a process; each partition's names its own data source, with ids of
    its own, as GX would have written it."""
    from great_expectations.data_context.types.base import BaseYamlConfig

    _run(tmp_path / "warm")
    dumps = {"n": 0}
    to_yaml = BaseYamlConfig.to_yaml_str

    def counting(self, *a, **k):
        dumps["n"] += 1
        return to_yaml(self, *a, **k)

    monkeypatch.setattr(BaseYamlConfig, "to_yaml_str", counting)
    _run(tmp_path / "second")
    assert dumps["n"] == 0
    project = {p: (p / "gx" / "great_expectations.yml").read_text() for p in (tmp_path / "warm", tmp_path / "second")}
    for text in project.values():
        assert '"2020-01-02.CT":\n    type: pandas' in text and "\n  partition:" not in text
    ids = [set(re.findall(r"\bid: (\S+)", text)) for text in project.values()]
    assert len(ids[0]) == 3 and not ids[0] & ids[1]  # data source, asset, batch definition
    results = list((tmp_path / "second" / "gx" / "uncommitted" / "validations").rglob("*.json"))
    assert [r.name for r in results] == ["2020-01-02.CT-frames.json"]  # published as before
