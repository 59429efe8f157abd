"""Archive assessment: measure the legacy archive before moving it.

Census only (C-FIND, no retrieval) over a range of study dates: studies,
series, instances and estimated bytes by year x modality (and by date, which
the nightly planner uses), transfer syntaxes seen in a sample, metadata
quality findings, and the projected duration at a configured throughput.

Patient identifiers are asked for only to detect a study filed under several
patients, and (with a patient key, several source archives) to count the
patient IDs two archives share: kept only keyed (``study_keys.parquet``: study
UID -> keyed PatientID), never in the clear.
"""

from __future__ import annotations

import csv
import datetime as dt
import html
import io
import math
import re
import sqlite3
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from pydicom.charset import python_encoding
from pydicom.dataset import Dataset
from pydicom.uid import UID

from .census import CensusSeries, CensusWarning, FindFn, census_of_studies, find_study_answers
from .config import AssessmentConfig
from .dimse import QueryTruncated
from .plan import ASSESSED
from .templates import render, svg

# PatientID -> its keyed digest (privacy.PatientKeyer.key_of), for the overlap of source archives.
PatientKey = Callable[[str], str | None]

# The RIS's messages of a date (reports.intake.DateReports): how many, the accession
# numbers they name, and how many migration runs placed or could not match so far.
ReportsOf = Callable[[dt.date], Any]

# Typical stored size of one instance, by modality, when the PACS answers no
# size keys (Rows, Columns, BitsAllocated, NumberOfFrames) for the sample.
DEFAULT_BYTES_PER_INSTANCE: dict[str, int] = {
    "CT": 525_000,
    "MR": 140_000,
    "CR": 10_500_000,
    "DX": 10_500_000,
    "MG": 27_000_000,
    "US": 650_000,
    "NM": 260_000,
    "PT": 70_000,
    "XA": 9_000_000,
    "RF": 4_000_000,
    "OT": 1_000_000,
    "SC": 1_000_000,
    "SR": 20_000,
    "KO": 5_000,
    "PR": 10_000,
}
FALLBACK_BYTES_PER_INSTANCE = 1_000_000
_HEADER_BYTES = 2_000  # a typical data set without pixel data

_DA = re.compile(r"^\d{8}$")
_TM = re.compile(r"^([01]\d|2[0-3])([0-5]\d([0-5]\d(\.\d{1,6})?)?)?$")


class FindingCode(str, Enum):
    """Metadata quality findings (no patient data in any detail)."""

    UNDATED_STUDY = "UNDATED_STUDY"  # no StudyDate: no date partition will ever reach it
    CONFLICTING_PATIENT_ID = "CONFLICTING_PATIENT_ID"  # one StudyInstanceUID under several patient IDs
    DUPLICATE_SOP_INSTANCE_UID = "DUPLICATE_SOP_INSTANCE_UID"  # one SOP Instance UID in several series
    NONCONFORMANT_DATE = "NONCONFORMANT_DATE"  # StudyDate in an answer is not a valid DA of the queried day
    NONCONFORMANT_TIME = "NONCONFORMANT_TIME"  # StudyTime is not a valid TM
    NONCONFORMANT_CHARSET = "NONCONFORMANT_CHARSET"  # SpecificCharacterSet holds an undefined term
    CENSUS_WARNING = "CENSUS_WARNING"  # truncation or count disagreement the census could not resolve
    STUDY_WITHOUT_REPORT = "STUDY_WITHOUT_REPORT"  # no RIS report of the date names its accession number


@dataclass(frozen=True)
class Finding:
    code: FindingCode
    study_date: str  # YYYY-MM-DD, or "" for undated
    study_instance_uid: str
    detail: str


@dataclass
class _Cell:
    studies: set[str] = field(default_factory=set)
    series: int = 0
    instances: int = 0


