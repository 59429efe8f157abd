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


def take_census(find: FindFn, study_date: dt.date) -> Census:
    """C-FIND the whole expected set for ``study_date``.

    Parameters
    ----------
    find : callable
        Sends one C-FIND identifier, returns the matches (see :func:`dimse.find`).
    study_date : datetime.date
        The partition date.
    """
    da = study_date.strftime("%Y%m%d")
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyDate = da
    q.StudyInstanceUID = ""
    q.NumberOfStudyRelatedInstances = ""
    study_uids = sorted({str(a.StudyInstanceUID) for a in find(q) if a.get("StudyInstanceUID")})

    series_out: list[CensusSeries] = []
    warnings: list[CensusWarning] = []
    for study_uid in study_uids:
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = study_uid
        q.SeriesInstanceUID = ""
        q.Modality = ""
        q.NumberOfSeriesRelatedInstances = ""
        for s in sorted(find(q), key=lambda d: str(d.get("SeriesInstanceUID", ""))):
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
            for i in find(qi):
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
    return Census(study_date, tuple(series_out), tuple(warnings))
