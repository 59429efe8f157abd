"""The validation report e-mailed to compliance: per-partition figures, the
validation verdict and failed expectations. Built from manifests only, so it
holds no patient names, IDs, birth dates or accession numbers."""

from __future__ import annotations

import csv
import html
import io
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .counts import COUNT_FIELDS, PartitionCounts, counts_from_frame
from .manifest import PartitionManifests
from .partition import Partition
from .reasons import ReasonCode
from .store import ObjectStore

FIELDS = COUNT_FIELDS


class RunVerdict(str, Enum):
    """What the report may claim for a run."""

    PASSED = "PASSED"  # every partition of the date validated in this run
    FAILED = "FAILED"  # a partition was validated and failed
    INCOMPLETE = "INCOMPLETE"  # something could not be checked: a task failed before its proof


@dataclass(frozen=True)
class TaskFailure:
    """A task of the run that failed: its id, the partition if mapped, the
    exception class (never its message: it may quote data)."""

    task: str
    error: str
    partition: str | None = None

    def to_json(self) -> dict[str, str | None]:
        return {"task": self.task, "error": self.error, "partition": self.partition}

    @classmethod
    def from_json(cls, value: dict[str, str | None]) -> TaskFailure:
        return cls(str(value["task"]), str(value["error"]), value.get("partition"))

    @property
    def label(self) -> str:
        return f"{self.task}{f' [{self.partition}]' if self.partition else ''}: {self.error}"


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
    census_gaps: tuple[str, ...] = ()  # studies or series the census could not list, by UID
    inconsistent_patients: tuple[str, ...] = ()  # "<study UID> quarantined|flagged": more than one patient
    findings: dict[str, int] = field(default_factory=dict)  # e.g. charset:undeclared-non-ascii -> instances

    @classmethod
    def of(cls, partition: str, c: PartitionCounts, passed: bool | None, failed: tuple[str, ...] = (),
           gaps: tuple[str, ...] = (), inconsistent: tuple[str, ...] = (),
           findings: dict[str, int] | None = None) -> PartitionFigures:
        return cls(partition, c.expected, c.migrated, c.quarantined, c.unresolved, c.unsolicited, c.written, passed,
                   dict(c.reasons), failed, gaps, inconsistent, dict(findings or {}))

    @property
    def conserved(self) -> bool:
        return self.expected == self.migrated + self.quarantined + self.unresolved


def _gaps(manifests: PartitionManifests) -> tuple[str, ...]:
    try:
        series = manifests.census()
    except Exception:  # no census manifest: nothing to name
        return ()
    return tuple(f"{s.census_gap} study {s.study_instance_uid}"
                 + (f" series {s.series_instance_uid}" if s.series_instance_uid else "")
                 + (f" ({s.reported_instances} instances reported)" if s.reported_instances is not None else "")
                 for s in series if s.census_gap)


def _inconsistent(df: Any) -> tuple[str, ...]:
    """Studies naming more than one patient, by UID, with what became of them."""
    code = ReasonCode.INCONSISTENT_PATIENT.value
    quarantined = set(df.loc[df["reason"] == code, "study_instance_uid"].dropna())
    flagged = set(df.loc[df["findings"].fillna("").str.contains(code, regex=False), "study_instance_uid"].dropna())
    return tuple([f"{uid} quarantined" for uid in sorted(quarantined)]
                 + [f"{uid} flagged (migrated)" for uid in sorted(flagged - quarantined)])


def _findings(df: Any) -> dict[str, int]:
    found = Counter(f for v in df["findings"].dropna() for f in str(v).split(";") if f)
    return dict(sorted(found.items()))


def partition_figures(store: ObjectStore, partition: Partition, run_id: str) -> PartitionFigures:
    """Figures of one partition from its manifests, as this run left them. A
    partition whose transfer did not complete in this run shows the census's
    Expected, nothing migrated, and says so."""
    manifests = PartitionManifests(store, partition)
    verdict = manifests.verdict(run_id)
    df = manifests.transfer_or_none()
    if df is None or (verdict is None and not (df["run_id"] == run_id).any()):
        summary = manifests.summary()
        expected = summary.instances if summary else 0
        c = PartitionCounts(expected, 0, 0, 0, 0, 0, {})
        return PartitionFigures.of(partition.key, c, False, ("transfer:not_completed",), _gaps(manifests))
    failed = tuple(verdict.get("failed_expectations", [])) if verdict else ("validation:not_run",)
    return PartitionFigures.of(partition.key, counts_from_frame(df), bool(verdict and verdict.get("success")),
                               failed, _gaps(manifests), _inconsistent(df), _findings(df))


