"""Census: the expected set E of one study date, by C-FIND.

Study level by StudyDate, series level per study, image level per series (the
SOP Instance UIDs are what retrieval is reconciled against). Only UIDs, dates,
modality and counts are asked for: no patient attributes enter the census.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.dataset import Dataset

from .dimse import QueryTruncated
from .partition import Partition

FindFn = Callable[[Dataset], list[Dataset]]


@dataclass(frozen=True)
class ExpectedInstance:
    sop_instance_uid: str
    sop_class_uid: str


@dataclass(frozen=True)
class CensusSeries:
    """One series as the source describes it."""

    study_instance_uid: str
    series_instance_uid: str
    modality: str
    study_date: dt.date
    reported_instances: int | None  # NumberOfSeriesRelatedInstances, if offered
    instances: tuple[ExpectedInstance, ...]

    @property
    def partition(self) -> Partition:
        return Partition(self.study_date, self.modality)


@dataclass(frozen=True)
class CensusWarning:
    """A disagreement found while taking the census (no patient data)."""

    code: str
    study_instance_uid: str
    series_instance_uid: str | None
    detail: str


@dataclass(frozen=True)
class Census:
    study_date: dt.date
    series: tuple[CensusSeries, ...]
    warnings: tuple[CensusWarning, ...]

    def partitions(self) -> list[Partition]:
        return sorted({s.partition for s in self.series})

    def for_partition(self, partition: Partition) -> list[CensusSeries]:
        return [s for s in self.series if s.partition == partition]

    def warnings_for(self, partition: Partition) -> list[CensusWarning]:
        """Warnings that bear on a partition: date-wide ones (a truncated study
        query may hide studies of any modality) and its own series'."""
        own = {s.series_instance_uid for s in self.for_partition(partition)}
        studies = {s.study_instance_uid for s in self.for_partition(partition)}
        placed = {s.study_instance_uid for s in self.series}
        out = []
        for w in self.warnings:
            if not w.study_instance_uid or w.study_instance_uid not in placed:
                out.append(w)  # date-wide, or a study whose modality is unknown: any partition
            elif w.series_instance_uid is None and w.study_instance_uid in studies:
                out.append(w)
            elif w.series_instance_uid in own:
                out.append(w)
        return out


# Warnings that mean E may be incomplete: the partition cannot be proven.
BLOCKING_WARNINGS = frozenset({"QUERY_TRUNCATED", "SERIES_LEVEL_TRUNCATED", "IMAGE_LEVEL_TRUNCATED", "COUNT_MISMATCH"})


def census_hash(series: list[CensusSeries]) -> str:
    """A stable hash of an expected set: what changed at the source changes it."""
    lines = sorted(
        f"{s.study_instance_uid}|{s.series_instance_uid}|{i.sop_instance_uid}" for s in series for i in s.instances
    )
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _modality_code(value: object) -> str:
    text = str(value or "").strip().upper()
    # The modality becomes part of partition keys and paths: anything odd is UNKNOWN.
    return text if re.fullmatch(r"[A-Z0-9_]{1,16}", text) else "UNKNOWN"


_DAY = 24 * 3600


def _tm(seconds: int) -> str:
    return f"{seconds // 3600:02d}{seconds % 3600 // 60:02d}{seconds % 60:02d}"


def _study_query(da: str, time_range: str | None, extra_keys: tuple[str, ...] = ()) -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyDate = da
    q.StudyTime = time_range or ""
    q.StudyInstanceUID = ""
    q.NumberOfStudyRelatedInstances = ""
    for keyword in extra_keys:
        setattr(q, keyword, "")
    return q


def find_study_answers(
    find: FindFn, da: str, find_limit: int | None = None, split_depth: int = 12, extra_keys: tuple[str, ...] = ()
) -> tuple[list[Dataset], list[CensusWarning]]:
    """Every study-level answer for one StudyDate, splitting truncated queries.

    An answer is truncated when the peer says so (0xFE00/0xA700, see
    :class:`dimse.QueryTruncated`) or when it holds as many matches as the
    configured or learned cap. A truncated query is split into two StudyTime
    ranges, bisected down to ``split_depth`` levels; a range still truncated at
    the bottom is reported (``QUERY_TRUNCATED``), never silently accepted.
    ``extra_keys`` are asked as return keys (the assessment's quality checks).
    """
    answers_out: dict[tuple[str, str], Dataset] = {}
    warnings: list[CensusWarning] = []
    cap = find_limit

    def keep(answers: list[Dataset]) -> None:
        # A truncated parent's answers are kept too: a study without StudyTime
        # matches no StudyTime range. Distinct PatientIDs stay distinct answers.
        for a in answers:
            answers_out.setdefault((str(a.get("StudyInstanceUID", "")), str(a.get("PatientID", ""))), a)

    def run(lo: int, hi: int, depth: int) -> None:
        nonlocal cap
        time_range = None if (lo, hi) == (0, _DAY - 1) else f"{_tm(lo)}-{_tm(hi)}"
        truncated = False
        try:
            answers = find(_study_query(da, time_range, extra_keys))
        except QueryTruncated as exc:
            answers, truncated = exc.answers, True
            if answers:
                cap = min(cap or len(answers), len(answers))  # learn the peer's cap
        if cap is not None and len(answers) >= cap:
            truncated = True
        keep(answers)
        if not truncated:
            return
        if depth >= split_depth or hi <= lo:
            warnings.append(CensusWarning("QUERY_TRUNCATED", "", None,
                                          f"StudyTime {time_range or 'any'} still truncated at {len(answers)} answers"))
            return
        mid = (lo + hi) // 2
        run(lo, mid, depth + 1)
        run(mid + 1, hi, depth + 1)

    run(0, _DAY - 1, 0)
    return list(answers_out.values()), warnings