@dataclass
class _Sample:
    series: int = 0
    instances: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class Assessment:
    date_from: dt.date
    date_to: dt.date
    by_date: list[dict[str, Any]]  # study_date, modality, studies, series, instances, est_bytes
    by_year: list[dict[str, Any]]  # year, modality, studies, series, instances, est_bytes, bytes_basis
    syntaxes: dict[str, int]  # transfer syntax UID -> sampled instances (empty: the PACS did not say)
    findings: list[Finding]
    projection: dict[str, float]
    # study_date, reports (RIS messages of the date), studies, studies_without_report; empty: not assessed
    reports_by_date: list[dict[str, Any]] = field(default_factory=list)
    # (StudyInstanceUID, keyed PatientID or None): what the overlap of source archives compares
    study_keys: list[tuple[str, str | None]] = field(default_factory=list, repr=False)

    def totals(self) -> dict[str, int]:
        return {k: sum(int(r[k]) for r in self.by_year) for k in ("studies", "series", "instances", "est_bytes")}

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = defaultdict(int)
        for f in self.findings:
            counts[f.code.value] += 1
        out = {
            "date_from": self.date_from.isoformat(),
            "date_to": self.date_to.isoformat(),
            **self.totals(),
            "syntaxes": self.syntaxes,
            "findings": dict(sorted(counts.items())),
            "projection": self.projection,
        }
        if self.reports_by_date:
            out["reports"] = {
                k: sum(int(r[k]) for r in self.reports_by_date)
                for k in ("reports", "migrated", "unmatched", "studies", "studies_without_report")
            }
        return out


def _values(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in ([value] if isinstance(value, str) else list(value))]


def _check_answers(answers: list[Dataset], da: str, day: str) -> list[Finding]:
    """Conformance of the study-level answers of one day, and one study under several patients."""
    out: list[Finding] = []
    patients: dict[str, set[str]] = defaultdict(set)
    for a in answers:
        uid = str(a.get("StudyInstanceUID", "") or "")
        date = str(a.get("StudyDate", "") or "")
        if date != da or not _valid_da(date):
            out.append(
                Finding(
                    FindingCode.NONCONFORMANT_DATE,
                    day,
                    uid,
                    f"StudyDate of {len(date)} characters, {'valid' if _valid_da(date) else 'not a valid DA'}",
                )
            )
        time = str(a.get("StudyTime", "") or "").strip()
        if time and not _TM.match(time):
            out.append(Finding(FindingCode.NONCONFORMANT_TIME, day, uid, "StudyTime is not a valid TM"))
        charsets = [c.strip() for c in _values(a.get("SpecificCharacterSet")) if c.strip()]
        bad = [c for c in charsets if c not in python_encoding]
        if bad:
            out.append(
                Finding(
                    FindingCode.NONCONFORMANT_CHARSET,
                    day,
                    uid,
                    "undefined term(s): " + ", ".join(sorted(set(bad)))[:120],
                )
            )
        if "PatientID" in a:
            patients[uid].add(str(a.PatientID or ""))  # compared here, dropped at return
    for uid, ids in patients.items():
        if len(ids) > 1:
            out.append(Finding(FindingCode.CONFLICTING_PATIENT_ID, day, uid, f"{len(ids)} distinct patient IDs"))
    return out


def _valid_da(value: str) -> bool:
    if not _DA.match(value):
        return False
    try:
        dt.datetime.strptime(value, "%Y%m%d")
        return True
    except ValueError:
        return False


def _sample_series(find: FindFn, study_uid: str, series_uid: str) -> tuple[int, int, dict[str, int]]:
    """(instances answered with sizes, their estimated bytes, syntaxes seen) of one series."""
    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE"
    q.StudyInstanceUID = study_uid
    q.SeriesInstanceUID = series_uid
    q.SOPInstanceUID = ""
    for keyword in (
        "Rows",
        "Columns",
        "BitsAllocated",
        "SamplesPerPixel",
        "NumberOfFrames",
        "AvailableTransferSyntaxUID",
    ):
        setattr(q, keyword, None)
    try:
        answers = find(q)
    except QueryTruncated as exc:
        answers = exc.answers
    sized, total = 0, 0
    syntaxes: dict[str, int] = defaultdict(int)
    for a in answers:
        try:
            rows, cols, bits = int(a.get("Rows") or 0), int(a.get("Columns") or 0), int(a.get("BitsAllocated") or 0)
            spp, frames = int(a.get("SamplesPerPixel") or 1), int(a.get("NumberOfFrames") or 1)
        except (TypeError, ValueError):
            rows = 0
        if rows and cols and bits:
            sized += 1
            total += rows * cols * spp * frames * bits // 8 + _HEADER_BYTES
        for ts in _values(a.get("AvailableTransferSyntaxUID")):
            if ts:
                syntaxes[ts] += 1
    return sized, total, dict(syntaxes)


