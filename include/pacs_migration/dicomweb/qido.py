"""QIDO-RS (PS3.18 10.6) over the study index: the query parameters, the
standard's matching (PS3.4 C.2.2.2: single value, UID list, wildcard, range),
and answers as DICOM JSON (PS3.18 F.2)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from ..study_index import SERIES_KEYWORDS, STUDY_KEYWORDS
from .catalog import TABLE


class Level(str, Enum):
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


class QueryError(ValueError):
    """A query parameter the service cannot honour (400, naming the parameter)."""


# What each level returns by default (PS3.18 Table 10.6.3-3/4/5), besides includefield.
STUDY_RETURN: tuple[str, ...] = (
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "InstanceAvailability",
    "ModalitiesInStudy",
    "ReferringPhysicianName",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "StudyDescription",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
SERIES_RETURN: tuple[str, ...] = (
    "Modality",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "SeriesDate",
    "SeriesTime",
    "NumberOfSeriesRelatedInstances",
    "StudyInstanceUID",
)
INSTANCE_RETURN: tuple[str, ...] = (
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceAvailability",
    "InstanceNumber",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "StudyInstanceUID",
    "SeriesInstanceUID",
)
RETURNED = {Level.STUDY: STUDY_RETURN, Level.SERIES: SERIES_RETURN, Level.IMAGE: INSTANCE_RETURN}
# Attributes matched per level (the index's columns, and the computed ModalitiesInStudy).
MATCHABLE = {
    Level.STUDY: frozenset({*STUDY_KEYWORDS, "ModalitiesInStudy"}),
    Level.SERIES: frozenset({*STUDY_KEYWORDS, *SERIES_KEYWORDS}),
    Level.IMAGE: frozenset({*STUDY_KEYWORDS, *SERIES_KEYWORDS, "SOPInstanceUID", "SOPClassUID", "InstanceNumber"}),
}
CONTROL = frozenset({"includefield", "limit", "offset", "fuzzymatching"})
MAX_LIMIT = 10_000
INSTANCE_ORDER = '"SeriesInstanceUID", "InstanceNumber" NULLS LAST, "SOPInstanceUID"'


@dataclass(frozen=True)
class QidoQuery:
    level: Level
    matches: dict[str, str] = field(default_factory=dict)  # keyword -> value as given
    includefield: tuple[str, ...] = ()
    include_all: bool = False
    limit: int | None = None
    offset: int = 0

    @property
    def returned(self) -> tuple[str, ...]:
        extra = tuple(k for k in self.includefield if k not in RETURNED[self.level])
        return (*RETURNED[self.level], *extra, *(k for k in self.matches if k not in RETURNED[self.level]))


def _keyword(name: str) -> str:
    """A parameter's attribute keyword: given as a keyword or as a tag (``00100020``)."""
    if tag_for_keyword(name) is not None:
        return name
    try:
        kw = keyword_for_tag(int(name.replace(",", ""), 16)) if len(name.replace(",", "")) == 8 else ""
    except ValueError:
        kw = ""
    if not kw:
        raise QueryError(f"{name}: not a DICOM attribute keyword or tag")
    return kw


def parse_query(level: Level, params: Iterable[tuple[str, str]], fixed: Mapping[str, str] | None = None) -> QidoQuery:
    """The query of a request's parameters; ``fixed``: the UIDs of the path."""
    matches: dict[str, str] = dict(fixed or {})
    include: list[str] = []
    include_all, limit, offset = False, None, 0
    for name, value in params:
        if name == "includefield":
            for item in (v.strip() for v in value.split(",")):
                if item == "all":
                    include_all = True
                elif item:
                    include.append(_keyword(item))
        elif name == "limit":
            limit = _integer(name, value, 0, MAX_LIMIT)
        elif name == "offset":
            offset = _integer(name, value, 0, 10**9)
        elif name == "fuzzymatching" or name.startswith("_"):
            continue  # fuzzy matching is not offered (the answer says so by being exact); "_" : cache busters
        else:
            kw = _keyword(name)
            if kw not in MATCHABLE[level]:
                raise QueryError(f"{name}: not a matching key at the {level.value.lower()} level")
            matches[kw] = f"{matches[kw]},{value}" if kw in matches and kw.endswith("UID") else value
    return QidoQuery(level, matches, tuple(dict.fromkeys(include)), include_all, limit, offset)


def _integer(name: str, value: str, low: int, high: int) -> int:
    try:
        n = int(value)
    except ValueError:
        raise QueryError(f"{name}: {value!r} is not an integer") from None
    if not low <= n <= high:
        raise QueryError(f"{name}: must be between {low} and {high}")
    return n


