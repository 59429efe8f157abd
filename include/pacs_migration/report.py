"""The validation report e-mailed to compliance: per-partition figures, the
validation verdict and failed expectations. Built from manifests only, so it
holds no patient names, IDs, birth dates or accession numbers."""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import html
import io
import zipfile
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .counts import COUNT_FIELDS, PartitionCounts, counts_from_frame
from .manifest import PartitionManifests, source_label
from .partition import Partition
from .plan import UnitResult, UnitState
from .reasons import ReasonCode
from .store import ObjectStore
from .templates import render, svg

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


def _source_of(key: str) -> str:
    try:
        return Partition.parse(key).source
    except ValueError:  # not a partition key (a label of a figure made by hand)
        return ""


@dataclass(frozen=True)
class PartitionFigures:
    """One partition's line of the report: its counts (``expected``,
    ``migrated``... read through), this run's verdict and what to name."""

    partition: str
    counts: PartitionCounts
    validation_passed: bool | None
    failed_expectations: tuple[str, ...] = ()
    census_gaps: tuple[str, ...] = ()  # studies or series the census could not list, by UID
    inconsistent_patients: tuple[str, ...] = ()  # "<study UID> quarantined|flagged": more than one patient
    findings: dict[str, int] = field(default_factory=dict)  # e.g. charset:undeclared-non-ascii -> instances
    # "<referencing SOP UID> -> <referenced SOP UID> (state or reason)": references that do not
    # resolve (they fail the partition), and those to quarantined instances (listed together)
    dangling_references: tuple[str, ...] = ()
    quarantined_references: tuple[str, ...] = ()
    # "<SOP UID>: <this source>'s copy differs from <other source>'s (live)": UID_CONFLICT across archives
    source_conflicts: tuple[str, ...] = ()

    @property
    def source(self) -> str:
        """The legacy archive, as reports name it."""
        return source_label(_source_of(self.partition))

    @classmethod
    def of(
        cls,
        partition: str,
        c: PartitionCounts,
        passed: bool | None,
        failed: tuple[str, ...] = (),
        gaps: tuple[str, ...] = (),
        inconsistent: tuple[str, ...] = (),
        findings: dict[str, int] | None = None,
    ) -> PartitionFigures:
        return cls(partition, c, passed, failed, gaps, inconsistent, dict(findings or {}))

    def __getattr__(self, name: str) -> int:
        if name in COUNT_FIELDS:
            return int(getattr(self.counts, name))
        raise AttributeError(name)

    @property
    def reasons(self) -> dict[str, int]:
        return self.counts.reasons

    @property
    def conserved(self) -> bool:
        return self.counts.conserved


def _gaps(manifests: PartitionManifests) -> tuple[str, ...]:
    try:
        series = manifests.census()
    except Exception:  # no census manifest: nothing to name
        return ()
    return tuple(
        f"{s.census_gap} study {s.study_instance_uid}"
        + (f" series {s.series_instance_uid}" if s.series_instance_uid else "")
        + (f" ({s.reported_instances} instances reported)" if s.reported_instances is not None else "")
        for s in series
        if s.census_gap
    )


def _inconsistent(df: Any) -> tuple[str, ...]:
    """Studies naming more than one patient, by UID, with what became of them."""
    code = ReasonCode.INCONSISTENT_PATIENT.value
    quarantined = set(df.loc[df["reason"] == code, "study_instance_uid"].dropna())
    flagged = set(df.loc[df["findings"].fillna("").str.contains(code, regex=False), "study_instance_uid"].dropna())
    return tuple(
        [f"{uid} quarantined" for uid in sorted(quarantined)]
        + [f"{uid} flagged (migrated)" for uid in sorted(flagged - quarantined)]
    )


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
    refs = (verdict or {}).get("references") or {}
    figures = PartitionFigures.of(
        partition.key,
        counts_from_frame(df),
        bool(verdict and verdict.get("success")),
        failed,
        _gaps(manifests),
        _inconsistent(df),
        _findings(df),
    )
    return dataclasses.replace(
        figures,
        dangling_references=tuple(refs.get("dangling", ())),
        quarantined_references=tuple(refs.get("to_quarantined", ())),
        source_conflicts=_source_conflicts(df, partition),
    )