def _undated(find: FindFn) -> tuple[list[Finding], bool]:
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyDate = ""
    q.StudyInstanceUID = ""
    truncated = False
    try:
        answers = find(q)
    except QueryTruncated as exc:
        answers, truncated = exc.answers, True
    out = [
        Finding(FindingCode.UNDATED_STUDY, "", str(a.get("StudyInstanceUID", "")), "no StudyDate")
        for a in answers
        if not str(a.get("StudyDate", "") or "").strip()
    ]
    return out, truncated


class _Tally:
    """What the assessment accumulates day by day. SOP Instance UIDs go to an
    on-disk SQLite index (duplicates across the range), so memory does not
    grow with the archive."""

    def __init__(
        self,
        find: FindFn,
        config: AssessmentConfig,
        folder: Path,
        reports: ReportsOf | None = None,
        patient_key: PatientKey | None = None,
        workers: int = 1,
    ) -> None:
        self.find, self.config, self.reports, self.patient_key = find, config, reports, patient_key
        self.workers = workers  # studies asked at once (census_associations)
        self.reports_by_date: list[dict[str, Any]] = []
        self.by_date: dict[tuple[str, str], _Cell] = defaultdict(_Cell)
        self.by_year: dict[tuple[int, str], _Cell] = defaultdict(_Cell)
        self.samples: dict[tuple[int, str], _Sample] = defaultdict(_Sample)
        self.syntaxes: dict[str, int] = defaultdict(int)
        self.findings: list[Finding] = []
        self.db = sqlite3.connect(folder / "sop.sqlite")
        self.db.execute("CREATE TABLE sop (uid TEXT, series TEXT, study TEXT, day TEXT)")
        self.db.execute("CREATE TABLE study (uid TEXT PRIMARY KEY, patient TEXT)")

    def day(self, day: dt.date, find_limit: int | None, split_depth: int) -> None:
        da, iso = day.strftime("%Y%m%d"), day.isoformat()
        answers, warnings = find_study_answers(
            self.find, da, find_limit, split_depth, extra_keys=("PatientID", "SpecificCharacterSet", "AccessionNumber")
        )
        self.findings.extend(_check_answers(answers, da, iso))
        if self.reports is not None:
            self._reports(day, answers)
        studies: dict[str, int | None] = {}
        for a in answers:
            if a.get("StudyInstanceUID"):
                raw = a.get("NumberOfStudyRelatedInstances")
                studies[str(a.StudyInstanceUID)] = int(raw) if raw not in (None, "") else None
        if self.patient_key is not None:  # keyed at once: the clear PatientID goes no further
            key = self.patient_key
            self.db.executemany(
                "INSERT OR IGNORE INTO study VALUES (?, ?)",
                [
                    (str(a.StudyInstanceUID), key(str(a.get("PatientID") or "")))
                    for a in answers
                    if a.get("StudyInstanceUID")
                ],
            )
        census = census_of_studies(self.find, day, dict(sorted(studies.items())), warnings, workers=self.workers)
        self.findings.extend(_census_finding(iso, w) for w in census.warnings)
        for s in census.series:
            self._series(day, s)

    def _reports(self, day: dt.date, answers: list[Dataset]) -> None:
        """The date's studies whose accession number no RIS message of the date names
        (accession numbers compared, then dropped)."""
        assert self.reports is not None
        got = self.reports(day)
        messages, accessions = got.messages, got.accessions
        studies = {
            str(a.StudyInstanceUID): str(a.get("AccessionNumber") or "") for a in answers if a.get("StudyInstanceUID")
        }
        missing = sorted(uid for uid, acc in studies.items() if not acc or acc not in accessions)
        for uid in missing:
            why = "no accession number" if not studies[uid] else "no RIS report of the date names its accession number"
            self.findings.append(Finding(FindingCode.STUDY_WITHOUT_REPORT, day.isoformat(), uid, why))
        if studies or messages:
            row = {"study_date": day.isoformat(), "reports": messages, "studies": len(studies)}
            row |= {"studies_without_report": len(missing), "migrated": got.migrated, "unmatched": got.unmatched}
            self.reports_by_date.append(row)

    def _series(self, day: dt.date, s: CensusSeries) -> None:
        iso = day.isoformat()
        for cell in (self.by_date[(iso, s.modality)], self.by_year[(day.year, s.modality)]):
            cell.studies.add(s.study_instance_uid)
            cell.series += 1
            cell.instances += len(s.instances)
        self.db.executemany(
            "INSERT INTO sop VALUES (?, ?, ?, ?)",
            [(i.sop_instance_uid, s.series_instance_uid, s.study_instance_uid, iso) for i in s.instances],
        )
        sample = self.samples[(day.year, s.modality)]
        if sample.series < self.config.sample_series and s.instances:
            n, size, seen = _sample_series(self.find, s.study_instance_uid, s.series_instance_uid)
            sample.series, sample.instances, sample.bytes = sample.series + 1, sample.instances + n, sample.bytes + size
            for ts, count in seen.items():
                self.syntaxes[ts] += count

    def study_keys(self) -> list[tuple[str, str | None]]:
        return [(str(u), p) for u, p in self.db.execute("SELECT uid, patient FROM study ORDER BY uid")]

    def duplicates(self) -> None:
        self.db.execute("CREATE INDEX sop_uid ON sop (uid)")
        for uid, n_series, study, iso in self.db.execute(
            "SELECT uid, COUNT(DISTINCT series), MIN(study), MIN(day) FROM sop GROUP BY uid "
            "HAVING COUNT(DISTINCT series) > 1 ORDER BY uid"
        ):
            detail = f"SOP Instance UID {uid} in {n_series} series"
            self.findings.append(Finding(FindingCode.DUPLICATE_SOP_INSTANCE_UID, iso, study, detail))
        self.db.close()

    def bytes_per_instance(self, year: int, modality: str) -> tuple[int, str]:
        sample = self.samples.get((year, modality))
        if sample and sample.instances:
            return sample.bytes // sample.instances, "sampled"
        return DEFAULT_BYTES_PER_INSTANCE.get(modality, FALLBACK_BYTES_PER_INSTANCE), "modality default"

    def _row(self, cell: _Cell, per: int) -> dict[str, Any]:
        return {
            "studies": len(cell.studies),
            "series": cell.series,
            "instances": cell.instances,
            "est_bytes": per * cell.instances,
        }

    def date_rows(self) -> list[dict[str, Any]]:
        return [
            {"study_date": iso, "modality": m, **self._row(cell, self.bytes_per_instance(int(iso[:4]), m)[0])}
            for (iso, m), cell in sorted(self.by_date.items())
        ]

    def year_rows(self) -> list[dict[str, Any]]:
        rows = []
        for (year, modality), cell in sorted(self.by_year.items()):
            per, basis = self.bytes_per_instance(year, modality)
            rows.append(
                {
                    "year": year,
                    "modality": modality,
                    **self._row(cell, per),
                    "bytes_per_instance": per,
                    "bytes_basis": basis,
                }
            )
        return rows


