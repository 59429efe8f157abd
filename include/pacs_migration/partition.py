"""Partition keys: one study date x one modality (x one source archive, when
several legacy archives feed one archive)."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

_MODALITY = re.compile(r"^[A-Z0-9_]{1,16}$")
_SOURCE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


@dataclass(frozen=True, order=True)
class Partition:
    """A partition of the legacy archive: every series of one modality
    in studies of one StudyDate.

    Parameters
    ----------
    study_date : datetime.date
        The studies' StudyDate.
    modality : str
        The series' Modality (a DICOM CS value, e.g. ``CT``).
    source : str
        The legacy archive's name (``config.sources``); ``""``: the first,
        unnamed source, whose keys carry no source.
    """

    study_date: dt.date
    modality: str
    source: str = ""

    def __post_init__(self) -> None:
        if not _MODALITY.match(self.modality):
            # The modality becomes part of object keys: refuse anything odd.
            raise ValueError(f"modality {self.modality!r} is not a valid DICOM CS code")
        if self.source and not _SOURCE.match(self.source):
            raise ValueError(f"source {self.source!r} is not a source name")

    @property
    def key(self) -> str:
        """``YYYY-MM-DD/MODALITY``, or ``SOURCE/YYYY-MM-DD/MODALITY``."""
        day = f"{self.study_date.isoformat()}/{self.modality}"
        return f"{self.source}/{day}" if self.source else day

    @property
    def hive_path(self) -> str:
        """``[source=NAME/]date=YYYY-MM-DD/modality=MODALITY``, for object-store prefixes."""
        day = f"date={self.study_date.isoformat()}/modality={self.modality}"
        return f"source={self.source}/{day}" if self.source else day

    @property
    def date_key(self) -> str:
        """``YYYY-MM-DD/MODALITY`` whatever the source (the archive's asset partitions, tables by date)."""
        return f"{self.study_date.isoformat()}/{self.modality}"

    @classmethod
    def from_hive(cls, path: str) -> Partition | None:
        """The partition a key's ``[source=…/]date=…/modality=…`` segments name (None: they name none)."""
        parts = dict(p.split("=", 1) for p in path.split("/") if "=" in p)
        if not {"date", "modality"} <= parts.keys():
            return None
        return cls(dt.date.fromisoformat(parts["date"]), parts["modality"], parts.get("source", ""))

    @property
    def dicom_date(self) -> str:
        """The StudyDate as DICOM DA (``YYYYMMDD``)."""
        return self.study_date.strftime("%Y%m%d")

    @classmethod
    def parse(cls, key: str) -> Partition:
        """Parse ``[SOURCE/]YYYY-MM-DD/MODALITY``."""
        try:
            *source, date_s, modality = key.split("/")
            if len(source) > 1:
                raise ValueError(key)
            return cls(dt.date.fromisoformat(date_s), modality, source[0] if source else "")
        except ValueError as exc:
            raise ValueError(f"bad partition key {key!r}: expected [SOURCE/]YYYY-MM-DD/MODALITY") from exc

    def to_json(self) -> dict[str, str]:
        out = {"study_date": self.study_date.isoformat(), "modality": self.modality}
        return {**out, "source": self.source} if self.source else out

    @classmethod
    def from_json(cls, value: dict[str, str]) -> Partition:
        return cls(dt.date.fromisoformat(value["study_date"]), value["modality"], value.get("source") or "")
