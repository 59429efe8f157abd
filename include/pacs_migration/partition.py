"""Partition keys: one study date x one modality."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

_MODALITY = re.compile(r"^[A-Z0-9_]{1,16}$")


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
    """

    study_date: dt.date
    modality: str

    def __post_init__(self) -> None:
        if not _MODALITY.match(self.modality):
            # The modality becomes part of object keys: refuse anything odd.
            raise ValueError(f"modality {self.modality!r} is not a valid DICOM CS code")

    @property
    def key(self) -> str:
        """``YYYY-MM-DD/MODALITY``."""
        return f"{self.study_date.isoformat()}/{self.modality}"

    @property
    def hive_path(self) -> str:
        """``date=YYYY-MM-DD/modality=MODALITY``, for object-store prefixes."""
        return f"date={self.study_date.isoformat()}/modality={self.modality}"

    @property
    def dicom_date(self) -> str:
        """The StudyDate as DICOM DA (``YYYYMMDD``)."""
        return self.study_date.strftime("%Y%m%d")

    @classmethod
    def parse(cls, key: str) -> Partition:
        """Parse ``YYYY-MM-DD/MODALITY``."""
        try:
            date_s, modality = key.split("/")
            return cls(dt.date.fromisoformat(date_s), modality)
        except ValueError as exc:
            raise ValueError(f"bad partition key {key!r}: expected YYYY-MM-DD/MODALITY") from exc

    def to_json(self) -> dict[str, str]:
        return {"study_date": self.study_date.isoformat(), "modality": self.modality}

    @classmethod
    def from_json(cls, value: dict[str, str]) -> Partition:
        return cls(dt.date.fromisoformat(value["study_date"]), value["modality"])