def _projection(config: AssessmentConfig, year_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How long the migration should take at the configured rates (the slower counts)."""
    instances = sum(r["instances"] for r in year_rows)
    est_bytes = sum(r["est_bytes"] for r in year_rows)
    hours = max(est_bytes / (config.throughput_mb_s * 1e6), instances / config.throughput_instances_s) / 3600
    return {
        "throughput_mb_s": config.throughput_mb_s,
        "throughput_instances_s": config.throughput_instances_s,
        "hours": math.ceil(hours * 60) / 60,  # rounded up to the minute: a projection never reads as zero
        "window_hours": config.window_hours,
        "nights": math.ceil(hours / config.window_hours) if hours else 0,
    }


def assess(
    find: FindFn,
    date_from: dt.date,
    date_to: dt.date,
    config: AssessmentConfig | None = None,
    find_limit: int | None = None,
    split_depth: int = 12,
    on_day: Callable[[dt.date], None] | None = None,
    reports: ReportsOf | None = None,
    patient_key: PatientKey | None = None,
    workers: int = 1,
) -> Assessment:
    """Take the census of every day in ``[date_from, date_to]`` and measure it.
    ``reports``: the RIS's messages of a date (count, accession numbers they
    name); each study none names is a ``STUDY_WITHOUT_REPORT`` finding.
    ``patient_key``: keep each study's keyed PatientID (for :func:`overlap`).
    ``workers``: studies asked at once (the source's census_associations)."""
    if date_to < date_from:
        raise ValueError("date_to is before date_from")
    config = config or AssessmentConfig()
    with tempfile.TemporaryDirectory(prefix="assessment-") as tmp:
        tally = _Tally(find, config, Path(tmp), reports, patient_key, workers)
        day = date_from
        while day <= date_to:
            if on_day:
                on_day(day)
            tally.day(day, find_limit, split_depth)
            day += dt.timedelta(days=1)
        keys = tally.study_keys() if patient_key is not None else []
        tally.duplicates()
    if config.undated_sweep:
        undated, truncated = _undated(find)
        tally.findings.extend(undated)
        if truncated:
            tally.findings.append(Finding(FindingCode.CENSUS_WARNING, "", "", "undated sweep truncated by the PACS"))
    year_rows = tally.year_rows()
    return Assessment(
        date_from,
        date_to,
        tally.date_rows(),
        year_rows,
        dict(sorted(tally.syntaxes.items())),
        tally.findings,
        _projection(config, year_rows),
        tally.reports_by_date,
        keys,
    )


def _census_finding(iso: str, w: CensusWarning) -> Finding:
    return Finding(FindingCode.CENSUS_WARNING, iso, w.study_instance_uid, f"{w.code}: {w.detail}")


def rows_csv(rows: Iterable[dict[str, Any]]) -> str:
    rows = list(rows)
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def findings_rows(assessment: Assessment) -> list[dict[str, str]]:
    return [
        {
            "code": f.code.value,
            "study_date": f.study_date,
            "study_instance_uid": f.study_instance_uid,
            "detail": f.detail,
        }
        for f in assessment.findings
    ]


def _gb(n: float) -> str:
    if n >= 1e8:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB"


def _duration(hours: float) -> str:
    return f"{hours:.1f} h" if hours >= 1 else f"{hours * 60:.0f} min"


def heatmap_svg(assessment: Assessment) -> str:
    """Inline SVG: instances per year (rows) x modality (columns), shaded on a
    log scale, each cell labelled with instances and estimated size."""
    cells = {(r["year"], r["modality"]): r for r in assessment.by_year}
    if not cells:
        return ""
    years = sorted({y for y, _ in cells}, reverse=True)
    modalities = sorted({m for _, m in cells})
    top = max(math.log10(1 + r["instances"]) for r in cells.values()) or 1
    cw, ch, left, head = 96, 34, 56, 26
    width, height = left + cw * len(modalities) + 10, head + ch * len(years) + 28
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        'aria-label="instances by year and modality" style="font-family:Arial,Helvetica,sans-serif;font-size:11px">'
    ]
    for j, m in enumerate(modalities):
        out.append(
            f'<text x="{left + j * cw + cw / 2}" y="{head - 8}" text-anchor="middle" '
            f'font-weight="bold">{html.escape(m)}</text>'
        )
    for i, y in enumerate(years):
        top_y = head + i * ch
        out.append(f'<text x="{left - 8}" y="{top_y + ch / 2 + 4}" text-anchor="end" font-weight="bold">{y}</text>')
        for j, m in enumerate(modalities):
            r = cells.get((y, m))
            x = left + j * cw
            if r is None:
                out.append(f'<rect x="{x}" y="{top_y}" width="{cw - 2}" height="{ch - 2}" fill="#f3f5f7"/>')
                continue
            t = math.log10(1 + r["instances"]) / top
            # light to dark blue
            red, green, blue = (int(235 - t * (235 - 21)), int(242 - t * (242 - 67)), int(250 - t * (250 - 128)))
            ink = "#ffffff" if t > 0.55 else "#1d2733"
            out.append(
                f'<rect x="{x}" y="{top_y}" width="{cw - 2}" height="{ch - 2}" '
                f'fill="rgb({red},{green},{blue})" data-cell="{y}/{html.escape(m)}"/>'
                f'<text x="{x + cw / 2 - 1}" y="{top_y + 14}" text-anchor="middle" fill="{ink}">'
                f"{r['instances']:,} inst.</text>"
                f'<text x="{x + cw / 2 - 1}" y="{top_y + 27}" text-anchor="middle" fill="{ink}">'
                f"{_gb(r['est_bytes'])}</text>"
            )
    out.append(
        f'<text x="{left}" y="{height - 8}" fill="#5b6673">shade: instances, log scale; size: estimated</text></svg>'
    )
    return "".join(out)


