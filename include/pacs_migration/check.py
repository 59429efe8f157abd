"""``check-config``: everything a site can get wrong before the first night,
checked at once: the YAML (every key and type), the rule set and its
crosswalk, the TLS files, and optionally the source (C-ECHO) and the bucket
(HEAD). Pure: the peers are injected."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, MigrationConfig, deep_merge, load_config, read_yaml

# Host and port come from the Airflow Connection ``pacs_source``, not the YAML.
PLACEHOLDER_SOURCE = {"host": "connection-pacs-source", "port": 104}


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'}  {self.name}: {self.detail}"


def check_config(
    path: Path,
    overrides: dict[str, Any] | None = None,
    echo: Callable[[MigrationConfig], int] | None = None,
    head_bucket: Callable[[MigrationConfig], None] | None = None,
) -> list[Check]:
    """The checks in order; the peers only when the file itself is valid."""
    try:
        data = deep_merge(read_yaml(path), {"source": PLACEHOLDER_SOURCE})
        if isinstance(data.get("sources"), list):  # each further archive's host and port come from its Connection
            data["sources"] = [{**PLACEHOLDER_SOURCE, **s} if isinstance(s, dict) else s for s in data["sources"]]
        cfg = load_config(deep_merge(data, overrides or {}), path.parent)
    except ConfigError as exc:
        return [Check("configuration", False, str(exc))]
    checks = [
        Check("configuration", True, f"{path} (every key known, every type exact)"),
        Check(
            "rule set",
            True,
            f"{cfg.ruleset.label}, {len(cfg.ruleset.rules)} site rule(s)"
            + (f", crosswalk of {len(cfg.ruleset.crosswalk.table)} row(s)" if cfg.ruleset.crosswalk else ""),
        ),
        Check("dicom tls", True, "files readable" if any(s.tls for s in cfg.archives) else "not configured"),
    ]
    if cfg.sources:
        named = [f"{s.name} (pool {cfg.pool_of(s)}, issuer {s.issuer_of_patient_id or 'as sent'})" for s in cfg.sources]
        checks.append(Check("sources", True, f"{len(cfg.archives)} archives: the first, " + ", ".join(named)))
    if echo is not None:
        checks.append(_peer("source C-ECHO", lambda: _echo_detail(echo(cfg), cfg)))
    if head_bucket is not None:
        checks.append(_peer("bucket", lambda: (head_bucket(cfg), f"s3://{cfg.target.bucket} reachable")[1]))
    return checks


def _echo_detail(status: int, cfg: MigrationConfig) -> str:
    peer = f"{cfg.source.called_ae_title}@{cfg.source.host}:{cfg.source.port}"
    if status != 0:
        raise RuntimeError(f"{peer} answered status 0x{status:04X}")
    return f"{peer} answered"


def _peer(name: str, run: Callable[[], str]) -> Check:
    try:
        return Check(name, True, run())
    except Exception as exc:  # reported, not raised: every check is listed
        return Check(name, False, f"{type(exc).__name__}: {exc}")
