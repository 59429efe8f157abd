"""Normalization rules as data: YAML rule sets with an id and a version.

A rule set holds site rules (set, prefix, suffix, regex replace, delete,
reject an attribute; each limited by conditions), a PatientID crosswalk, and
the policies for private tags, retired SOP classes, dates and times, over-long
values and character sets. :func:`load_ruleset` validates the file and fails
fast naming the rule and the field; :func:`apply_ruleset` changes a pydicom
dataset in place and returns every change with its old value, so normalize can
record it in the Original Attributes Sequence (PS3.3 C.12.1.1.9).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import yaml
from pydicom.charset import convert_encodings
from pydicom.config import RAISE
from pydicom.datadict import DicomDictionary, dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import validate_value

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
    pattern: re.Pattern[str] | None = None

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
    pattern: re.Pattern[str] | None = None
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


# ---------------------------------------------------------------- loading


def _tag(value: Any, where: str) -> BaseTag:
    if isinstance(value, str) and re.fullmatch(r"\(?[0-9A-Fa-f]{4},\s*[0-9A-Fa-f]{4}\)?", value.strip()):
        g, e = re.findall(r"[0-9A-Fa-f]{4}", value)
        return Tag(int(g, 16), int(e, 16))
    if isinstance(value, str) and (known := tag_for_keyword(value)) is not None:
        return Tag(known)
    raise RuleSetError(f"{where}.tag: {value!r} is neither a DICOM keyword nor (gggg,eeee)")


def _regex(value: Any, where: str) -> re.Pattern[str]:
    if not isinstance(value, str):
        raise RuleSetError(f"{where}: a regular expression (string) is required")
    try:
        return re.compile(value)
    except re.error as exc:
        raise RuleSetError(f"{where}: invalid regular expression: {exc}") from None


def _conditions(raw: Any, where: str) -> tuple[Condition, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise RuleSetError(f"{where}.when: must be a mapping of attribute -> value or 're:<regex>'")
    out = []
    for attribute, expected in raw.items():
        if attribute != "source_ae" and tag_for_keyword(str(attribute)) is None:
            raise RuleSetError(f"{where}.when.{attribute}: not a DICOM keyword (or source_ae)")
        text = str(expected)
        if text.startswith("re:"):
            out.append(Condition(str(attribute), pattern=_regex(text[3:], f"{where}.when.{attribute}")))
        else:
            out.append(Condition(str(attribute), equals=text))
    return tuple(out)


def _rule(raw: Any, index: int) -> Rule:
    if not isinstance(raw, Mapping):
        raise RuleSetError(f"rules[{index}]: must be a mapping")
    rid = raw.get("id")
    if not isinstance(rid, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", rid):
        raise RuleSetError(f"rules[{index}].id: a short identifier [A-Za-z0-9_.-] is required, got {rid!r}")
    where = f"rule {rid!r}"
    try:
        action = Action(str(raw.get("action")))
    except ValueError:
        raise RuleSetError(
            f"{where}.action: must be one of {[a.value for a in Action]}, got {raw.get('action')!r}"
        ) from None
    tag = None if action is Action.REJECT and "tag" not in raw else _tag(raw.get("tag"), where)
    if tag is not None and keyword_for_tag(tag) in PROTECTED:
        raise RuleSetError(f"{where}.tag: {keyword_for_tag(tag)} may not be changed by a rule")
    value = raw.get("value")
    if action in (Action.SET, Action.PREFIX, Action.SUFFIX) and not isinstance(value, str | int | float):
        raise RuleSetError(f"{where}.value: required for action {action.value}")
    pattern = replacement = None
    if action is Action.REGEX:
        pattern = _regex(raw.get("pattern"), f"{where}.pattern")
        replacement = raw.get("replacement")
        if not isinstance(replacement, str):
            raise RuleSetError(f"{where}.replacement: required (a string) for action regex")
    unknown = set(raw) - {"id", "action", "tag", "value", "pattern", "replacement", "when", "description"}
    if unknown:
        raise RuleSetError(f"{where}: unknown field(s) {sorted(unknown)}")
    return Rule(
        rid,
        action,
        tag,
        None if value is None else str(value),
        pattern,
        replacement,
        _conditions(raw.get("when"), where),
    )


def _crosswalk(raw: Any, base: Path) -> Crosswalk | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or not isinstance(raw.get("file"), str):
        raise RuleSetError("crosswalk.file: path of a CSV file is required")
    on_missing = str(raw.get("on_missing", "keep"))
    if on_missing not in ("keep", "quarantine"):
        raise RuleSetError(f"crosswalk.on_missing: must be keep or quarantine, got {on_missing!r}")
    path = (base / raw["file"]).resolve()
    encoding = str(raw.get("encoding", "utf-8"))
    try:
        text = path.read_bytes().decode(
            "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
        )
    except FileNotFoundError:
        raise RuleSetError(f"crosswalk.file: {path} not found") from None
    except LookupError:
        raise RuleSetError(f"crosswalk.encoding: unknown encoding {encoding!r}") from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise RuleSetError(
            f"crosswalk.file: {path.name} line {line}: not valid {encoding} "
            "(declare the file's encoding, e.g. crosswalk.encoding: latin-1)"
        ) from None
    return Crosswalk(_crosswalk_table(text, path.name), on_missing)


def _crosswalk_table(text: str, name: str) -> dict[tuple[str, str], tuple[str, str]]:
    """Rows of the crosswalk CSV; errors name the file, line and column."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [h.strip() for h in next(reader, [])]
    need = ("old_patient_id", "new_patient_id")
    missing = [c for c in need if c not in header]
    if missing:
        raise RuleSetError(
            f"crosswalk.file: {name} line 1: missing column(s) {missing} in header {header} "
            "(columns: old_patient_id, old_issuer, new_patient_id, new_issuer)"
        )
    col = {h: n for n, h in enumerate(header)}
    table: dict[tuple[str, str], tuple[str, str]] = {}
    for row in reader:
        n = reader.line_num
        if not any(c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise RuleSetError(f"crosswalk.file: {name} line {n}: {len(row)} columns, the header has {len(header)}")

        def cell(column: str, row: list[str] = row) -> str:
            return row[col[column]].strip() if column in col else ""

        old, new = (cell("old_patient_id"), cell("old_issuer")), (cell("new_patient_id"), cell("new_issuer"))
        for column, value in (("old_patient_id", old[0]), ("new_patient_id", new[0])):
            if not value:
                raise RuleSetError(f"crosswalk.file: {name} line {n} column {col[column] + 1} ({column}): empty")
        if old in table and table[old] != new:
            raise RuleSetError(
                f"crosswalk.file: {name} line {n}: conflicting mapping for an old_patient_id "
                "mapped differently on an earlier line"
            )
        table[old] = new
    return table


def parse_ruleset(data: Any, base: Path = Path(".")) -> RuleSet:
    """Validate a rule-set mapping (as read from YAML)."""
    if not isinstance(data, Mapping):
        raise RuleSetError("<root>: a rule set is a mapping")
    rid = data.get("id")
    if not isinstance(rid, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", rid):
        raise RuleSetError(f"id: a short identifier is required, got {rid!r}")
    version = data.get("version")
    if version is None or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,32}", str(version)):
        raise RuleSetError("version: is required (e.g. 1 or 2024.1)")
    raw_rules = data.get("rules") or []
    if not isinstance(raw_rules, list):
        raise RuleSetError("rules: must be a list")
    rules = tuple(_rule(r, i) for i, r in enumerate(raw_rules))
    ids = [r.id for r in rules]
    if len(ids) != len(set(ids)):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise RuleSetError(f"rules: duplicate rule id(s) {dup}")
    private = data.get("private_tags") or {}
    try:
        policy = PrivatePolicy(str(private.get("policy", "keep")))
    except ValueError:
        raise RuleSetError(f"private_tags.policy: must be one of {[p.value for p in PrivatePolicy]}") from None
    creators = private.get("keep_creators") or []
    if not isinstance(creators, list) or not all(isinstance(c, str) for c in creators):
        raise RuleSetError("private_tags.keep_creators: must be a list of private creator strings")
    if policy is PrivatePolicy.KEEP_LISTED and not creators:
        raise RuleSetError("private_tags.keep_creators: required when policy is keep_listed")
    try:
        over_long = OverLongPolicy(str(data.get("over_long_values", "truncate")))
    except ValueError:
        raise RuleSetError("over_long_values: must be truncate, quarantine or keep") from None
    try:
        invalid = InvalidValuePolicy(str(data.get("invalid_values", "quarantine")))
    except ValueError:
        raise RuleSetError("invalid_values: must be quarantine or keep") from None
    charset = data.get("character_set") or {}
    if not isinstance(charset, dict):
        raise RuleSetError("character_set: must be a mapping (repair, reencode_utf8, assume)")
    if unknown_charset := set(charset) - {"repair", "reencode_utf8", "assume"}:
        raise RuleSetError(f"character_set: unknown field(s) {sorted(unknown_charset)}")
    assume = charset.get("assume")
    if assume is not None and assume not in ASSUMABLE_CHARSETS:
        raise RuleSetError(f"character_set.assume: must be one of {list(ASSUMABLE_CHARSETS)}, not {assume!r}")
    try:
        patients = PatientPolicy(str(data.get("inconsistent_patient", "quarantine")))
    except ValueError:
        raise RuleSetError("inconsistent_patient: must be quarantine or flag") from None
    flags = {}
    for name, key, default in (
        ("map_retired_sop_classes", "retired_sop_classes", True),
        ("normalize_dates", "normalize_dates", True),
    ):
        value = data.get(key, default)
        if not isinstance(value, bool):
            raise RuleSetError(f"{key}: must be true or false")
        flags[name] = value
    for name, key, default in (("repair_character_set", "repair", True), ("reencode_utf8", "reencode_utf8", False)):
        value = charset.get(key, default)
        if not isinstance(value, bool):
            raise RuleSetError(f"character_set.{key}: must be true or false")
        flags[name] = value
    unknown = set(data) - {
        "id",
        "version",
        "description",
        "rules",
        "private_tags",
        "over_long_values",
        "character_set",
        "retired_sop_classes",
        "normalize_dates",
        "crosswalk",
        "invalid_values",
        "inconsistent_patient",
    }
    if unknown:
        raise RuleSetError(f"<root>: unknown field(s) {sorted(unknown)}")
    return RuleSet(
        id=rid,
        version=str(version),
        rules=rules,
        private_policy=policy,
        keep_creators=frozenset(c.strip() for c in creators),
        over_long=over_long,
        invalid_values=invalid,
        crosswalk=_crosswalk(data.get("crosswalk"), base),
        assume_character_set=assume,
        inconsistent_patient=patients,
        **flags,
    )


def load_ruleset(path: Path) -> RuleSet:
    """Read and validate a YAML rule-set file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RuleSetError(f"{path}: rule-set file not found") from None
    except yaml.YAMLError as exc:
        raise RuleSetError(f"{path}: not valid YAML: {exc}") from None
    return parse_ruleset(data, path.parent)


# ---------------------------------------------------------------- applying

_DATE_FORMATS = (r"(\d{4})[/.\-](\d{2})[/.\-](\d{2})",)
_TIME_FORMAT = r"(\d{2}):(\d{2})(?::(\d{2})(\.\d{1,6})?)?"


def _normal_date(value: str) -> str | None:
    v = value.strip()
    if re.fullmatch(r"\d{8}", v):
        return None
    for fmt in _DATE_FORMATS:
        m = re.fullmatch(fmt, v)
        if m:
            try:
                dt.date(int(m[1]), int(m[2]), int(m[3]))
            except ValueError:
                return None
            return f"{m[1]}{m[2]}{m[3]}"
    return None


def _normal_time(value: str) -> str | None:
    m = re.fullmatch(_TIME_FORMAT, value.strip())
    if not m or int(m[1]) > 23 or int(m[2]) > 59 or (m[3] and int(m[3]) > 60):
        return None
    return f"{m[1]}{m[2]}{m[3] or ''}{m[4] or ''}"


def _record(
    out: RuleOutcome, ds: Dataset, tag: BaseTag, rule_id: str, reason: Reason, new: Any, delete: bool = False
) -> None:
    elem = ds[tag]
    old = elem.value
    out.changes.append(
        Change(tag, keyword_for_tag(tag) or str(tag), rule_id, reason, old, None if delete else new, delete)
    )
    if delete:
        del ds[tag]
    else:
        elem.value = new


def _values(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [str(v) for v in value]
    return [str(value)]


def _site_rule(rule: Rule, ds: Dataset, out: RuleOutcome) -> None:
    if rule.action is Action.REJECT:
        if rule.tag is None or rule.tag in ds:
            out.rejected_by = rule.id
        return
    assert rule.tag is not None
    present = rule.tag in ds
    if rule.action is Action.DELETE:
        if present:
            _record(out, ds, rule.tag, rule.id, Reason.COERCE, None, delete=True)
        return
    if rule.action is Action.SET:
        if present:
            if str(ds[rule.tag].value) != rule.value:
                _record(out, ds, rule.tag, rule.id, Reason.COERCE, rule.value)
        else:
            vr = dictionary_VR(rule.tag) if not rule.tag.is_private else "LO"
            ds.add_new(rule.tag, vr, rule.value)
            out.changes.append(
                Change(rule.tag, keyword_for_tag(rule.tag) or str(rule.tag), rule.id, Reason.COERCE, None, rule.value)
            )
        return
    if not present or ds[rule.tag].VR == "SQ":
        return
    old = str(ds[rule.tag].value or "")
    if rule.action is Action.PREFIX:
        new = old if old.startswith(rule.value or "") else f"{rule.value}{old}"
    elif rule.action is Action.SUFFIX:
        new = old if old.endswith(rule.value or "") else f"{old}{rule.value}"
    else:
        assert rule.pattern is not None
        new = rule.pattern.sub(rule.replacement or "", old)
    if new != old:
        _record(out, ds, rule.tag, rule.id, Reason.COERCE, new)


def _private_tags(rs: RuleSet, ds: Dataset, out: RuleOutcome) -> None:
    if rs.private_policy is PrivatePolicy.KEEP:
        return
    removed = 0
    keep_blocks: set[tuple[int, int]] = set()
    if rs.private_policy is PrivatePolicy.KEEP_LISTED:
        for elem in ds:
            t = elem.tag
            if t.is_private and 0x0010 <= t.element <= 0x00FF and str(elem.value).strip() in rs.keep_creators:
                keep_blocks.add((t.group, t.element))
    for t in [e.tag for e in ds if e.tag.is_private]:
        block = (t.group, t.element) if t.element <= 0x00FF else (t.group, t.element >> 8)
        if block in keep_blocks:
            continue
        del ds[t]
        removed += 1
    if removed:
        out.notes.append(f"private:removed:{removed}")


def _over_long(rs: RuleSet, ds: Dataset, elems: list[DataElement], out: RuleOutcome) -> None:
    for elem in elems:
        limit = MAX_LENGTH.get(elem.VR)
        if limit is None or elem.value is None or elem.tag.group == 0x0002:
            continue
        if elem.VR == "PN":
            values = _values(elem.value)
            too_long = any(len(g) > limit for v in values for g in v.split("="))
        else:
            values = _values(elem.value)
            too_long = any(len(v) > limit for v in values)
        if not too_long:
            continue
        if rs.over_long is OverLongPolicy.QUARANTINE or elem.VR in ("UI", "DA", "TM", "DT", "DS", "IS"):
            # Truncating a UID or a number changes its meaning: never silently.
            out.rejected_by = "over-long-values"
            return
        if elem.VR == "PN":
            new = ["=".join(g[:limit] for g in v.split("=")) for v in values]
        else:
            new = [v[:limit] for v in values]
        _record(out, ds, elem.tag, "over-long-values", Reason.CORRECT, new if len(new) > 1 else new[0])


def _dates(ds: Dataset, elems: list[DataElement], out: RuleOutcome) -> None:
    for elem in elems:
        if elem.VR not in ("DA", "TM") or not elem.value:
            continue
        values = _values(elem.value)
        fixed = [(_normal_date(v) if elem.VR == "DA" else _normal_time(v)) for v in values]
        if any(f is not None for f in fixed):
            new = [f if f is not None else v for f, v in zip(fixed, values, strict=True)]
            _record(out, ds, elem.tag, "dates-times", Reason.CORRECT, new if len(new) > 1 else new[0])


def _valued_tags(ds: Dataset) -> list[BaseTag]:
    """Tags of the top-level elements whose values rules read: numbers, bytes
    and unknown ``UN`` are conformant by VR and charset-free (about half of a
    typical header)."""
    out = []
    for tag in list(ds.keys()):
        vr = getattr(ds.get_item(tag), "VR", None)
        if vr not in BINARY_VRS or (vr == "UN" and tag in DicomDictionary):  # a known UN is retyped on decode
            out.append(tag)
    return out


def _undecoded(ds: Dataset, tag: BaseTag) -> tuple[str, bytes] | None:
    """(VR, bytes) of an element pydicom has not decoded yet, when both are known."""
    item = ds.get_item(tag)
    if isinstance(item, RawDataElement) and item.VR and isinstance(item.value, bytes):
        return item.VR, item.value
    return None


def _elements(ds: Dataset, must_read: Callable[[str, bytes], bool]) -> list[DataElement]:
    """Decoded elements a rule must read: those decoded already, and those
    still undecoded whose VR and bytes ``must_read`` says can matter.
    Decoding is most of a rule pass's cost; most values are settled on bytes."""
    out = []
    for tag in _valued_tags(ds):
        raw = _undecoded(ds, tag)
        if raw is None or must_read(*raw):
            out.append(ds[tag])
    return out


def _maybe_date_to_fix(vr: str, value: bytes) -> bool:
    # _normal_date needs one of / . - ; _normal_time needs ':'
    return (vr == "DA" and (b"/" in value or b"." in value or b"-" in value)) or (vr == "TM" and b":" in value)


def _maybe_over_long(vr: str, value: bytes) -> bool:
    # A value never has more characters than bytes.
    limit = MAX_LENGTH.get(vr)
    return limit is not None and len(value) > limit


def _raw_text(ds: Dataset) -> list[bytes]:
    """Raw bytes of the top-level text elements not yet decoded by pydicom."""
    out = []
    for tag in list(ds.keys()):
        item = ds.get_item(tag)
        vr = getattr(item, "VR", None)
        if vr in TEXT_VRS and isinstance(item.value, bytes):
            out.append(item.value)
    return out


def repair_character_set(ds: Dataset, raw_text: list[bytes]) -> str | None:
    """The declaration the bytes call for, when it differs and is unambiguous.

    Missing or ASCII declaration with non-ASCII bytes that are valid UTF-8 ->
    ISO_IR 192; a Latin-1 declaration over bytes that are valid multi-byte
    UTF-8 (mojibake if read as Latin-1) -> ISO_IR 192. Anything else is kept.
    """
    non_ascii = [b for b in raw_text if any(c > 0x7F for c in b)]
    if not non_ascii:
        return None
    declared = _values(ds.get("SpecificCharacterSet"))
    try:
        for b in non_ascii:
            b.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not declared or declared in (["ISO_IR 6"], [""], ["ISO_IR 100"]):
        return "ISO_IR 192"
    return None


def undeclared_non_ascii(ds: Dataset, raw_text: list[bytes]) -> bool:
    """Non-ASCII text bytes with no declaration (or ISO_IR 6) to read them by."""
    return _values(ds.get("SpecificCharacterSet")) in ([], [""], ["ISO_IR 6"]) and any(
        c > 0x7F for b in raw_text for c in b
    )


def apply_ruleset(rs: RuleSet, ds: Dataset, source_ae: str | None = None) -> RuleOutcome:
    """Apply a rule set to ``ds`` in place; return what changed."""
    out = RuleOutcome()
    raw_text = _raw_text(ds)
    if rs.repair_character_set or rs.assume_character_set:
        wanted = repair_character_set(ds, raw_text) if rs.repair_character_set else None
        if wanted is None and rs.assume_character_set and undeclared_non_ascii(ds, raw_text):
            wanted = rs.assume_character_set  # the site's legacy charset (e.g. Latin-1)
        if wanted is not None:
            old = ds.get("SpecificCharacterSet")
            ds.SpecificCharacterSet = wanted
            # pydicom decodes not-yet-read values with the charset it read: correct that too.
            ds._read_charset = convert_encodings(wanted)
            out.changes.append(
                Change(Tag(0x00080005), "SpecificCharacterSet", "character-set", Reason.CORRECT, old, wanted)
            )
    if undeclared_non_ascii(ds, raw_text):
        out.findings.append("charset:undeclared-non-ascii")  # no option covers it: reported, kept as is
    # Values stay undecoded until read: pydicom decodes them with the declaration
    # read (repaired above), and re-encodes at write if the declaration changes.
    if rs.reencode_utf8 and _values(ds.get("SpecificCharacterSet")) != ["ISO_IR 192"]:
        old = ds.get("SpecificCharacterSet")
        ds.SpecificCharacterSet = "ISO_IR 192"
        out.changes.append(
            Change(Tag(0x00080005), "SpecificCharacterSet", "character-set", Reason.CORRECT, old, "ISO_IR 192")
        )
    if rs.crosswalk is not None and "PatientID" in ds:
        pid, issuer = str(ds.PatientID or ""), str(ds.get("IssuerOfPatientID", "") or "")
        hit = rs.crosswalk.lookup(pid, issuer)
        if hit is None and rs.crosswalk.on_missing == "quarantine":
            out.rejected_by = "crosswalk"
            return out
        if hit is not None:
            _record(out, ds, Tag("PatientID"), "crosswalk", Reason.COERCE, hit[0])
            if hit[1]:
                if "IssuerOfPatientID" in ds:
                    if str(ds.IssuerOfPatientID) != hit[1]:
                        _record(out, ds, Tag("IssuerOfPatientID"), "crosswalk", Reason.COERCE, hit[1])
                else:
                    ds.IssuerOfPatientID = hit[1]
                    out.changes.append(
                        Change(Tag("IssuerOfPatientID"), "IssuerOfPatientID", "crosswalk", Reason.COERCE, None, hit[1])
                    )
    for rule in rs.rules:
        if rule.applies(ds, source_ae):
            _site_rule(rule, ds, out)
            if out.rejected_by:
                return out
    if rs.map_retired_sop_classes and str(ds.get("SOPClassUID", "")) in RETIRED_SOP_CLASSES:
        _record(
            out, ds, Tag("SOPClassUID"), "retired-sop-class", Reason.CORRECT, RETIRED_SOP_CLASSES[str(ds.SOPClassUID)]
        )
    if rs.normalize_dates:
        _dates(ds, _elements(ds, _maybe_date_to_fix), out)
    if rs.over_long is not OverLongPolicy.KEEP:
        _over_long(rs, ds, _elements(ds, _maybe_over_long), out)
    if out.rejected_by:
        return out
    _private_tags(rs, ds, out)
    if rs.invalid_values is InvalidValuePolicy.QUARANTINE and first_invalid_value(ds) is not None:
        out.rejected_by = "invalid-values"
    return out


def is_conformant(vr: str, value: Any) -> bool:
    """True when ``value`` is valid for ``vr`` (PS3.5 6.2) by pydicom's strict check."""
    if value is None or vr in (
        "SQ",
        "OB",
        "OW",
        "OF",
        "OD",
        "OL",
        "OV",
        "UN",
        "US",
        "SS",
        "UL",
        "SL",
        "FL",
        "FD",
        "SV",
        "UV",
        "AT",
    ):
        return True
    try:
        for v in _values(value) if vr != "PN" else [value] if not isinstance(value, (list, tuple)) else value:
            validate_value(vr, v, RAISE)
    except (ValueError, TypeError):
        return False
    return True


# (VR, bytes, character set) of values found valid: most repeat from instance to
# instance of a series (dates, names, descriptions), and validity is a function
# of exactly these. Bounded: cleared when full.
_VALID: set[tuple[str, bytes, str]] = set()
_VALID_MAX = 100_000


def first_invalid_value(ds: Dataset) -> str | None:
    """Keyword of the first element (at any depth) whose value is not valid
    for its VR, or None. Meta elements and private elements are not judged."""
    charset = str(ds.original_character_set or ds._character_set)  # what pydicom decodes with
    for tag in _valued_tags(ds):
        unjudged = tag.is_private or tag.group == 0x0002
        raw = _undecoded(ds, tag)
        if raw is not None and raw[0] != "SQ" and unjudged:
            continue
        seen = (raw[0], raw[1], charset) if raw is not None and raw[0] != "SQ" else None
        if seen is not None and seen in _VALID:
            continue
        try:
            elem = ds[tag]
        except Exception:  # a value that does not decode is not valid either
            if unjudged:
                continue
            return keyword_for_tag(tag) or str(tag)
        if elem.VR == "SQ":  # items are judged, also inside private sequences
            for item in elem.value or []:
                found = first_invalid_value(item)
                if found is not None:
                    return found
            continue
        if unjudged:
            continue
        if not is_conformant(elem.VR, elem.value):
            return elem.keyword or str(elem.tag)
        if seen is not None:
            if len(_VALID) >= _VALID_MAX:
                _VALID.clear()
            _VALID.add(seen)
    return None
