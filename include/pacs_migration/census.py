"""Census: the expected set E of one study date, by C-FIND.

Study level by StudyDate, series level per study, image level per series (the
SOP Instance UIDs are what retrieval is reconciled against). Only UIDs, dates,
modality and counts are asked for: no patient attributes enter the census.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pydicom.dataset import Dataset

from .dimse import DicomNetworkError, QueryFailed, QueryTruncated, answer_text
from .partition import Partition

# Read from every answer of the census (tens of thousands a date) as raw text.
SOP_CLASS_UID, SOP_INSTANCE_UID, SERIES_INSTANCE_UID = 0x00080016, 0x00080018, 0x0020000E

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
    # Why ``instances`` may be short of the series (the image-level answer was
    # capped, or failed): its members are then also those the series-level
    # retrieval delivers, and ``reported_instances`` says how many to expect.
    # An empty ``series_instance_uid`` with a gap is a study whose series
    # could not be listed.
    census_gap: str | None = None

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
    source: str = ""  # the archive it was taken of (config.sources; "": the first)

    def partitions(self) -> list[Partition]:
        return sorted({dataclasses.replace(s.partition, source=self.source) for s in self.series})

    def for_partition(self, partition: Partition) -> list[CensusSeries]:
        """The partition's series (a census is one source's: the source is not compared)."""
        return [s for s in self.series if s.partition.date_key == partition.date_key]

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
            elif w.series_instance_uid is None and w.study_instance_uid in studies or w.series_instance_uid in own:
                out.append(w)
        return out


# Warnings that mean E may be incomplete: the partition cannot be proven.
# (A study or series whose query failed is not among them: it is a census gap,
# unresolved in the transfer manifest unless its retrieval completes it by count.)
BLOCKING_WARNINGS = frozenset({"QUERY_TRUNCATED", "SERIES_LEVEL_TRUNCATED", "IMAGE_LEVEL_TRUNCATED", "COUNT_MISMATCH"})


def census_hash(series: list[CensusSeries]) -> str:
    """A stable hash of an expected set: what changed at the source changes it."""
    lines = sorted(
        [f"{s.study_instance_uid}|{s.series_instance_uid}|{i.sop_instance_uid}" for s in series for i in s.instances]
        + [
            f"{s.study_instance_uid}|{s.series_instance_uid}|gap:{s.census_gap}:{s.reported_instances}"
            for s in series
            if s.census_gap
        ]
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
            warnings.append(
                CensusWarning(
                    "QUERY_TRUNCATED",
                    "",
                    None,
                    f"StudyTime {time_range or 'any'} still truncated at {len(answers)} answers",
                )
            )
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


def take_census(
    find: FindFn,
    study_date: dt.date,
    find_limit: int | None = None,
    split_depth: int = 12,
    image_limit: int | None = None,
    workers: int = 1,
) -> Census:
    """C-FIND the whole expected set for ``study_date``.

    Parameters
    ----------
    find : callable
        Sends one C-FIND identifier, returns the matches (see :func:`dimse.find`).
    study_date : datetime.date
        The partition date.
    find_limit : int, optional
        The PACS's known cap on answers per study- or series-level C-FIND.
    split_depth : int
        How many times a truncated query may be bisected by StudyTime or SeriesTime.
    image_limit : int, optional
        The PACS's known cap on answers per image-level C-FIND.
    workers : int
        Studies whose series and images are asked at once (each query its own
        association): a busy day's census is bound by the PACS's answer time.
    """
    studies, warnings = find_studies(find, study_date.strftime("%Y%m%d"), find_limit, split_depth)
    return census_of_studies(find, study_date, studies, warnings, find_limit, split_depth, image_limit, workers)


@dataclass
class _Caps:
    series: int | None
    images: int | None
    split_depth: int


def census_of_studies(
    find: FindFn,
    study_date: dt.date,
    studies: dict[str, int | None],
    warnings: list[CensusWarning],
    find_limit: int | None = None,
    split_depth: int = 12,
    image_limit: int | None = None,
    workers: int = 1,
) -> Census:
    """Series and image levels of ``studies`` (UID -> reported instance count),
    reconciled against the counts; ``warnings`` so far are carried along.
    ``workers`` studies are asked at once; the outcome (series and warnings, in
    study order) does not depend on it.

    A query that fails for one study or series is confined to it: the study
    or series gets a ``census_gap`` (``CENSUS_FAILED:<level>``), the rest of
    the date is unaffected. A capped image-level answer gives the series the
    gap ``IMAGE_CAPPED``: its members are completed by the retrieval.
    """
    caps = _Caps(find_limit, image_limit, split_depth)

    def one(item: tuple[str, int | None]) -> tuple[list[CensusSeries], list[CensusWarning]]:
        found: list[CensusWarning] = []
        return _study_series(find, study_date, item[0], item[1], caps, found), found

    if workers > 1 and len(studies) > 1:
        with ThreadPoolExecutor(min(workers, len(studies)), thread_name_prefix="census") as pool:
            results = list(pool.map(one, studies.items()))
    else:
        results = [one(item) for item in studies.items()]
    series_out = [s for series, _ in results for s in series]
    return Census(study_date, tuple(series_out), tuple(warnings) + tuple(w for _, found in results for w in found))


def _study_series(
    find: FindFn,
    study_date: dt.date,
    study_uid: str,
    reported_study: int | None,
    caps: _Caps,
    warnings: list[CensusWarning],
) -> list[CensusSeries]:
    try:
        answers = _series_answers(find, study_uid, caps, warnings)
    except (QueryFailed, DicomNetworkError) as exc:
        # Its modalities are unknown: the study is placed in the date's UNKNOWN partition.
        warnings.append(CensusWarning("CENSUS_FAILED:SERIES", study_uid, None, _why(exc)))
        return [CensusSeries(study_uid, "", "UNKNOWN", study_date, reported_study, (), "CENSUS_FAILED:SERIES")]
    out = []
    for s in sorted(answers, key=lambda d: answer_text(d, SERIES_INSTANCE_UID)):
        series_uid = answer_text(s, SERIES_INSTANCE_UID)
        if not series_uid:
            warnings.append(CensusWarning("SERIES_WITHOUT_UID", study_uid, None, "series answer had no UID"))
            continue
        out.append(_series_instances(find, study_date, study_uid, series_uid, s, caps, warnings))
    found = sum(
        s.reported_instances if s.census_gap and s.reported_instances is not None else len(s.instances) for s in out
    )
    if reported_study is not None and reported_study != found:
        # Series or image level lost answers: E for this study cannot be trusted.
        warnings.append(
            CensusWarning(
                "COUNT_MISMATCH", study_uid, None, f"study reports {reported_study}, series/image levels found {found}"
            )
        )
    return out


def _why(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


def _series_query(study_uid: str, modality: str = "", time_range: str = "") -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = "SERIES"
    q.StudyInstanceUID = study_uid
    q.SeriesInstanceUID = ""
    q.Modality = modality
    q.SeriesTime = time_range
    q.NumberOfSeriesRelatedInstances = ""
    return q


def _series_answers(find: FindFn, study_uid: str, caps: _Caps, warnings: list[CensusWarning]) -> list[Dataset]:
    """Every series of a study. A capped answer is split by Modality, then
    by SeriesTime ranges (bisected); what stays capped is reported
    ``SERIES_LEVEL_TRUNCATED``."""
    found: dict[str, Dataset] = {}

    def ask(q: Dataset) -> bool:
        """Run one query, keep its answers; True when it was capped."""
        try:
            answers, capped = find(q), False
        except QueryTruncated as exc:
            answers, capped = exc.answers, True
        for a in answers:
            found.setdefault(answer_text(a, SERIES_INSTANCE_UID), a)
        return capped or (caps.series is not None and len(answers) >= caps.series)

    if ask(_series_query(study_uid)):
        for modality in _modalities(found):
            if ask(_series_query(study_uid, modality)):
                _bisect_series(ask, study_uid, modality, 0, _DAY - 1, 1, caps.split_depth, warnings)
    return list(found.values())


def _bisect_series(
    ask: Callable[[Dataset], bool],
    study_uid: str,
    modality: str,
    lo: int,
    hi: int,
    depth: int,
    max_depth: int,
    warnings: list[CensusWarning],
) -> None:
    if depth > max_depth or hi <= lo:
        warnings.append(
            CensusWarning(
                "SERIES_LEVEL_TRUNCATED",
                study_uid,
                None,
                f"{modality} series at SeriesTime {_tm(lo)}-{_tm(hi)} still capped",
            )
        )
        return
    mid = (lo + hi) // 2
    for a, b in ((lo, mid), (mid + 1, hi)):
        if ask(_series_query(study_uid, modality, f"{_tm(a)}-{_tm(b)}")):
            _bisect_series(ask, study_uid, modality, a, b, depth + 1, max_depth, warnings)


def _modalities(found: dict[str, Dataset]) -> list[str]:
    return sorted({_modality_code(a.get("Modality")) for a in found.values()})


def _series_instances(
    find: FindFn,
    study_date: dt.date,
    study_uid: str,
    series_uid: str,
    answer: Dataset,
    caps: _Caps,
    warnings: list[CensusWarning],
) -> CensusSeries:
    """The image level of one series; a cap or a failure there becomes the series' ``census_gap``."""
    qi = Dataset()
    qi.QueryRetrieveLevel = "IMAGE"
    qi.StudyInstanceUID = study_uid
    qi.SeriesInstanceUID = series_uid
    qi.SOPInstanceUID = ""
    qi.SOPClassUID = ""
    gap: str | None = None
    try:
        answers = find(qi)
        if caps.images is not None and len(answers) >= caps.images:
            gap = "IMAGE_CAPPED"
    except QueryTruncated as exc:
        answers, gap = exc.answers, "IMAGE_CAPPED"
    except (QueryFailed, DicomNetworkError) as exc:
        answers, gap = [], "CENSUS_FAILED:IMAGE"
        warnings.append(CensusWarning("CENSUS_FAILED:IMAGE", study_uid, series_uid, _why(exc)))
    seen: dict[str, ExpectedInstance] = {}
    for i in answers:
        sop = answer_text(i, SOP_INSTANCE_UID)
        if sop and sop not in seen:
            seen[sop] = ExpectedInstance(sop, answer_text(i, SOP_CLASS_UID))
    reported_raw = answer.get("NumberOfSeriesRelatedInstances")
    reported = int(reported_raw) if reported_raw not in (None, "") else None
    if gap is None and reported is not None and reported > len(seen):
        gap = "IMAGE_CAPPED"  # silently capped below the count the PACS itself reports
    if gap == "IMAGE_CAPPED" and reported is None:
        warnings.append(
            CensusWarning(
                "IMAGE_LEVEL_TRUNCATED",
                study_uid,
                series_uid,
                f"capped at {len(seen)} answers and no instance count to complete it",
            )
        )
    elif gap is None and reported is not None and reported != len(seen):
        warnings.append(
            CensusWarning(
                "COUNT_MISMATCH", study_uid, series_uid, f"series reports {reported}, image level found {len(seen)}"
            )
        )
    return CensusSeries(
        study_uid,
        series_uid,
        _modality_code(answer.get("Modality")),
        study_date,
        reported,
        tuple(sorted(seen.values(), key=lambda e: e.sop_instance_uid)),
        gap,
    )


