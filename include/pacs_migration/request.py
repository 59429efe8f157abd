"""What one ``pacs_migration`` run is asked to move: a study date (the
default), or a list of studies by StudyInstanceUID or accession number (a
clinician needs a patient's priors tomorrow), optionally only some modalities."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .uids import is_valid_uid

_MODALITY = re.compile(r"^[A-Z0-9_]{1,16}$")


class RequestError(ValueError):
    """A run parameter that cannot be used; ``field`` names it (never an accession number's value)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"params.{field}: {message}")
        self.field = field


def _strings(params: Mapping[str, Any], name: str) -> tuple[str, ...]:
    value = params.get(name) or ()
    if isinstance(value, str):
        value = re.split(r"[\s,;]+", value)
    if not isinstance(value, Iterable):
        raise RequestError(name, "expected a list of strings")
    return tuple(str(v).strip() for v in value if str(v).strip())


@dataclass(frozen=True)
class RunRequest:
    study_date: dt.date | None
    study_uids: tuple[str, ...] = ()
    accession_numbers: tuple[str, ...] = ()
    modalities: tuple[str, ...] = ()  # empty: every modality

    @property
    def by_study(self) -> bool:
        return bool(self.study_uids or self.accession_numbers)

    def wants(self, modality: str) -> bool:
        return not self.modalities or modality in self.modalities

    def label(self) -> str:
        """How the report names the run (no accession number in it)."""
        if not self.by_study:
            return str(self.study_date)
        n = len(self.study_uids) + len(self.accession_numbers)
        return f"{n} requested stud{'y' if n == 1 else 'ies'}"

    @classmethod
    def from_params(cls, params: Mapping[str, Any], logical: dt.date | None) -> RunRequest:
        """From the DAG run's params; the study date defaults to the logical date."""
        uids, accessions = _strings(params, "study_uids"), _strings(params, "accession_numbers")
        for i, uid in enumerate(uids):
            if not is_valid_uid(uid):
                raise RequestError(f"study_uids[{i}]", "not a valid UID")
        for i, acc in enumerate(accessions):
            if len(acc) > 16 or "\\" in acc:
                raise RequestError(f"accession_numbers[{i}]", "not a valid AccessionNumber (SH, 16 characters)")
        modalities = tuple(m.upper() for m in _strings(params, "modalities"))
        for i, m in enumerate(modalities):
            if not _MODALITY.match(m):
                raise RequestError(f"modalities[{i}]", "not a DICOM Modality code")
        explicit = params.get("study_date")
        if explicit and (uids or accessions):
            raise RequestError("study_date", "give a study date or studies (study_uids, accession_numbers), not both")
        try:
            day = dt.date.fromisoformat(explicit) if explicit else logical
        except ValueError:
            raise RequestError("study_date", "expected YYYY-MM-DD") from None
        if day is None and not (uids or accessions):
            raise RequestError("study_date", "required for a run without a logical date")
        return cls(None if (uids or accessions) else day, uids, accessions, modalities)