def run_verdict(figures: list[PartitionFigures], failures: tuple[TaskFailure, ...] = (),
                census_completed: bool = True) -> RunVerdict:
    """PASSED only when the census completed, no task failed and every
    partition validated in this run; FAILED when a proof was reached and
    failed; INCOMPLETE when something could not be checked."""
    if any(f.validation_passed is False and "validation:not_run" not in f.failed_expectations
           and "transfer:not_completed" not in f.failed_expectations for f in figures):
        return RunVerdict.FAILED
    if not census_completed or failures or not all(f.validation_passed and f.conserved for f in figures):
        return RunVerdict.INCOMPLETE
    return RunVerdict.PASSED


def data_docs_zip(store: ObjectStore, partitions: list[Partition]) -> bytes:
    """The partitions' GX Data Docs (HTML and styles), one folder each."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in partitions:
            base = PartitionManifests(store, p).gx_prefix + "data_docs/"
            for key in store.list_keys(base):
                zf.writestr(f"{p.hive_path}/{key[len(base):]}", store.get(key))
    return buf.getvalue()


def chart_svg(figures: list[PartitionFigures]) -> str:
    """Inline SVG: migrated / quarantined / unresolved per modality, stacked bars."""
    per: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for f in figures:
        m = f.partition.split("/")[-1]
        per[m][0] += f.migrated
        per[m][1] += f.quarantined
        per[m][2] += f.unresolved
    if not per:
        return ""
    colors = ("#2e7d32", "#f9a825", "#c62828")
    labels = ("migrated", "quarantined", "unresolved")
    top = max(sum(v) for v in per.values()) or 1
    bar_w, gap, left, width, row_h = 380, 8, 60, 560, 26
    height = 30 + len(per) * (row_h + gap) + 24
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        'aria-label="instances per modality" style="font-family:Arial,Helvetica,sans-serif;font-size:12px">'
    ]
    for i, (label, color) in enumerate(zip(labels, colors)):
        parts.append(f'<rect x="{left + i * 120}" y="4" width="12" height="12" fill="{color}"/>'
                     f'<text x="{left + i * 120 + 16}" y="14">{label}</text>')
    y = 30
    for modality in sorted(per):
        x = left
        parts.append(f'<text x="{left - 8}" y="{y + 17}" text-anchor="end">{html.escape(modality)}</text>')
        for value, color in zip(per[modality], colors):
            w = bar_w * value / top
            if w > 0:
                parts.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row_h}" fill="{color}"/>')
            x += w
        total = sum(per[modality])
        parts.append(f'<text x="{x + 6:.1f}" y="{y + 17}">{per[modality][0]} / {total}</text>')
        y += row_h + gap
    parts.append("</svg>")
    return "".join(parts)


def subject(prefix: str, study_date: str, figures: list[PartitionFigures], failures: tuple[TaskFailure, ...] = (),
            census_completed: bool = True) -> str:
    verdict = run_verdict(figures, failures, census_completed)
    text = f"{prefix} StudyDate {study_date}: {len(figures)} partition(s), validation {verdict.value}"
    if failures:
        first = failures[0]
        more = f" (+{len(failures) - 1} more)" if len(failures) > 1 else ""
        text += f": {first.task} failed ({first.error}){more}"
    return text


def figures_csv(figures: list[PartitionFigures]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["partition", *FIELDS, "validation_passed", "reasons", "failed_expectations", "census_gaps",
                "inconsistent_patients"])
    for f in figures:
        w.writerow(
            [
                f.partition,
                *(getattr(f, n) for n in FIELDS),
                f.validation_passed,
                ";".join(f"{k}={v}" for k, v in f.reasons.items()),
                ";".join(f.failed_expectations),
                ";".join(f.census_gaps),
                ";".join(f.inconsistent_patients),
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


def render_html(run_id: str, study_date: str, figures: list[PartitionFigures], bucket_uri: str,
                failures: tuple[TaskFailure, ...] = (), census_completed: bool = True) -> str:
    """Self-contained HTML (inline CSS, no external assets)."""
    e = html.escape
    verdict = run_verdict(figures, failures, census_completed)
    rows = []
    for f in figures:
        css = "pass" if f.validation_passed else "fail"
        not_run = {"validation:not_run", "transfer:not_completed"} & set(f.failed_expectations)
        label = "PASSED" if f.validation_passed else ("NOT VALIDATED" if not_run else "FAILED")
        cells = "".join(f'<td data-field="{n}">{getattr(f, n)}</td>' for n in FIELDS)
        rows.append(
            f'<tr data-partition="{e(f.partition)}"><td class="k">{e(f.partition)}</td>{cells}'
            f'<td class="{css}" data-field="validation">{label}</td></tr>'
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
        for gap in f.census_gaps:
            details.append(f"<li>{e(f.partition)} census gap: <code>{e(gap)}</code></li>")
        if f.findings:
            details.append(f"<li>{e(f.partition)} findings (reported, not changed): "
                           + ", ".join(f"{e(k)} &times; {v}" for k, v in f.findings.items()) + "</li>")
        for study in f.inconsistent_patients:
            details.append(f"<li>{e(f.partition)} study naming more than one patient: <code>{e(study)}</code></li>")
    if not census_completed:
        details.append("<li>The census did not complete: the expected set of this date is unknown, "
                       "nothing of it is proven.</li>")
    elif not figures:
        details.append("<li>The census found no studies for this date.</li>")
    problems = "".join(f'<li data-failure="{e(x.task)}">{e(x.label)}</li>' for x in failures)
    head = "".join(f"<th>{n.capitalize()}</th>" for n in FIELDS)
    return (
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>PACS migration report</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<h1>PACS migration report &mdash; StudyDate {e(study_date)}</h1>"
        f'<p class="verdict" data-field="verdict"><b>Validation {verdict.value}</b></p>'
        + (f'<h2 style="font-size:15px;margin:12px 0 6px">Tasks that failed</h2><ul>{problems}</ul>' if problems else "")
        +
        f'<p class="meta">Run <code>{e(run_id)}</code> &middot; target {e(bucket_uri)} &middot; '
        "every expected instance ends migrated, quarantined (original bytes kept, with a reason) or unresolved. "
        "Attached: the figures as CSV and the Great Expectations Data Docs of each partition.</p>"
        f'<table><thead><tr><th class="k">Partition</th>{head}<th>Validation</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
        f'<h2 style="font-size:15px;margin:18px 0 6px">Instances per modality</h2>{chart_svg(figures)}' 
        f"<ul>{''.join(details)}</ul>"
        "</body></html>"
    )


def render_progress_html(night: dict, results: list[dict], progress: dict, run_id: str, bucket_uri: str) -> str:
    """The nightly progress e-mail: what tonight did, per unit and partition,
    what is left and when it should be done (self-contained HTML)."""
    e = html.escape
    rows = []
    for res in results:
        unit = res["unit"]
        label = f"{unit['study_date']} {','.join(unit['modalities'] or []) or 'all modalities'} ({unit['phase']}" \
                f"{', delta check' if unit.get('kind') == 'delta' else ''})"
        state = res.get("state", "failed")
        parts = res.get("partitions") or []
        detail = "; ".join(
            f"{p['partition']}: {p['action']}" + (f", {p.get('migrated', 0)}/{p.get('expected', 0)} migrated, "
                                                   f"{p.get('written', 0)} new" if p["action"] != "unchanged" else "")
            + ("" if p.get("validation_passed") else " &mdash; <b>validation FAILED</b>")
            for p in parts) or ("not started: the window had closed" if state == "deferred" else
                                res.get("error", "no partitions"))
        css = {"done": "pass", "failed": "fail"}.get(state, "")
        rows.append(f'<tr data-unit="{e(unit["study_date"])}"><td class="k">{e(label)}</td>'
                    f'<td class="{css}" data-field="state">{e(state)}</td><td data-field="new">{res.get("migrated", 0)}</td>'
                    f'<td>{res.get("seconds", 0):.0f}</td><td class="k">{detail}</td></tr>')
    eta = progress
    planned = f"{len(night.get('units', []))} unit(s) planned; {e(night.get('reason', ''))}"
    given_up = night.get("given_up") or []
    return (
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>PACS migration: nightly progress</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<h1>Nightly migration &mdash; night of {e(str(night.get('night') or 'n/a'))}</h1>"
        f'<p class="meta">Run <code>{e(run_id)}</code> &middot; target {e(bucket_uri)} &middot; {planned}</p>'
        '<table><thead><tr><th class="k">Unit</th><th>State</th><th>New objects</th><th>Seconds</th>'
        f'<th class="k">Partitions</th></tr></thead><tbody>{"".join(rows) or "<tr><td colspan=5>nothing ran tonight</td></tr>"}'
        "</tbody></table>"
        '<h2 style="font-size:15px;margin:18px 0 6px">Progress</h2>'
        f'<table><tbody><tr><td class="k">Units done</td><td data-field="units_done">{eta["units_done"]}'
        f' of {eta["units_total"]}</td></tr>'
        f'<tr><td class="k">Units left</td><td data-field="units_left">{eta["units_left"]}</td></tr>'
        f'<tr><td class="k">Instances left (estimated)</td><td data-field="instances_left">{eta["instances_left"]:,}</td></tr>'
        f'<tr><td class="k">Rate</td><td data-field="rate">{eta["rate_instances_s"]:g} instances/s '
        f'({"measured" if eta["rate_measured"] else "assumed: nothing measured yet"})</td></tr>'
        f'<tr><td class="k">ETA</td><td data-field="eta">{eta["hours_left"]:.1f} h = {eta["nights_left"]} night(s)'
        "</td></tr></tbody></table>"
        + (f"<p>Given up after the maximum attempts (needs a person): {e(', '.join(given_up))}</p>" if given_up else "")
        + "<p style=\"font-size:13px\">Each migrated partition's validation figures are in its manifests; the "
        "per-date compliance reports of <code>pacs_migration</code> apply unchanged.</p></body></html>"
    )