def render_assessment_html(assessment: Assessment, source_label: str, bucket_uri: str) -> str:
    """Self-contained HTML e-mail (inline CSS and SVG, no external assets)."""
    return render(
        "assessment.html.j2",
        a=assessment,
        source_label=source_label,
        bucket_uri=bucket_uri,
        t=assessment.totals(),
        p=assessment.projection,
        findings=assessment.summary()["findings"],
        reports=assessment.summary().get("reports"),
        report_dates=sorted(assessment.reports_by_date, key=lambda r: -int(r["studies_without_report"]))[:10],
        rows=sorted(assessment.by_year, key=lambda r: (-r["year"], r["modality"])),
        syntaxes=[(ts, UID(ts).name, n) for ts, n in assessment.syntaxes.items()],
        heatmap=svg(heatmap_svg(assessment)),
        gb=_gb,
        duration=_duration,
    )


ASSESSMENT_PREFIX = "_assessment/"


def render_consolidation_html(
    summaries: list[dict[str, Any]], overlap_rows: list[dict[str, Any]], bucket_uri: str
) -> str:
    """Several source archives' assessments side by side, and their overlap (figures only)."""
    return render(
        "consolidation.html.j2",
        date_from=summaries[0]["date_from"],
        date_to=summaries[0]["date_to"],
        sources=summaries,
        overlap=overlap_rows,
        bucket_uri=bucket_uri,
        gb=_gb,
    )