def _like(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _condition(kw: str, value: str) -> tuple[str, list[Any]]:
    """SQL for one matching key (PS3.4 C.2.2.2)."""
    col = f'"{kw}"'
    vr = dictionary_VR(kw)
    if kw == "ModalitiesInStudy":
        wanted = [v for v in value.replace("\\", ",").split(",") if v]
        marks = ", ".join("?" for _ in wanted)
        return f'"StudyInstanceUID" IN (SELECT "StudyInstanceUID" FROM {TABLE} WHERE "Modality" IN ({marks}))', wanted
    if vr == "UI":
        uids = [v.strip() for v in value.replace("\\", ",").split(",") if v.strip()]
        return f"{col} IN ({', '.join('?' for _ in uids)})", uids
    if vr in ("DA", "TM", "DT") and "-" in value:
        low, _, high = (v.strip().replace(":", "") for v in value.partition("-"))
        parts, args = [], []
        if low:
            parts.append(f"{col} >= ?")
            args.append(low)
        if high:
            parts.append(f"{col} <= ?" if vr != "TM" else f"substr({col}, 1, {len(high)}) <= ?")
            args.append(high)
        return " AND ".join(parts) or "TRUE", args
    if vr in ("IS", "US", "UL", "SS", "SL"):
        try:
            return f"{col} = ?", [int(value)]
        except ValueError:
            raise QueryError(f"{kw}: {value!r} is not an integer") from None
    if "*" in value or "?" in value:
        if vr == "PN":
            return f"lower({col}) LIKE lower(?) ESCAPE '\\'", [_like(value)]
        return f"{col} LIKE ? ESCAPE '\\'", [_like(value)]
    if vr == "PN":  # person names: case-insensitive, as most archives match them
        return f"lower({col}) = lower(?)", [value]
    return f"{col} = ?", [value]


def where(query: QidoQuery) -> tuple[str, list[Any]]:
    clauses, args = [], []
    for kw, value in query.matches.items():
        if value in ("", "*"):
            continue  # universal matching
        sql, a = _condition(kw, value)
        clauses.append(sql)
        args.extend(a)
    return (" AND ".join(clauses) or "TRUE"), args


_STUDY_SELECT = ", ".join(
    [
        *(f'any_value("{k}") AS "{k}"' for k in STUDY_KEYWORDS if k != "StudyInstanceUID"),
        '"StudyInstanceUID"',
        'count(DISTINCT "SeriesInstanceUID") AS "NumberOfStudyRelatedSeries"',
        'count(*) AS "NumberOfStudyRelatedInstances"',
        'string_agg(DISTINCT "Modality", \'\\\' ORDER BY "Modality") AS "ModalitiesInStudy"',
    ]
)
_SERIES_SELECT = ", ".join(
    [
        *(f'any_value("{k}") AS "{k}"' for k in (*STUDY_KEYWORDS, *SERIES_KEYWORDS) if k != "SeriesInstanceUID"),
        '"SeriesInstanceUID"',
        'count(*) AS "NumberOfSeriesRelatedInstances"',
    ]
)


def sql(query: QidoQuery) -> tuple[str, list[Any]]:
    """The whole answer's SQL (no limit: the caller merges legacy answers first)."""
    cond, args = where(query)
    if query.level is Level.STUDY:
        return (
            f'SELECT {_STUDY_SELECT} FROM {TABLE} WHERE {cond} GROUP BY "StudyInstanceUID" '
            'ORDER BY "StudyDate" DESC NULLS LAST, "StudyTime" DESC NULLS LAST, "StudyInstanceUID"',
            args,
        )
    if query.level is Level.SERIES:
        return (
            f'SELECT {_SERIES_SELECT} FROM {TABLE} WHERE {cond} GROUP BY "SeriesInstanceUID" '
            'ORDER BY "SeriesNumber" NULLS LAST, "SeriesInstanceUID"',
            args,
        )
    return (
        f"SELECT * FROM {TABLE} WHERE {cond} ORDER BY {INSTANCE_ORDER}",
        args,
    )


def element(keyword: str, value: Any) -> dict[str, Any]:
    """One attribute in DICOM JSON (PS3.18 F.2.2)."""
    vr = dictionary_VR(keyword)
    out: dict[str, Any] = {"vr": vr}
    if value is None or value == "":
        return out
    if vr == "PN":
        out["Value"] = [{"Alphabetic": v} for v in str(value).split("\\")]
    elif vr in ("IS", "US", "UL", "SS", "SL"):
        out["Value"] = [int(value)]
    elif vr in ("DS", "FL", "FD"):
        out["Value"] = [float(value)]
    else:
        out["Value"] = str(value).split("\\") if vr in ("CS", "UI", "AE") else [str(value)]
    return out


def to_json(row: Mapping[str, Any], keywords: Iterable[str]) -> dict[str, Any]:
    """A result row as a DICOM JSON object, keyed by tag (sorted, as the standard shows them)."""
    out = {}
    for kw in keywords:
        tag = tag_for_keyword(kw)
        if tag is not None and kw in row:
            out[f"{tag:08X}"] = element(kw, row[kw])
    return dict(sorted(out.items()))
