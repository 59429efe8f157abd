"""Dry run: what a rule set would do to a set of instances, writing nothing.

Reports counts only (per rule, per attribute, per structural change, per
quarantine reason), never values: the report may be logged or shared.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .normalize import normalize
from .rules import RuleSet


@dataclass
class DryRunReport:
    ruleset: str
    files: int = 0
    would_migrate: int = 0
    would_quarantine: Counter[str] = field(default_factory=Counter)
    rules: Counter[str] = field(default_factory=Counter)  # rule id -> instances it would change
    attributes: Counter[str] = field(default_factory=Counter)  # "rule id:keyword" -> instances
    structural: Counter[str] = field(default_factory=Counter)  # e.g. "transfer_syntax" -> instances

    def add(self, changes: list[str], rules_applied: list[str], reason: str | None) -> None:
        self.files += 1
        if reason is not None:
            self.would_quarantine[reason] += 1
            return
        self.would_migrate += 1
        self.rules.update(set(rules_applied))
        for change in changes:
            kind, _, detail = change.partition(":")
            if kind == "rule":
                self.attributes[detail] += 1
            else:
                self.structural[kind] += 1

    def to_json(self) -> dict[str, Any]:
        return {
            "ruleset": self.ruleset,
            "files": self.files,
            "would_migrate": self.would_migrate,
            "would_quarantine": dict(sorted(self.would_quarantine.items())),
            "rules": dict(sorted(self.rules.items())),
            "attributes": dict(sorted(self.attributes.items())),
            "structural": dict(sorted(self.structural.items())),
        }

    def render(self) -> str:
        lines = [
            f"rule set {self.ruleset}: {self.files} instance(s), {self.would_migrate} would migrate, "
            f"{sum(self.would_quarantine.values())} would be quarantined"
        ]
        for title, counter in (
            ("quarantine reason", self.would_quarantine),
            ("rule", self.rules),
            ("attribute changed", self.attributes),
            ("structural change", self.structural),
        ):
            for key, n in sorted(counter.items()):
                lines.append(f"  {title:<18} {key:<48} {n}")
        return "\n".join(lines)


def dry_run(instances: Iterable[bytes], ruleset: RuleSet, source_ae: str | None = None) -> DryRunReport:
    """Normalize each instance in memory and count what would change."""
    report = DryRunReport(ruleset.label)
    for raw in instances:
        result = normalize(raw, ruleset=ruleset, source_ae=source_ae)
        report.add(result.changes, result.rules_applied, result.reason)
    return report