def _source_conflicts(df: Any, partition: Partition) -> tuple[str, ...]:
    if "other_source" not in df:
        return ()
    hit = df[(df["reason"] == ReasonCode.UID_CONFLICT.value) & df["other_source"].notna()]
    mine = source_label(partition.source)
    return tuple(
        f"{uid}: the copy from {mine} differs from the copy from {other} (live)"
        for uid, other in sorted(zip(hit["sop_instance_uid"], hit["other_source"], strict=True))
    )


SOURCE_FIELDS = ("partitions", "expected", "migrated", "shared", "quarantined", "unresolved", "written", "conflicts")


def source_figures(figures: list[PartitionFigures]) -> list[dict[str, Any]]:
    """The run per legacy archive: its partitions' figures summed; ``shared``:
    migrated instances whose live copy came from another archive (counted once
    in the archive, once per source here); ``conflicts``: its copies that differ
    from another archive's. Empty when only the first, unnamed source took part."""
    if not any(_source_of(f.partition) for f in figures):
        return []
    out: dict[str, dict[str, Any]] = {}
    for f in figures:
        row = out.setdefault(f.source, {"source": f.source, **dict.fromkeys(SOURCE_FIELDS, 0)})
        row["partitions"] += 1
        for n in ("expected", "migrated", "quarantined", "unresolved", "written"):
            row[n] += getattr(f, n)
        row["shared"] += f.counts.shared
        row["conflicts"] += len(f.source_conflicts)
    return [out[k] for k in sorted(out)]


@dataclass(frozen=True)
class SharedStudy:
    """A study more than one legacy archive holds: the same series in each
    (``shared``), or some series in one and some in another (``split``)."""

    study_instance_uid: str
    kind: str  # "shared" | "split"
    sources: tuple[str, ...]
    instances: int  # distinct SOP instances over the sources
    migrated: int  # of them, live in the archive

    @property
    def complete(self) -> bool:
        return self.migrated == self.instances


def shared_studies(store: ObjectStore, partitions: list[Partition]) -> list[SharedStudy]:
    """Studies of these partitions that more than one source holds, and whether each ended complete."""
    rows: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))  # study -> source -> series
    sops: dict[str, dict[str, bool]] = defaultdict(dict)  # study -> SOP UID -> migrated (by any source)
    for p in partitions:
        df = PartitionManifests(store, p).transfer_or_none()
        if df is None:
            continue
        for study, series, sop, state in zip(
            df["study_instance_uid"], df["series_instance_uid"], df["sop_instance_uid"], df["state"], strict=True
        ):
            if isinstance(study, str) and isinstance(sop, str):
                rows[study][source_label(p.source)].add(str(series))
                sops[study][sop] = sops[study].get(sop, False) or state == "migrated"
    out = []
    for study, by_source in sorted(rows.items()):
        if len(by_source) < 2:
            continue
        kind = "shared" if len({frozenset(v) for v in by_source.values()}) == 1 else "split"
        out.append(SharedStudy(study, kind, tuple(sorted(by_source)), len(sops[study]), sum(sops[study].values())))
    return out


@dataclass(frozen=True)
class ReportsFigures:
    """One study date's line of reports from the RIS: the messages of the date
    (what the RIS export and the listener hold for it), what became of them,
    and this run's validation of them (None: no message for the date)."""

    study_date: str
    expected: int
    migrated: int
    amended: int
    no_matching_study: int
    ambiguous: int
    rejected: int
    validation_passed: bool | None
    failed_expectations: tuple[str, ...] = ()
    reasons: dict[str, int] = field(default_factory=dict)


def reports_figures(store: ObjectStore, study_date: dt.date, run_id: str) -> ReportsFigures:
    from .reports.ledger import ReportLedger
    from .reports.place import ReportCounts, ReportReason

    ledger = ReportLedger(store, study_date)
    c = ReportCounts.of(ledger.read())
    verdict = ledger.verdict(run_id)
    passed = None if c.expected == 0 else bool(verdict and verdict.get("success"))
    failed = (
        tuple(verdict.get("failed_expectations", [])) if verdict else (() if passed is None else ("reports:not_run",))
    )
    ambiguous = c.reasons.get(ReportReason.AMBIGUOUS_MATCH.value, 0)
    return ReportsFigures(
        study_date.isoformat(),
        c.expected,
        c.migrated,
        c.amended,
        c.unmatched - ambiguous,
        ambiguous,
        c.rejected,
        passed,
        failed,
        c.reasons,
    )


