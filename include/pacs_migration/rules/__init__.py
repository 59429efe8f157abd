"""Normalization rules as data: YAML rule sets with an id and a version.

A rule set holds site rules (set, prefix, suffix, regex replace, delete,
reject an attribute; each limited by conditions), a PatientID crosswalk, and
the policies for private tags, retired SOP classes, dates and times, over-long
values and character sets. :func:`load_ruleset` validates the file and fails
fast naming the rule and the field; :func:`apply_ruleset` changes a pydicom
dataset in place and returns every change with its old value, so normalize can
record it in the Original Attributes Sequence (PS3.3 C.12.1.1.9).
"""

from .apply import apply_ruleset, first_invalid_value, is_conformant, repair_character_set, undeclared_non_ascii
from .model import (
    ASSUMABLE_CHARSETS,
    MAX_LENGTH,
    PROTECTED,
    RETIRED_SOP_CLASSES,
    STRUCTURAL,
    Action,
    Change,
    Condition,
    Crosswalk,
    InvalidValuePolicy,
    OverLongPolicy,
    PatientPolicy,
    PrivatePolicy,
    Reason,
    Rule,
    RuleOutcome,
    RuleSet,
    RuleSetError,
)
from .parse import load_ruleset, parse_ruleset

__all__ = [
    "ASSUMABLE_CHARSETS",
    "MAX_LENGTH",
    "PROTECTED",
    "RETIRED_SOP_CLASSES",
    "STRUCTURAL",
    "Action",
    "Change",
    "Condition",
    "Crosswalk",
    "InvalidValuePolicy",
    "OverLongPolicy",
    "PatientPolicy",
    "PrivatePolicy",
    "Reason",
    "Rule",
    "RuleOutcome",
    "RuleSet",
    "RuleSetError",
    "apply_ruleset",
    "first_invalid_value",
    "is_conformant",
    "load_ruleset",
    "parse_ruleset",
    "repair_character_set",
    "undeclared_non_ascii",
]