def assessment_prefix(store: Any, date_from: dt.date, date_to: dt.date, source: str = "") -> str:
    """``_assessment/[source=<name>/]<from>_<to>/``: one folder per source archive and range."""
    where = f"source={source}/" if source else ""
    return f"{store.target.prefix}{ASSESSMENT_PREFIX}{where}{date_from.isoformat()}_{date_to.isoformat()}/"


def write_assessment(store: Any, assessment: Assessment, html_report: str | None = None, source: str = "") -> list[str]:
    """Store the assessment dataset (Parquet and CSV) under
    ``_assessment/[source=<name>/]<from>_<to>/``; returns the keys written."""
    import json

    import pandas as pd

    base = assessment_prefix(store, assessment.date_from, assessment.date_to, source)
    keys = []
    tables = {
        "by_year_modality": assessment.by_year,
        "by_date_modality": assessment.by_date,
        "findings": findings_rows(assessment),
        **({"reports_by_date": assessment.reports_by_date} if assessment.reports_by_date else {}),
    }
    for name, rows in tables.items():
        frame = pd.DataFrame(rows)
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        store.put(base + f"{name}.parquet", buf.getvalue(), "application/vnd.apache.parquet")
        store.put(base + f"{name}.csv", rows_csv(rows).encode(), "text/csv")
        keys += [base + f"{name}.parquet", base + f"{name}.csv"]
    if assessment.study_keys:  # keyed patient IDs only: no CSV, not in the e-mail
        frame = pd.DataFrame(assessment.study_keys, columns=["study_instance_uid", "patient_key"])
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        store.put(base + STUDY_KEYS, buf.getvalue(), "application/vnd.apache.parquet")
        keys.append(base + STUDY_KEYS)
    store.put(base + "summary.json", json.dumps(assessment.summary(), indent=2).encode(), "application/json")
    keys.append(base + "summary.json")
    if html_report is not None:
        store.put(base + "report.html", html_report.encode(), "text/html")
        keys.append(base + "report.html")
    return keys


