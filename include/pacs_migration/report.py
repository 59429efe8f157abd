"""The validation report e-mailed to compliance: per-partition figures, the
validation verdict and failed expectations. Built from manifests only, so it
holds no patient names, IDs, birth dates or accession numbers."""

from __future__ import annotations

import csv
import html
import io
from dataclasses import dataclass, field

FIELDS = ("expected", "migrated", "quarantined", "unresolved", "unsolicited", "written")


@dataclass(frozen=True)
class PartitionFigures:
    partition: str
    expected: int
    migrated: int
    quarantined: int
    unresolved: int
    unsolicited: int
    written: int
    validation_passed: bool | None
    reasons: dict[str, int] = field(default_factory=dict)
    failed_expectations: tuple[str, ...] = ()

    @property
    def conserved(self) -> bool:
        return self.expected == self.migrated + self.quarantined + self.unresolved


def subject(prefix: str, study_date: str, figures: list[PartitionFigures]) -> str:
    ok = all(f.validation_passed for f in figures) and all(f.conserved for f in figures)
    verdict = "PASSED" if ok else "FAILED"
    return f"{prefix} StudyDate {study_date}: {len(figures)} partition(s), validation {verdict}"


def figures_csv(figures: list[PartitionFigures]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["partition", *FIELDS, "validation_passed", "reasons", "failed_expectations"])
    for f in figures:
        w.writerow(
            [
                f.partition,
                *(getattr(f, n) for n in FIELDS),
                f.validation_passed,
                ";".join(f"{k}={v}" for k, v in f.reasons.items()),
                ";".join(f.failed_expectations),
            ]
        )
    return buf.getvalue()


_CSS = """
body{font-family:Arial,Helvetica,sans-serif;color:#1d2733;margin:16px}
h1{font-size:20px;margin:0 0 4px}
p.meta{color:#5b6673;margin:0 0 16px;font-size:13px}
table{border-collapse:collapse;font-size:13px;min-width:640px}
th,td{border:1px solid #c9d1da;padding:5px 9px;text-align:right}
th{background:#eef2f6} td.k,th.k{text-align:left}
td.pass{color:#116329;font-weight:bold} td.fail{color:#a40e26;font-weight:bold}
tr.total td{font-weight:bold;background:#f6f8fa}
ul{font-size:13px}
"""


def render_html(run_id: str, study_date: str, figures: list[PartitionFigures], bucket_uri: str) -> str:
    """Self-contained HTML (inline CSS, no external assets)."""
    e = html.escape
    rows = []
    for f in figures:
        verdict = "pass" if f.validation_passed else "fail"
        cells = "".join(f'<td data-field="{n}">{getattr(f, n)}</td>' for n in FIELDS)
        rows.append(
            f'<tr data-partition="{e(f.partition)}"><td class="k">{e(f.partition)}</td>{cells}'
            f'<td class="{verdict}" data-field="validation">{"PASSED" if f.validation_passed else "FAILED"}</td></tr>'
        )
    totals = {n: sum(getattr(f, n) for f in figures) for n in FIELDS}
    rows.append(
        '<tr class="total" data-partition="TOTAL"><td class="k">Total</td>'
        + "".join(f'<td data-field="{n}">{totals[n]}</td>' for n in FIELDS)
        + "<td></td></tr>"
    )
    details = []
    for f in figures:
        if f.reasons:
            details.append(
                f"<li>{e(f.partition)} reasons: " + ", ".join(f"{e(k)} &times; {v}" for k, v in f.reasons.items()) + "</li>"
            )
        for fe in f.failed_expectations:
            details.append(f"<li>{e(f.partition)} failed expectation: <code>{e(fe)}</code></li>")
    if not figures:
        details.append("<li>The census found no studies for this date.</li>")
    head = "".join(f"<th>{n.capitalize()}</th>" for n in FIELDS)
    return (
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>PACS migration report</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<h1>PACS migration report &mdash; StudyDate {e(study_date)}</h1>"
        f'<p class="meta">Run <code>{e(run_id)}</code> &middot; target {e(bucket_uri)} &middot; '
        "every expected instance ends migrated, quarantined (original bytes kept, with a reason) or unresolved.</p>"
        f'<table><thead><tr><th class="k">Partition</th>{head}<th>Validation</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
        f"<ul>{''.join(details)}</ul>"
        "</body></html>"
    )
