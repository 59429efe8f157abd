"""What a rule set is: its rules, policies and the changes it makes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

# Attributes that key the object in the bucket or tie it to the census: no rule
# may touch them (a changed UID would orphan the instance from its manifests).
PROTECTED = frozenset({"SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SpecificCharacterSet"})

# PS3.5 Table 6.2-1: maximum length of one value, in characters.
MAX_LENGTH: dict[str, int] = {
    "AE": 16,
    "AS": 4,
    "CS": 16,
    "DA": 8,
    "DS": 16,
    "DT": 26,
    "IS": 12,
    "LO": 64,
    "LT": 10240,
    "SH": 16,
    "ST": 1024,
    "TM": 14,
    "UI": 64,
    "PN": 64,
}
TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "PN", "UC"})
# Values no rule reads: numbers and bytes are conformant by VR and charset-free.
# Decoding them (about half of a typical header) only costs time.
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "US", "SS", "UL", "SL", "FL", "FD", "SV", "UV", "AT"})

# Retired SOP classes whose IOD lives on under a current class (PS3.4 / PS3.6).
RETIRED_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.6": "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image Storage (Retired)
    "1.2.840.10008.5.1.4.1.1.3": "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame (Retired)
    "1.2.840.10008.5.1.4.1.1.5": "1.2.840.10008.5.1.4.1.1.20",  # Nuclear Medicine Image Storage (Retired)
}


class RuleSetError(ValueError):
    """A rule-set file does not validate; the message names the rule and field."""


class Action(str, Enum):
    SET = "set"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    REGEX = "regex"
    DELETE = "delete"
    REJECT = "reject"  # quarantine the instance RULE_REJECTED:<rule id>


class PrivatePolicy(str, Enum):
    KEEP = "keep"
    REMOVE = "remove"
    KEEP_LISTED = "keep_listed"


class OverLongPolicy(str, Enum):
    TRUNCATE = "truncate"
    QUARANTINE = "quarantine"
    KEEP = "keep"  # leave as received (the structural rules alone)


class PatientPolicy(str, Enum):
    """What happens to a study whose instances name more than one patient."""

    QUARANTINE = "quarantine"  # INCONSISTENT_PATIENT: nothing of the study goes live
    FLAG = "flag"  # migrate as received, name the study in the report


# Declarations ``character_set.assume`` may name for undeclared non-ASCII bytes
# (single-byte sets: every byte decodes, so nothing is lost).
ASSUMABLE_CHARSETS = (
    "ISO_IR 100",
    "ISO_IR 101",
    "ISO_IR 109",
    "ISO_IR 110",
    "ISO_IR 126",
    "ISO_IR 127",
    "ISO_IR 138",
    "ISO_IR 144",
    "ISO_IR 148",
    "ISO_IR 166",
    "ISO_IR 203",
)


class InvalidValuePolicy(str, Enum):
    QUARANTINE = "quarantine"  # RULE_REJECTED:invalid-values; write a rule to repair, then re-run
    KEEP = "keep"  # migrate as received (not strictly conformant)


class Reason(str, Enum):
    """ReasonForTheAttributeModification (0400,0565), PS3.3 C.12.1.1.9."""

    CORRECT = "CORRECT"  # a value made conformant
    COERCE = "COERCE"  # a value replaced by site policy (crosswalk, site rules)


@dataclass(frozen=True)
class Condition:
    attribute: str  # a DICOM keyword, or "source_ae"
    equals: str | None = None
    pattern: Any = None  # a compiled RE2 pattern

    def matches(self, ds: Dataset, source_ae: str | None) -> bool:
        if self.attribute == "source_ae":
            value = source_ae or ""
        else:
            raw = ds.get(self.attribute)
            value = "" if raw is None else str(raw)
        if self.pattern is not None:
            return self.pattern.fullmatch(value) is not None
        return value == self.equals


@dataclass(frozen=True)
class Rule:
    id: str
    action: Action
    tag: BaseTag | None
    value: str | None = None
    pattern: Any = None  # a compiled RE2 pattern (regex action)
    replacement: str | None = None
    when: tuple[Condition, ...] = ()

    def applies(self, ds: Dataset, source_ae: str | None) -> bool:
        return all(c.matches(ds, source_ae) for c in self.when)


@dataclass(frozen=True)
class Crosswalk:
    """Old PatientID [+ Issuer] -> new PatientID + Issuer."""

    table: Mapping[tuple[str, str], tuple[str, str]]
    on_missing: str = "keep"  # keep | quarantine

    def lookup(self, patient_id: str, issuer: str) -> tuple[str, str] | None:
        return self.table.get((patient_id, issuer)) or self.table.get((patient_id, ""))


@dataclass(frozen=True)
class RuleSet:
    id: str
    version: str
    rules: tuple[Rule, ...] = ()
    private_policy: PrivatePolicy = PrivatePolicy.KEEP
    keep_creators: frozenset[str] = frozenset()
    over_long: OverLongPolicy = OverLongPolicy.TRUNCATE
    invalid_values: InvalidValuePolicy = InvalidValuePolicy.QUARANTINE
    map_retired_sop_classes: bool = True
    normalize_dates: bool = True
    repair_character_set: bool = True
    reencode_utf8: bool = False
    assume_character_set: str | None = None  # for undeclared non-ASCII bytes that are not UTF-8
    crosswalk: Crosswalk | None = None
    # The source archive's Issuer of Patient ID, given to instances without one
    # (config ``issuer_of_patient_id``, per source; not part of the rule set's label).
    default_issuer: str | None = None
    inconsistent_patient: PatientPolicy = PatientPolicy.QUARANTINE

    @property
    def label(self) -> str:
        return f"{self.id}@{self.version}"


@dataclass(frozen=True)
class Change:
    """One attribute a rule changed. ``old``/``new`` are raw values, kept only
    inside the DICOM object (they may be patient data)."""

    tag: BaseTag
    keyword: str
    rule_id: str
    reason: Reason
    old: Any
    new: Any
    deleted: bool = False


@dataclass
class RuleOutcome:
    changes: list[Change] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # non-attribute changes, e.g. private:removed:12
    findings: list[str] = field(default_factory=list)  # reported, nothing changed (e.g. charset:undeclared)
    rejected_by: str | None = None  # rule id when the instance must be quarantined


STRUCTURAL = RuleSet(
    id="structural",
    version="1",
    over_long=OverLongPolicy.KEEP,
    invalid_values=InvalidValuePolicy.KEEP,
    map_retired_sop_classes=False,
    normalize_dates=False,
    repair_character_set=False,
)