def read_by_date(store: Any, source: str = "") -> dict[tuple[str, str], tuple[int, int]]:
    """(study date, modality) -> (instances, estimated bytes) from every stored
    assessment of one source archive; a later range's figures win where ranges overlap."""
    import pandas as pd

    out: dict[tuple[str, str], tuple[int, int]] = {}
    base = f"{store.target.prefix}{ASSESSMENT_PREFIX}"
    keys = sorted(
        k
        for k in store.list_keys(base + (f"source={source}/" if source else ""))
        if k.endswith("/by_date_modality.parquet") and (source or not k[len(base) :].startswith("source="))
    )
    for key in keys:
        first, last = key.rsplit("/", 2)[-2].split("_")
        day = dt.date.fromisoformat(first)
        while day <= dt.date.fromisoformat(last):  # assessed: a date without rows holds no studies
            out[(day.isoformat(), ASSESSED)] = (0, 0)
            day += dt.timedelta(days=1)
        frame = pd.read_parquet(io.BytesIO(store.get(key)))
        for row in frame.itertuples(index=False):
            out[(str(row.study_date), str(row.modality))] = (int(row.instances), int(row.est_bytes))
    return out


STUDY_KEYS = "study_keys.parquet"
OVERLAP_FIELDS = (
    "source_a",
    "source_b",
    "studies_a",
    "studies_b",
    "studies_in_both",
    "patient_ids_a",
    "patient_ids_b",
    "patient_ids_in_both",
    "same_patient_by_shared_study",
    "colliding_patient_ids",
)


def overlap(keys: dict[str, Any]) -> list[dict[str, Any]]:
    """Per pair of source archives (``keys``: name -> their ``study_keys`` frame):
    studies both hold, and patient IDs both use. A patient ID both use is the
    same person when a study both hold names it on each side; else it is a
    collision: the same local ID for (probably) different people, which the
    sources' issuers keep apart. Figures only: nothing here names a study or patient."""
    names, out = sorted(keys), []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            fa, fb = keys[a], keys[b]
            ka = dict(zip(fa["study_instance_uid"], fa["patient_key"], strict=True))
            kb = dict(zip(fb["study_instance_uid"], fb["patient_key"], strict=True))
            both = ka.keys() & kb.keys()
            pa, pb = {p for p in ka.values() if isinstance(p, str)}, {p for p in kb.values() if isinstance(p, str)}
            shared_ids = pa & pb
            same = {ka[uid] for uid in both if isinstance(ka[uid], str) and ka[uid] == kb[uid]}
            figures = (a, b, len(ka), len(kb), len(both), len(pa), len(pb), len(shared_ids), len(same))
            out.append(
                {**dict(zip(OVERLAP_FIELDS, figures, strict=False)), "colliding_patient_ids": len(shared_ids - same)}
            )
    return out


def read_study_keys(store: Any, date_from: dt.date, date_to: dt.date, source: str = "") -> Any:
    """One source's ``study_keys`` of a range (None: not written, e.g. no patient key configured)."""
    import pandas as pd

    data = store.get_or_none(assessment_prefix(store, date_from, date_to, source) + STUDY_KEYS)
    return None if data is None else pd.read_parquet(io.BytesIO(data))