class StudyNotFound(LookupError):
    """A requested study the source does not hold (or cannot place on a date);
    ``field`` names the request's entry (never an accession number's value)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _requested_query(keyword: str, value: str) -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = ""
    q.StudyDate = ""
    q.NumberOfStudyRelatedInstances = ""
    setattr(q, keyword, value)
    return q


def find_requested_studies(
    find: FindFn, study_uids: tuple[str, ...] = (), accession_numbers: tuple[str, ...] = (), missing_ok: bool = False
) -> dict[dt.date, dict[str, int | None]]:
    """The requested studies by StudyDate (UID -> reported instances), one
    study-level C-FIND per UID or accession number. ``missing_ok``: an entry
    this source does not hold is skipped (several source archives: another may hold it).

    Raises
    ------
    StudyNotFound
        A UID or accession number that matches no study, or a study without a
        valid StudyDate (it has no partition); names the entry, not its value.
    """
    out: dict[dt.date, dict[str, int | None]] = {}
    asks = [("StudyInstanceUID", f"study_uids[{i}]", v) for i, v in enumerate(study_uids)]
    asks += [("AccessionNumber", f"accession_numbers[{i}]", v) for i, v in enumerate(accession_numbers)]
    for keyword, field, value in asks:
        answers = [a for a in find(_requested_query(keyword, value)) if a.get("StudyInstanceUID")]
        if not answers and missing_ok:
            continue
        if not answers:
            raise StudyNotFound(field, "the source holds no study matching it")
        for a in answers:
            try:
                day = dt.datetime.strptime(str(a.get("StudyDate") or ""), "%Y%m%d").date()
            except ValueError:
                raise StudyNotFound(field, "the study has no valid StudyDate, so no partition") from None
            raw = a.get("NumberOfStudyRelatedInstances")
            out.setdefault(day, {})[str(a.StudyInstanceUID)] = int(raw) if raw not in (None, "") else None
    return dict(sorted(out.items()))


def take_study_census(
    find: FindFn,
    study_uids: tuple[str, ...] = (),
    accession_numbers: tuple[str, ...] = (),
    find_limit: int | None = None,
    split_depth: int = 12,
    image_limit: int | None = None,
    missing_ok: bool = False,
) -> list[Census]:
    """The expected set of just the requested studies: one :class:`Census`
    per StudyDate they fall on (series and image levels as for a date)."""
    by_date = find_requested_studies(find, study_uids, accession_numbers, missing_ok)
    return [
        census_of_studies(find, day, studies, [], find_limit, split_depth, image_limit)
        for day, studies in by_date.items()
    ]
