"""Normalize ("de-proprietarize"): make a received instance conformant DICOM
Part 10, or quarantine it with a reason code.

First rules (always on): a structural integrity walk (pydicom reads truncated
files without complaint), required UIDs present and well formed, native pixel
data of the declared length, Part 10 file meta present and consistent, and
implicit VR / big endian / deflated encodings rewritten as explicit VR little
endian. Instances already conformant are passed through byte for byte; pixel
data is never decoded.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import mmap
import struct
import zlib
from dataclasses import dataclass, field

import pydicom
from pydicom.datadict import DicomDictionary, dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import BaseTag
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from .part10 import read_explicit_le
from .privacy import identity_digest
from .reasons import ReasonCode, reason
from .rules import STRUCTURAL, Change, Reason, RuleOutcome, RuleSet, apply_ruleset, is_conformant
from .uids import InstanceUIDs, is_valid_uid

REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_REWRITE_SYNTAXES = {ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian}
_NATIVE_SYNTAXES = _REWRITE_SYNTAXES | {ExplicitVRLittleEndian}
# VRs whose explicit length field is 4 bytes after 2 reserved bytes (PS3.5 7.1.2).
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_SWAP_WIDTH = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
_UNDEFINED = 0xFFFFFFFF
# An element's header by byte order: implicit (tag, 4-byte length), explicit (tag, VR, 2-byte length), 4-byte length.
_HEADERS = {e: (struct.Struct(f"{e}HHL"), struct.Struct(f"{e}HH2sH"), struct.Struct(f"{e}L")) for e in "<>"}
# Bounds on hostile input (each a quarantine, never a failed partition): nesting
# of sequences (real objects rarely pass 10), and what a deflated dataset may inflate to.
NESTING_LIMIT = 64
INFLATE_LIMIT_BYTES = 1 << 30
INFLATE_RATIO_LIMIT = 200
ByteBuffer = bytes | mmap.mmap  # a file's bytes, read or mapped (normalize_file walks a mapped file)


@dataclass
class NormalizeResult:
    """The outcome for one instance. ``data`` is set only when it migrates."""

    reason: str | None
    data: bytes | None = None
    sop_instance_uid: str | None = None
    sop_class_uid: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    study_date: str | None = None
    modality: str | None = None
    # SHA-256 of PatientID + IssuerOfPatientID, keyed (privacy.PatientKeyer)
    # before it reaches a manifest: one patient per study is checked on it.
    patient_digest: str | None = None
    transfer_syntax_in: str | None = None
    transfer_syntax_out: str | None = None
    pixel_sha256_before: str | None = None
    pixel_sha256_after: str | None = None
    changes: list[str] = field(default_factory=list)
    rules_applied: list[str] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)  # reported; the instance is not changed for them

    @property
    def quarantined(self) -> bool:
        return self.reason is not None


class _Truncated(Exception):
    pass


def element_header(
    buf: ByteBuffer, pos: int, end: int, implicit: bool, e: str
) -> tuple[int, int, bytes | None, int, int]:
    """(group, element, VR or None, length, where its value starts) of the element at ``pos``;
    items and delimiters (group FFFE) are implicit-style. ``e``: the struct byte order."""
    if pos + 8 > end:
        raise _Truncated(f"element header cut at byte {pos}")
    implicit_header, explicit_header, long_length = _HEADERS[e]
    if not implicit:
        group, elem, vr, length = explicit_header.unpack_from(buf, pos)
        if group != 0xFFFE:
            if vr not in _LONG_VRS:
                return group, elem, vr, length, pos + 8
            if pos + 12 > end:
                raise _Truncated(f"element header cut at byte {pos}")
            return group, elem, vr, long_length.unpack_from(buf, pos + 8)[0], pos + 12
    group, elem, length = implicit_header.unpack_from(buf, pos)
    return group, elem, None, length, pos + 8


def _walk(
    buf: ByteBuffer, pos: int, end: int, implicit: bool, little: bool, until_delimiter: bool, depth: int = 0
) -> int:
    """Walk data elements from ``pos``; raise :class:`_Truncated` if any
    declared length runs past the end. Returns the position after the last
    element (or after the delimiter when ``until_delimiter``)."""
    if depth > NESTING_LIMIT:
        raise _Quarantine(reason(ReasonCode.NESTING_LIMIT))
    e = "<" if little else ">"
    while pos < end:
        group, elem, vr, length, pos = element_header(buf, pos, end, implicit, e)
        if group == 0xFFFE:  # item / delimiters are always implicit-style
            if elem == 0xE0DD or elem == 0xE00D:
                if until_delimiter:
                    return pos
                continue
            if length == _UNDEFINED:
                pos = _walk(buf, pos, end, implicit, little, True, depth + 1)
            else:
                if pos + length > end:
                    raise _Truncated(f"item at byte {pos} runs past the end")
                pos += length
            continue
        if length == _UNDEFINED:
            # PS3.5 6.2.2: an undefined-length UN holds implicit VR items.
            pos = _walk(buf, pos, end, implicit or vr == b"UN", little, True, depth + 1)
        else:
            if pos + length > end:
                raise _Truncated(f"element ({group:04X},{elem:04X}) declares {length} bytes, {end - pos} remain")
            pos += length
    if until_delimiter:
        raise _Truncated("sequence or item without its delimiter")
    return pos


def _dataset_offset(raw: ByteBuffer) -> tuple[int, str | None]:
    """Offset of the dataset after the file meta, and the meta's transfer syntax.
    The meta (group 0002) is explicit VR little endian (PS3.10 7.1); a meta
    written implicit is read as such."""
    if len(raw) < 132 or raw[128:132] != b"DICM":
        return 0, None
    pos, ts = 132, None
    while pos + 8 <= len(raw) and struct.unpack_from("<H", raw, pos)[0] == 0x0002:
        element = struct.unpack_from("<H", raw, pos + 2)[0]
        vr = raw[pos + 4 : pos + 6]
        if not vr.isalpha():
            length, header = struct.unpack_from("<L", raw, pos + 4)[0], 8
        elif vr in _LONG_VRS:
            if pos + 12 > len(raw):
                raise _Truncated("file meta cut")
            length, header = struct.unpack_from("<L", raw, pos + 8)[0], 12
        else:
            length, header = struct.unpack_from("<H", raw, pos + 6)[0], 8
        if length == _UNDEFINED or pos + header + length > len(raw):
            raise _Truncated(f"file meta element (0002,{element:04X}) runs past the end")
        if element == 0x0010:
            ts = raw[pos + header : pos + header + length].rstrip(b"\x00 ").decode("ascii", "replace") or None
        pos += header + length
    return pos, ts


def inflate(data: bytes) -> bytes:
    """A deflated dataset, inflated within bounds: an instance may not inflate
    past ``INFLATE_LIMIT_BYTES`` nor ``INFLATE_RATIO_LIMIT`` times its size."""
    limit = min(INFLATE_LIMIT_BYTES, max(len(data) * INFLATE_RATIO_LIMIT, 1 << 20))
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise _Truncated(f"deflated stream broken: {exc}") from exc
    if len(out) > limit:
        raise _Quarantine(reason(ReasonCode.DECOMPRESSION_LIMIT))
    return out


def check_structure(raw: ByteBuffer, transfer_syntax: str, offset: int) -> None:
    """Raise :class:`_Truncated` when an element's declared length runs past EOF."""
    body = raw
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        body = raw[:offset] + inflate(raw[offset:])
    implicit = transfer_syntax == ImplicitVRLittleEndian
    little = transfer_syntax != ExplicitVRBigEndian
    vr = body[offset + 4 : offset + 6]
    if not implicit and len(vr) == 2 and not vr.isalpha():
        implicit = True  # dataset encoded implicit despite its meta, as pydicom also detects
    _walk(body, offset, len(body), implicit, little, until_delimiter=False)