def run_verdict(
    figures: list[PartitionFigures],
    failures: tuple[TaskFailure, ...] = (),
    census_completed: bool = True,
    reports: list[ReportsFigures] | None = None,
) -> RunVerdict:
    """PASSED only when the census completed, no task failed and every
    partition (and every date's reports) validated in this run; FAILED when a
    proof was reached and failed; INCOMPLETE when something could not be checked."""
    if any(r.validation_passed is False and "reports:not_run" not in r.failed_expectations for r in reports or []):
        return RunVerdict.FAILED
    if any(r.validation_passed is False for r in reports or []):
        return RunVerdict.INCOMPLETE
    if any(
        f.validation_passed is False
        and "validation:not_run" not in f.failed_expectations
        and "transfer:not_completed" not in f.failed_expectations
        for f in figures
    ):
        return RunVerdict.FAILED
    if not census_completed or failures or not all(f.validation_passed and f.conserved for f in figures):
        return RunVerdict.INCOMPLETE
    return RunVerdict.PASSED


def data_docs_zip(store: ObjectStore, partitions: list[Partition]) -> bytes:
    """The partitions' GX Data Docs (HTML and styles), one folder each."""
    files = []
    for p in partitions:
        base = PartitionManifests(store, p).gx_prefix + "data_docs/"
        files += [(f"{p.hive_path}/{key[len(base) :]}", key) for key in store.list_keys(base)]
    buf = io.BytesIO()
    # ~40 small files a partition: fetched 8 at a time (the report is the run's last step but one)
    with (
        ThreadPoolExecutor(8, thread_name_prefix="data-docs") as pool,
        zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf,
    ):
        for (name, _key), body in zip(files, pool.map(lambda f: store.get(f[1]), files), strict=True):
            zf.writestr(name, body)
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
    for i, (label, color) in enumerate(zip(labels, colors, strict=True)):
        parts.append(
            f'<rect x="{left + i * 120}" y="4" width="12" height="12" fill="{color}"/>'
            f'<text x="{left + i * 120 + 16}" y="14">{label}</text>'
        )
    y = 30
    for modality in sorted(per):
        x: float = left
        parts.append(f'<text x="{left - 8}" y="{y + 17}" text-anchor="end">{html.escape(modality)}</text>')
        for value, color in zip(per[modality], colors, strict=True):
            w: float = bar_w * value / top
            if w > 0:
                parts.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row_h}" fill="{color}"/>')
            x += w
        total = sum(per[modality])
        parts.append(f'<text x="{x + 6:.1f}" y="{y + 17}">{per[modality][0]} / {total}</text>')
        y += row_h + gap
    parts.append("</svg>")
    return "".join(parts)


def subject(
    prefix: str,
    study_date: str,
    figures: list[PartitionFigures],
    failures: tuple[TaskFailure, ...] = (),
    census_completed: bool = True,
    reports: list[ReportsFigures] | None = None,
) -> str:
    verdict = run_verdict(figures, failures, census_completed, reports)
    text = f"{prefix} StudyDate {study_date}: {len(figures)} partition(s), validation {verdict.value}"
    if failures:
        first = failures[0]
        more = f" (+{len(failures) - 1} more)" if len(failures) > 1 else ""
        text += f": {first.task} failed ({first.error}){more}"
    return text


def figures_csv(figures: list[PartitionFigures]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        [
            "partition",
            *FIELDS,
            "validation_passed",
            "reasons",
            "failed_expectations",
            "census_gaps",
            "inconsistent_patients",
            "source",
            "shared",
            "source_conflicts",
        ]
    )
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
                f.source,
                f.counts.shared,
                ";".join(f.source_conflicts),
            ]
        )
    return buf.getvalue()


REPORTS_FIELDS = ("expected", "migrated", "amended", "no_matching_study", "ambiguous", "rejected")


