"""Applying a rule set to a pydicom dataset, in place, every change returned
with its old value."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from typing import Any

from pydicom.charset import convert_encodings
from pydicom.config import RAISE
from pydicom.datadict import DicomDictionary, dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import validate_value

from .model import (
    BINARY_VRS,
    MAX_LENGTH,
    RETIRED_SOP_CLASSES,
    TEXT_VRS,
    Action,
    Change,
    InvalidValuePolicy,
    OverLongPolicy,
    PrivatePolicy,
    Reason,
    Rule,
    RuleOutcome,
    RuleSet,
)

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


def _valued_items(ds: Dataset) -> list[tuple[BaseTag, Any]]:
    """The top-level elements whose values rules read, as the dataset holds them
    (raw until decoded; ``Dataset.items`` decodes nothing): numbers, bytes and
    unknown ``UN`` are conformant by VR and charset-free (about half of a
    typical header). Normalize reads with no deferred values, so a raw value is its bytes."""
    return [
        (tag, item)
        for tag, item in list(ds.items())
        if item.VR not in BINARY_VRS or (item.VR == "UN" and tag in DicomDictionary)  # a known UN is retyped
    ]


def _undecoded(item: Any) -> tuple[str, bytes] | None:
    """(VR, bytes) of an element pydicom has not decoded yet, when both are known."""
    if isinstance(item, RawDataElement) and item.VR and isinstance(item.value, bytes):
        return item.VR, item.value
    return None


def _to_read(ds: Dataset, *must_reads: Callable[[str, bytes], bool]) -> list[list[BaseTag]]:
    """For each rule pass, the tags of the elements it must read: those decoded already,
    and those still undecoded whose VR and bytes its ``must_read`` says can matter. One
    listing of the dataset for every pass: decoding is most of a pass's cost, and most
    values are settled on bytes."""
    out: list[list[BaseTag]] = [[] for _ in must_reads]
    for tag, item in _valued_items(ds):
        raw = _undecoded(item)
        for tags, must_read in zip(out, must_reads, strict=True):
            if raw is None or must_read(*raw):
                tags.append(tag)
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
    return [item.value for item in ds.values() if item.VR in TEXT_VRS and isinstance(item.value, bytes)]


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
    if rs.default_issuer and "PatientID" in ds and not str(ds.get("IssuerOfPatientID", "") or "").strip():
        # The site's namespace, before the crosswalk (keyed by issuer) and the patient key.
        old = ds.get("IssuerOfPatientID")
        ds.IssuerOfPatientID = rs.default_issuer
        tag, new = Tag("IssuerOfPatientID"), rs.default_issuer
        out.changes.append(Change(tag, "IssuerOfPatientID", "source-issuer", Reason.COERCE, old, new))
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
    if rs.normalize_dates or rs.over_long is not OverLongPolicy.KEEP:
        # The over-long pass reads what the dates pass decoded too, as it would listing after it.
        dates_tags, long_tags = _to_read(
            ds,
            _maybe_date_to_fix,
            lambda vr, value: _maybe_over_long(vr, value) or (rs.normalize_dates and _maybe_date_to_fix(vr, value)),
        )
        if rs.normalize_dates:
            _dates(ds, [ds[tag] for tag in dates_tags], out)
        if rs.over_long is not OverLongPolicy.KEEP:
            _over_long(rs, ds, [ds[tag] for tag in long_tags], out)
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
    for tag, item in _valued_items(ds):
        unjudged = tag.is_private or tag.group == 0x0002
        raw = _undecoded(item)
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