def _expected_pixel_bytes(ds: Dataset) -> int | None:
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    if bits == 1:
        return (rows * cols * spp * frames + 7) // 8
    return rows * cols * spp * frames * ((bits + 7) // 8)


def _swap(value: bytes, width: int) -> bytes:
    if width <= 1 or len(value) % width:
        return value
    fmt = {2: "H", 4: "L", 8: "Q"}[width]
    n = len(value) // width
    return struct.pack(f"<{n}{fmt}", *struct.unpack(f">{n}{fmt}", value))


def _swap_binary_vrs(ds: Dataset) -> None:
    """Big endian -> little endian for the binary VRs pydicom keeps as bytes."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _swap_binary_vrs(item)
        elif elem.VR in _SWAP_WIDTH and isinstance(elem.value, bytes):
            elem.value = _swap(elem.value, _SWAP_WIDTH[elem.VR])


def _pixel_hash(ds: Dataset, big_endian: bool) -> str | None:
    if "PixelData" not in ds:
        return None
    elem = ds["PixelData"]
    value = elem.value
    if big_endian and elem.VR == "OW":
        value = _swap(value, 2)  # hash pixel values, not their byte order
    return hashlib.sha256(value).hexdigest()


def patient_digest(ds: Dataset) -> str | None:
    """The unkeyed digest of (PatientID, IssuerOfPatientID); see :mod:`privacy`."""
    try:
        pid = str(ds.get("PatientID", "") or "").strip()
        issuer = str(ds.get("IssuerOfPatientID", "") or "").strip()
    except Exception:
        return None
    if not pid:
        return None
    return identity_digest(pid, issuer)


def _looks_like_dataset(raw: bytes) -> bool:
    """A bare dataset (no Part 10 header) must open with a low group tag."""
    if len(raw) < 8:
        return False
    group_le = struct.unpack_from("<H", raw, 0)[0]
    group_be = struct.unpack_from(">H", raw, 0)[0]
    return group_le in (0x0002, 0x0008) or group_be in (0x0002, 0x0008)


def record_original_attributes(
    ds: Dataset, changes: list[Change], ruleset: RuleSet, source_ae: str | None, modified_at: dt.datetime | None
) -> None:
    """Keep every changed attribute's old value in the Original Attributes
    Sequence (0400,0561), one item per reason (PS3.3 C.12.1.1.9). Old values
    that were not valid for their VR go to the Nonconforming Modified
    Attributes Sequence as their bytes, so the object stays conformant."""
    when = (modified_at or dt.datetime.now(dt.UTC)).strftime("%Y%m%d%H%M%S.%f%z")
    items = list(ds.get("OriginalAttributesSequence", []) or [])
    charset = _values_charset(ds)
    for why in Reason:
        group = [c for c in changes if c.reason is why]
        if not group:
            continue
        modified = Dataset()
        nonconforming = []
        seen: set[int] = set()
        for c in group:
            if c.tag in seen:
                continue  # the first change holds the original value
            seen.add(c.tag)
            vr = dictionary_VR(c.tag) if c.tag in DicomDictionary else "UN"
            if c.old is None or is_conformant(vr, c.old):
                modified.add_new(c.tag, vr, c.old)  # an absent attribute is recorded empty
            else:
                raw = "\\".join(str(v) for v in (c.old if isinstance(c.old, (list, tuple)) else [c.old]))
                item = Dataset()
                item.SelectorAttribute = c.tag
                item.SelectorValueNumber = 0
                data = raw.encode(charset, "replace")
                item.NonconformingDataElementValue = data + (b"\x00" if len(data) % 2 else b"")
                nonconforming.append(item)
        # Modified Attributes Sequence: Type 1, exactly one item (empty when
        # every old value was nonconforming); one nonconforming value per
        # Original Attributes item (dciodvfy's reading of the module).
        for n, bad in enumerate(nonconforming or [None]):
            item = Dataset()
            item.ModifiedAttributesSequence = [modified if n == 0 else Dataset()]
            if bad is not None:
                item.NonconformingModifiedAttributesSequence = [bad]
            item.AttributeModificationDateTime = when
            item.ModifyingSystem = f"pacs-migration {ruleset.label}"[:64]
            item.SourceOfPreviousValues = (source_ae or "")[:64]
            item.ReasonForTheAttributeModification = why.value
            items.append(item)
    ds.OriginalAttributesSequence = items


def _values_charset(ds: Dataset) -> str:
    from pydicom.charset import convert_encodings

    try:
        return convert_encodings(ds.get("SpecificCharacterSet") or "ISO_IR 6")[0]
    except Exception:
        return "latin_1"


class _Quarantine(Exception):
    """A step found the instance cannot migrate: ``reason`` is its code."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Read:
    """A received instance, parsed: what the later steps work on."""

    raw: bytes
    ds: Dataset
    offset: int  # where the dataset starts (after the file meta)
    meta_ts: str | None  # the file meta's transfer syntax, if any
    ts_in: str
    encoding_mismatch: bool  # an implicit VR body under an explicit transfer syntax
    structure_checked: bool = False  # every length already checked as :func:`check_structure` checks


def _read(raw: bytes) -> _Read:
    """Step 1: structure. Truncation, garbage and an unreadable encoding quarantine."""
    try:
        offset, meta_ts = _dataset_offset(raw)
    except _Truncated:
        raise _Quarantine(reason(ReasonCode.TRUNCATED)) from None
    if offset == 0 and not _looks_like_dataset(raw):
        raise _Quarantine(reason(ReasonCode.NOT_DICOM))
    if meta_ts == DeflatedExplicitVRLittleEndian:
        inflate(raw[offset:])  # bounded, before pydicom inflates it whole
    try:
        # pydicom's reading, leaner, with the structure checked as it goes; else pydicom itself.
        ds = read_explicit_le(raw, offset, meta_ts, lambda at, un: _walk(raw, at, len(raw), un, True, True, 1))
        structure_checked = ds is not None
        if ds is None:
            ds = pydicom.dcmread(io.BytesIO(raw), force=True)
    except RecursionError:
        raise _Quarantine(reason(ReasonCode.NESTING_LIMIT)) from None
    except (EOFError, struct.error):
        raise _Quarantine(reason(ReasonCode.TRUNCATED)) from None
    except Exception:  # InvalidDicomError and the many types pydicom raises on garbage
        raise _Quarantine(reason(ReasonCode.NOT_DICOM)) from None
    if len(ds) == 0:
        raise _Quarantine(reason(ReasonCode.NOT_DICOM))
    implicit, little = ds.original_encoding
    if meta_ts:
        ts_in = meta_ts
    elif implicit is None:
        raise _Quarantine(reason(ReasonCode.NOT_DICOM))
    else:
        ts_in = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    body_vr = raw[offset + 4 : offset + 6]
    mismatch = ts_in != ImplicitVRLittleEndian and len(body_vr) == 2 and not body_vr.isalpha()
    return _Read(raw, ds, offset, meta_ts, ts_in, mismatch, structure_checked)


def _check_identity(read: _Read, result: NormalizeResult, expected: InstanceUIDs | None) -> None:
    """Step 2: the key UIDs are present, well formed, and the ones the census expects."""
    try:
        if not read.structure_checked:
            check_structure(read.raw, read.ts_in, read.offset)
    except (_Truncated, struct.error):
        raise _Quarantine(reason(ReasonCode.TRUNCATED)) from None
    ds = read.ds
    for keyword in REQUIRED_UIDS:
        try:
            value = ds.get(keyword)
        except Exception:
            value = None
        text = str(value).strip() if value is not None else ""
        if not text:
            raise _Quarantine(reason(ReasonCode.MISSING_UID, keyword))
        if not is_valid_uid(text):
            raise _Quarantine(reason(ReasonCode.BAD_UID_SYNTAX, keyword))
    result.sop_instance_uid = str(ds.SOPInstanceUID)
    result.sop_class_uid = str(ds.SOPClassUID)
    result.study_instance_uid = str(ds.StudyInstanceUID)
    result.series_instance_uid = str(ds.SeriesInstanceUID)
    result.study_date = str(ds.get("StudyDate", "") or "")
    result.modality = str(ds.get("Modality", "") or "")
    actual = InstanceUIDs(result.study_instance_uid, result.series_instance_uid, result.sop_instance_uid)
    if expected is not None and expected != actual:
        raise _Quarantine(reason(ReasonCode.UID_CONFLICT))


def check_pixel_length(ds: Dataset, ts_in: str, have: int) -> None:
    """Native pixel data of ``have`` bytes holds what its attributes declare."""
    if ts_in not in _NATIVE_SYNTAXES:
        return
    want = _expected_pixel_bytes(ds)
    if "YBR_FULL_422" in str(ds.get("PhotometricInterpretation", "")) and want:
        want = want * 2 // 3  # 4:2:2 subsampled native data
    if want is not None and have < want:  # trailing padding is tolerated
        raise _Quarantine(reason(ReasonCode.PIXEL_LENGTH_MISMATCH))


def _check_pixels(read: _Read, result: NormalizeResult) -> None:
    """Step 3: native pixel data holds the bytes its attributes declare; its hash."""
    ds = read.ds
    if "PixelData" in ds:
        check_pixel_length(ds, read.ts_in, len(ds["PixelData"].value or b""))
    result.pixel_sha256_before = _pixel_hash(ds, read.ts_in == ExplicitVRBigEndian)


def _apply_rules(read: _Read, result: NormalizeResult, ruleset: RuleSet, source_ae: str | None) -> RuleOutcome:
    """Step 4: the rule set, in place; a rejecting rule quarantines."""
    outcome = apply_ruleset(ruleset, read.ds, source_ae)
    if outcome.rejected_by:
        raise _Quarantine(reason(ReasonCode.RULE_REJECTED, outcome.rejected_by))
    result.rules_applied = sorted({c.rule_id for c in outcome.changes})
    result.sop_class_uid = str(read.ds.SOPClassUID)
    result.findings = list(outcome.findings)
    result.patient_digest = patient_digest(read.ds)  # the patient the object will name (after a crosswalk)
    return outcome


def normalize(
    raw: bytes,
    expected: InstanceUIDs | None = None,
    ruleset: RuleSet = STRUCTURAL,
    source_ae: str | None = None,
    modified_at: dt.datetime | None = None,
) -> NormalizeResult:
    """Normalize one instance's bytes: read, check identity, check pixels,
    apply the rules, then pass through unchanged or rewrite.

    Parameters
    ----------
    raw : bytes
        The instance as received (Part 10 or a bare dataset).
    expected : InstanceUIDs, optional
        The UIDs the census expects for it (study, series, SOP); a disagreement is ``UID_CONFLICT``.
    ruleset : RuleSet
        Site rules and policies (:mod:`rules`); the structural rules always apply.
    source_ae : str, optional
        The source's AE title, for rule conditions and provenance.
    """
    result = NormalizeResult(reason=None)
    try:
        read = _read(raw)
        result.transfer_syntax_in = read.ts_in
        _check_identity(read, result, expected)
        _check_pixels(read, result)
        findings = _structural_findings(read.ds)  # before the rules change the dataset
        outcome = _apply_rules(read, result, ruleset, source_ae)
        if not _needs_rewrite(read, findings, outcome):
            result.data, result.transfer_syntax_out = raw, read.ts_in
            result.pixel_sha256_after = result.pixel_sha256_before
            return result
        _rewrite(read, result, findings, outcome, ruleset, source_ae, modified_at)
    except _Quarantine as q:
        result.reason, result.data = q.reason, None
    except RecursionError:  # deeper than pydicom can follow, wherever it is met
        result.reason, result.data = reason(ReasonCode.NESTING_LIMIT), None
    return result


@dataclass
class _Findings:
    """What calls for a rewrite even of an explicit VR little endian file."""

    group_lengths: list[BaseTag]
    un_known: list[BaseTag]  # standard attributes sent as UN


def _structural_findings(ds: Dataset) -> _Findings:
    return _Findings(
        [t for t in ds.keys() if t.element == 0x0000 and t.group != 0x0002],
        [t for t, item in ds.items() if item.VR == "UN" and not t.is_private and t in DicomDictionary],
    )


def _meta_ok(read: _Read) -> bool:
    meta = getattr(read.ds, "file_meta", None)
    return (
        read.meta_ts is not None
        and meta is not None
        and meta.get("MediaStorageSOPClassUID") == read.ds.SOPClassUID
        and meta.get("MediaStorageSOPInstanceUID") == read.ds.SOPInstanceUID
    )


def _needs_rewrite(read: _Read, findings: _Findings, outcome: RuleOutcome) -> bool:
    return bool(
        read.ts_in in _REWRITE_SYNTAXES
        or not _meta_ok(read)
        or findings.group_lengths
        or findings.un_known
        or outcome.changes
        or outcome.notes
        or read.encoding_mismatch
    )


def _rewrite(
    read: _Read,
    result: NormalizeResult,
    findings: _Findings,
    outcome: RuleOutcome,
    ruleset: RuleSet,
    source_ae: str | None,
    modified_at: dt.datetime | None,
) -> None:
    """Step 5: explicit VR little endian with fresh, consistent file meta; every
    change listed in ``result.changes`` and recorded in the Original Attributes Sequence."""
    ts_out = prepare_rewrite(read, result, findings, outcome, ruleset, source_ae, modified_at)
    ds = read.ds
    data = _write(ds, ts_out, getattr(ds, "file_meta", None))
    # Our own output must read back, and carry the same pixel values.
    result.pixel_sha256_after = _pixel_hash(pydicom.dcmread(io.BytesIO(data)), big_endian=False)
    check_pixels_kept(result, outcome)
    result.data, result.transfer_syntax_out = data, ts_out


def check_pixels_kept(result: NormalizeResult, outcome: RuleOutcome) -> None:
    if result.pixel_sha256_after != result.pixel_sha256_before and not any(
        c.tag == 0x7FE00010 for c in outcome.changes
    ):
        raise AssertionError("normalization altered pixel data without a rule")


def prepare_rewrite(
    read: _Read,
    result: NormalizeResult,
    findings: _Findings,
    outcome: RuleOutcome,
    ruleset: RuleSet,
    source_ae: str | None,
    modified_at: dt.datetime | None,
) -> str:
    """The dataset changes of step 5, in place (every one listed in
    ``result.changes``); returns the transfer syntax to write."""
    ds, ts_in = read.ds, read.ts_in
    ts_out = ExplicitVRLittleEndian if ts_in in _NATIVE_SYNTAXES else ts_in
    if read.meta_ts is None:
        result.changes.append("file_meta:created")
    elif not _meta_ok(read):
        result.changes.append("file_meta:rebuilt")
    if ts_out != ts_in:
        result.changes.append(f"transfer_syntax:{ts_in}->{ts_out}")
    if ts_in == ExplicitVRBigEndian:
        _swap_binary_vrs(ds)
    for tag in findings.group_lengths:
        del ds[tag]
    if findings.group_lengths:
        result.changes.append(f"group_length:removed:{len(findings.group_lengths)}")
    if findings.un_known:
        for tag in findings.un_known:
            _ = ds[tag]  # decoding retypes a known UN (not left to whether a rule happened to read it)
        result.changes.append(f"un:retyped:{len(findings.un_known)}")
    if read.encoding_mismatch:
        result.changes.append("encoding:implicit-vr-body-rewritten-explicit")
        for elem in ds.iterall():
            _ = elem.value  # read as implicit VR: decode now, or the explicit writer gets raw bytes
    result.changes.extend(f"rule:{c.rule_id}:{c.keyword}" for c in outcome.changes)
    result.changes.extend(outcome.notes)
    if outcome.changes:
        record_original_attributes(ds, outcome.changes, ruleset, source_ae, modified_at)
    return ts_out


def _write(ds: Dataset, ts_out: str, old_meta: Dataset | None) -> bytes:
    """Part 10 bytes of ``ds``: preamble, file meta with its group length, dataset."""
    new_meta = FileMetaDataset()
    new_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    new_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    new_meta.TransferSyntaxUID = UID(ts_out)
    new_meta.FileMetaInformationVersion = b"\x00\x01"
    new_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    if old_meta is not None and "SourceApplicationEntityTitle" in old_meta:
        new_meta.SourceApplicationEntityTitle = old_meta.SourceApplicationEntityTitle
    ds.file_meta = new_meta
    ds.preamble = b"\x00" * 128
    out = io.BytesIO()
    try:
        pydicom.dcmwrite(out, ds, implicit_vr=False, little_endian=True, force_encoding=True)
    except Exception:
        raise _Quarantine(reason(ReasonCode.NOT_DICOM)) from None
    # force_encoding writes the meta without its group length: write it properly.
    body_at, _ = _dataset_offset(out.getvalue())
    meta_buf = DicomBytesIO()
    meta_buf.is_little_endian, meta_buf.is_implicit_VR = True, False
    write_file_meta_info(meta_buf, new_meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + meta_buf.getvalue() + out.getvalue()[body_at:]