def find_studies(
    find: FindFn, da: str, find_limit: int | None = None, split_depth: int = 12
) -> tuple[dict[str, int | None], list[CensusWarning]]:
    """Study Instance UIDs of one StudyDate, with the NumberOfStudyRelatedInstances
    the PACS reports (None if not offered); see :func:`find_study_answers`."""
    answers, warnings = find_study_answers(find, da, find_limit, split_depth)
    found: dict[str, int | None] = {}
    for a in answers:
        if a.get("StudyInstanceUID"):
            raw = a.get("NumberOfStudyRelatedInstances")
            found[str(a.StudyInstanceUID)] = int(raw) if raw not in (None, "") else None
    return dict(sorted(found.items())), warnings


def _find_all(find: FindFn, q: Dataset, level: str, study_uid: str, series_uid: str | None,
              warnings: list[CensusWarning]) -> list[Dataset]:
    """A series- or image-level C-FIND; truncation there is reported, not split."""
    try:
        return find(q)
    except QueryTruncated as exc:
        warnings.append(CensusWarning(f"{level}_LEVEL_TRUNCATED", study_uid, series_uid,
                                      f"peer stopped after {len(exc.answers)} answers"))
        return exc.answers


def take_census(find: FindFn, study_date: dt.date, find_limit: int | None = None, split_depth: int = 12) -> Census:
    """C-FIND the whole expected set for ``study_date``.

    Parameters
    ----------
    find : callable
        Sends one C-FIND identifier, returns the matches (see :func:`dimse.find`).
    study_date : datetime.date
        The partition date.
    find_limit : int, optional
        The PACS's known cap on answers per C-FIND.
    split_depth : int
        How many times a truncated study query may be bisected by StudyTime.
    """
    studies, warnings = find_studies(find, study_date.strftime("%Y%m%d"), find_limit, split_depth)
    return census_of_studies(find, study_date, studies, warnings)


def census_of_studies(find: FindFn, study_date: dt.date, studies: dict[str, int | None],
                      warnings: list[CensusWarning]) -> Census:
    """Series and image levels of ``studies`` (UID -> reported instance count),
    reconciled against the counts; ``warnings`` so far are carried along."""
    warnings = list(warnings)
    series_out: list[CensusSeries] = []
    for study_uid, reported_study in studies.items():
        first_series = len(series_out)
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = study_uid
        q.SeriesInstanceUID = ""
        q.Modality = ""
        q.NumberOfSeriesRelatedInstances = ""
        for s in sorted(_find_all(find, q, "SERIES", study_uid, None, warnings),
                        key=lambda d: str(d.get("SeriesInstanceUID", ""))):
            series_uid = str(s.get("SeriesInstanceUID") or "")
            if not series_uid:
                warnings.append(CensusWarning("SERIES_WITHOUT_UID", study_uid, None, "series answer had no UID"))
                continue
            qi = Dataset()
            qi.QueryRetrieveLevel = "IMAGE"
            qi.StudyInstanceUID = study_uid
            qi.SeriesInstanceUID = series_uid
            qi.SOPInstanceUID = ""
            qi.SOPClassUID = ""
            seen: dict[str, ExpectedInstance] = {}
            for i in _find_all(find, qi, "IMAGE", study_uid, series_uid, warnings):
                sop = str(i.get("SOPInstanceUID") or "")
                if sop and sop not in seen:
                    seen[sop] = ExpectedInstance(sop, str(i.get("SOPClassUID") or ""))
            reported_raw = s.get("NumberOfSeriesRelatedInstances")
            reported = int(reported_raw) if reported_raw not in (None, "") else None
            if reported is not None and reported != len(seen):
                warnings.append(
                    CensusWarning(
                        "COUNT_MISMATCH", study_uid, series_uid, f"series reports {reported}, image level found {len(seen)}"
                    )
                )
            series_out.append(
                CensusSeries(
                    study_instance_uid=study_uid,
                    series_instance_uid=series_uid,
                    modality=_modality_code(s.get("Modality")),
                    study_date=study_date,
                    reported_instances=reported,
                    instances=tuple(sorted(seen.values(), key=lambda e: e.sop_instance_uid)),
                )
            )
        found_in_study = sum(len(x.instances) for x in series_out[first_series:])
        if reported_study is not None and reported_study != found_in_study:
            # Series or image level lost answers: E for this study cannot be trusted.
            warnings.append(CensusWarning("COUNT_MISMATCH", study_uid, None,
                                          f"study reports {reported_study}, series/image levels found {found_in_study}"))
    return Census(study_date, tuple(series_out), tuple(warnings))
