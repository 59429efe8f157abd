"""check-config: the file, the rule set, the crosswalk and the TLS files at
once, and the peers when asked; the same checks the tasks make."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from include.pacs_migration.check import check_config
from include.pacs_migration.config import SourceConfig, load_config

CONFIG = Path(__file__).resolve().parents[2] / "include" / "config"


def _site(tmp_path: Path, **changes) -> Path:
    shutil.copytree(CONFIG / "rules", tmp_path / "rules", dirs_exist_ok=True)
    data = yaml.safe_load((CONFIG / "migration.yaml").read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        data.setdefault(section, {})[key] = value
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_bundled_file_checks_clean(tmp_path):
    checks = check_config(_site(tmp_path))
    assert [c.ok for c in checks] == [True, True, True], [c.line() for c in checks]


def test_a_bad_key_or_rule_set_names_the_field(tmp_path):
    (bad,) = check_config(_site(tmp_path, source__max_asociations=2))
    assert not bad.ok and "source.max_asociations: unknown key; did you mean 'source.max_associations'" in bad.detail
    (bad,) = check_config(_site(tmp_path, normalization__ruleset="rules/missing.yaml"))
    assert not bad.ok and bad.detail.startswith("normalization.ruleset:")
    (bad,) = check_config(_site(tmp_path, source__tls={"ca_file": "tls/none.pem"}))
    assert not bad.ok and bad.detail.startswith("source.tls.ca_file:")


def test_peers_are_checked_and_reported_not_raised(tmp_path):
    def refuse(cfg):
        raise ConnectionRefusedError("refused")

    checks = check_config(
        _site(tmp_path), {"source": {"host": "127.0.0.1", "port": 9}}, echo=lambda cfg: 0, head_bucket=refuse
    )
    assert [(c.name, c.ok) for c in checks][-2:] == [("source C-ECHO", True), ("bucket", False)]
    assert "ConnectionRefusedError" in checks[-1].detail


def test_each_default_is_declared_once(tmp_path, monkeypatch):
    """The defaults live in the models: DAG parsing of a file that leaves a key
    out gets the same value as the tasks (no second copy of a default)."""
    from include import pacs_migration_dags
    from include.pacs_migration.config import PlanConfig

    minimal = {
        "source": {"called_ae_title": "A", "calling_ae_title": "B"},
        "target": {"bucket": "bkt"},
        "report": {"recipients": ["a@b.c"], "from_address": "m@b.c"},
    }
    path = tmp_path / "minimal.yaml"
    path.write_text(yaml.safe_dump(minimal))
    monkeypatch.setenv(pacs_migration_dags.CONFIG_ENV, str(path))
    cfg = load_config({**minimal, "source": {**minimal["source"], "host": "h", "port": 1}})
    assert pacs_migration_dags.associations_per_task() == cfg.source.max_associations
    start, zone = PlanConfig().window.start, PlanConfig().timezone
    assert pacs_migration_dags.nightly_cron() == (f"{start.minute} {start.hour} * * *", zone) == ("0 20 * * *", "UTC")
    assert SourceConfig.model_fields["max_associations"].default == cfg.source.max_associations == 2


def test_a_site_with_several_archives_checks_each(tmp_path):
    """Issue 21: a further archive's host and port come from its Connection; its other keys are checked here."""
    path = _site(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["sources"] = [{"name": "north", "called_ae_title": "NORTHPACS", "calling_ae_title": "PACSMIGRATE",
                        "issuer_of_patient_id": "NORTH"}]  # fmt: skip
    path.write_text(yaml.safe_dump(data))
    checks = check_config(path)
    assert all(c.ok for c in checks), [c.line() for c in checks]
    assert "north (pool pacs_source_associations_north, issuer NORTH)" in checks[-1].detail
    data["sources"][0]["max_associations"] = 0
    path.write_text(yaml.safe_dump(data))
    (bad,) = check_config(path)
    assert not bad.ok and bad.detail.startswith("sources[0].max_associations:")
