"""Reading a rule set: YAML validated field by field, the crosswalk CSV line by
line; every error names the rule, the field, the file and the line."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import re2
import yaml
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.tag import BaseTag, Tag

from .model import (
    ASSUMABLE_CHARSETS,
    PROTECTED,
    Action,
    Condition,
    Crosswalk,
    InvalidValuePolicy,
    OverLongPolicy,
    PatientPolicy,
    PrivatePolicy,
    Rule,
    RuleSet,
    RuleSetError,
)

E = TypeVar("E", bound=Enum)


def _tag(value: Any, where: str) -> BaseTag:
    if isinstance(value, str) and re.fullmatch(r"\(?[0-9A-Fa-f]{4},\s*[0-9A-Fa-f]{4}\)?", value.strip()):
        g, e = re.findall(r"[0-9A-Fa-f]{4}", value)
        return Tag(int(g, 16), int(e, 16))
    if isinstance(value, str) and (known := tag_for_keyword(value)) is not None:
        return Tag(known)
    raise RuleSetError(f"{where}.tag: {value!r} is neither a DICOM keyword nor (gggg,eeee)")


def _regex(value: Any, where: str) -> Any:
    """A site rule's regular expression, compiled by RE2: matching takes time
    linear in the value, so no pattern can stall normalize on a hostile value
    (Python's ``re`` backtracks). RE2 has no backreferences or lookaround."""
    if not isinstance(value, str):
        raise RuleSetError(f"{where}: a regular expression (string) is required")
    try:
        return re2.compile(value)
    except re2.error as exc:
        detail = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise RuleSetError(
            f"{where}: invalid regular expression for RE2 (no backreferences or lookaround): {detail}"
        ) from None


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


_ROOT_KEYS = frozenset(
    {
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
)


def _policy(data: Mapping[str, Any], key: str, enum: type[E], default: str) -> E:
    try:
        return enum(str(data.get(key, default)))
    except ValueError:
        raise RuleSetError(f"{key}: must be one of {[m.value for m in enum]}") from None


def _flag(data: Mapping[str, Any], key: str, default: bool, where: str = "") -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise RuleSetError(f"{where}{key}: must be true or false")
    return value


def _site_rules(data: Mapping[str, Any]) -> tuple[Rule, ...]:
    raw_rules = data.get("rules") or []
    if not isinstance(raw_rules, list):
        raise RuleSetError("rules: must be a list")
    rules = tuple(_rule(r, i) for i, r in enumerate(raw_rules))
    ids = [r.id for r in rules]
    if len(ids) != len(set(ids)):
        raise RuleSetError(f"rules: duplicate rule id(s) {sorted({i for i in ids if ids.count(i) > 1})}")
    return rules


def _private(data: Mapping[str, Any]) -> dict[str, Any]:
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
    return {"private_policy": policy, "keep_creators": frozenset(c.strip() for c in creators)}


def _charset(data: Mapping[str, Any]) -> dict[str, Any]:
    charset = data.get("character_set") or {}
    if not isinstance(charset, dict):
        raise RuleSetError("character_set: must be a mapping (repair, reencode_utf8, assume)")
    if unknown := set(charset) - {"repair", "reencode_utf8", "assume"}:
        raise RuleSetError(f"character_set: unknown field(s) {sorted(unknown)}")
    assume = charset.get("assume")
    if assume is not None and assume not in ASSUMABLE_CHARSETS:
        raise RuleSetError(f"character_set.assume: must be one of {list(ASSUMABLE_CHARSETS)}, not {assume!r}")
    return {
        "repair_character_set": _flag(charset, "repair", True, "character_set."),
        "reencode_utf8": _flag(charset, "reencode_utf8", False, "character_set."),
        "assume_character_set": assume,
    }


def parse_ruleset(data: Any, base: Path = Path(".")) -> RuleSet:
    """Validate a rule-set mapping (as read from YAML)."""
    if not isinstance(data, Mapping):
        raise RuleSetError("<root>: a rule set is a mapping")
    if unknown := set(data) - _ROOT_KEYS:
        raise RuleSetError(f"<root>: unknown field(s) {sorted(unknown)}")
    rid = data.get("id")
    if not isinstance(rid, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", rid):
        raise RuleSetError(f"id: a short identifier is required, got {rid!r}")
    version = data.get("version")
    if version is None or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,32}", str(version)):
        raise RuleSetError("version: is required (e.g. 1 or 2024.1)")
    return RuleSet(
        id=rid,
        version=str(version),
        rules=_site_rules(data),
        **_private(data),
        over_long=_policy(data, "over_long_values", OverLongPolicy, "truncate"),
        invalid_values=_policy(data, "invalid_values", InvalidValuePolicy, "quarantine"),
        inconsistent_patient=_policy(data, "inconsistent_patient", PatientPolicy, "quarantine"),
        map_retired_sop_classes=_flag(data, "retired_sop_classes", True),
        normalize_dates=_flag(data, "normalize_dates", True),
        **_charset(data),
        crosswalk=_crosswalk(data.get("crosswalk"), base),
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