def reports_csv(reports: list[ReportsFigures]) -> str:
    """The reports table as CSV: one line per study date with reports."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["study_date", *REPORTS_FIELDS, "validation_passed", "reasons", "failed_expectations"])
    for r in reports:
        if r.expected:
            w.writerow(
                [
                    r.study_date,
                    *(getattr(r, n) for n in REPORTS_FIELDS),
                    r.validation_passed,
                    ";".join(f"{k}={v}" for k, v in r.reasons.items()),
                    ";".join(r.failed_expectations),
                ]
            )
    return buf.getvalue()


def _validation_label(f: PartitionFigures) -> str:
    if f.validation_passed:
        return "PASSED"
    return (
        "NOT VALIDATED" if {"validation:not_run", "transfer:not_completed"} & set(f.failed_expectations) else "FAILED"
    )


def render_html(
    run_id: str,
    study_date: str,
    figures: list[PartitionFigures],
    bucket_uri: str,
    failures: tuple[TaskFailure, ...] = (),
    census_completed: bool = True,
    ruleset: str | None = None,
    generated_at: dt.datetime | None = None,
    reports: list[ReportsFigures] | None = None,
    shared: list[SharedStudy] | None = None,
) -> str:
    """Self-contained HTML (inline CSS, no external assets): when it was
    generated, the rule set that ran, what each column means, and each reason
    code in plain language."""
    from .digest import COLUMNS
    from .reasons import describe

    return render(
        "report.html.j2",
        generated_at=(generated_at or dt.datetime.now(dt.UTC)).isoformat(timespec="seconds"),
        ruleset=ruleset,
        meanings={**COLUMNS, "written": "objects this run created (0 on a re-run: nothing is written twice)"},
        describe=describe,
        run_id=run_id,
        study_date=study_date,
        figures=figures,
        bucket_uri=bucket_uri,
        failures=failures,
        census_completed=census_completed,
        verdict=run_verdict(figures, failures, census_completed, reports).value,
        reports=[r for r in reports or [] if r.expected],
        fields=FIELDS,
        totals={n: sum(getattr(f, n) for f in figures) for n in FIELDS},
        label=_validation_label,
        chart=svg(chart_svg(figures)),
        sources=source_figures(figures),
        source_fields=SOURCE_FIELDS,
        shared=shared or [],
    )


def render_progress_html(night: dict, results: list[UnitResult], progress: dict, run_id: str, bucket_uri: str) -> str:
    """The nightly progress e-mail: what tonight did, per unit and partition,
    what is left and when it should be done (self-contained HTML)."""
    units = []
    for res in results:
        unit = res.unit
        delta = ", delta check" if unit.kind == "delta" else ""
        modalities = ",".join(unit.modalities or []) or "all modalities"
        units.append(
            {
                "study_date": unit.study_date.isoformat(),
                "label": f"{unit.study_date.isoformat()} {modalities} ({unit.phase}{delta})",
                "state": res.state.value,
                "css": {UnitState.DONE: "pass", UnitState.FAILED: "fail"}.get(res.state, ""),
                "migrated": res.migrated,
                "seconds": res.seconds,
                "partitions": [
                    p.to_json()
                    | {
                        "counted": p.counts is not None,
                        "stopped": bool(p.counts and p.counts.reasons.get("WINDOW_CLOSED")),
                    }
                    for p in res.partitions
                ],
                "empty": "not started: the window had closed"
                if res.state is UnitState.DEFERRED
                else (res.error or "no partitions"),
            }
        )
    return render(
        "progress.html.j2",
        night=night,
        units=units,
        eta=progress,
        run_id=run_id,
        bucket_uri=bucket_uri,
        given_up=night.get("given_up") or [],
    )


ROLLBACK_FIELDS = ("instances", "migrated", "quarantined", "unresolved", "studies", "objects", "bytes")


def render_rollback_html(record: dict[str, Any], bucket_uri: str, retention_days: int) -> str:
    """The rollback report compliance receives, from the rollback's journal
    (figures only: counts, partitions, the digest; no UIDs, no patient data)."""
    plan = record["plan"]
    return render(
        "rollback.html.j2",
        rollback_id=record["rollback_id"],
        state=record["state"],
        requested_by=plan["requested_by"],
        reason=plan["reason"],
        selection=plan["selection"],
        started_at=record.get("started_at"),
        finished_at=record.get("finished_at"),
        bucket_uri=bucket_uri,
        copies=f"{bucket_uri}rolled-back/{record['rollback_id']}/",
        retention_days=retention_days,
        partitions=plan["partitions"],
        totals=plan["totals"],
        fields=ROLLBACK_FIELDS,
    )


def rollback_subject(prefix: str, record: dict[str, Any]) -> str:
    t = record["plan"]["totals"]
    if record["state"] == "in_progress":
        return (
            f"{prefix} Rollback {record['rollback_id']} INCOMPLETE: {t['partitions']} partition(s), "
            f"{t['objects']} object(s) planned; clear its roll_back task to finish it"
        )
    return (
        f"{prefix} Rollback {record['rollback_id']} {record['state']}: {t['partitions']} partition(s), "
        f"{t['objects']} object(s) moved to rolled-back/; re-run to migrate them again"
    )
