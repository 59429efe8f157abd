"""Normalize a staged file without holding it whole: memory flat in the
instance's size (tomosynthesis, whole-slide imaging, long cine run to GBs).

At or above ``stream_from`` bytes the file is mapped, not read: its structure
is walked in place (touching element headers only), the header (every element
but the pixel data) is parsed and, where needed, rewritten exactly as
:func:`normalize.normalize` does it, and the pixel data is hashed and copied to
the output in chunks. The outcome is the in-memory one's (a corpus test holds
them equal); the rare encodings this path does not take (deflated, no file
meta, an implicit body under an explicit syntax, no pixel data, a damaged
structure) go through :func:`normalize.normalize`, which decides their reason.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import mmap
import struct
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from .normalize import (
    _UNDEFINED,
    NormalizeResult,
    _apply_rules,
    _check_identity,
    _dataset_offset,
    _needs_rewrite,
    _Quarantine,
    _read,
    _structural_findings,
    _Truncated,
    _walk,
    _write,
    check_pixel_length,
    check_pixels_kept,
    check_structure,
    element_header,
    normalize,
    prepare_rewrite,
)
from .reasons import ReasonCode, reason
from .rules import STRUCTURAL, RuleSet
from .uids import InstanceUIDs

STREAM_FROM_BYTES = 16 << 20
_CHUNK = 8 << 20
_PIXEL_DATA = 0x7FE00010
_SEQUENCE_DELIMITER = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
_EMPTY_ITEM = struct.pack("<HHL", 0xFFFE, 0xE000, 0)


@dataclass(frozen=True)
class PixelSpan:
    """Where the top-level Pixel Data element lies in a file."""

    start: int  # its tag's first byte
    value_at: int
    value_end: int  # undefined length (encapsulated): where its sequence delimiter starts
    end: int  # after the element (and its delimiter)
    vr: bytes | None  # as encoded; None under implicit VR

    @property
    def undefined(self) -> bool:
        return self.end != self.value_end

    @property
    def length(self) -> int:
        return self.value_end - self.value_at


def find_pixel_data(buf: Any, pos: int, implicit: bool, little: bool) -> PixelSpan | None:
    """The top-level (7FE0,0010) of a dataset starting at ``pos``, skipping
    over every other element (nested ones walked by their headers only)."""
    e = "<" if little else ">"
    end = len(buf)
    while pos + 8 <= end:
        start = pos
        group, element, vr, length, pos = element_header(buf, pos, end, implicit, e)
        if length == _UNDEFINED:
            after = _walk(buf, pos, end, implicit or vr == b"UN", little, True, 1)
            value_end = after - 8
        else:
            after = value_end = pos + length
        tag = group << 16 | element
        if tag == _PIXEL_DATA:
            return PixelSpan(start, pos, value_end, after, vr)
        if tag > _PIXEL_DATA or after > end:
            return None
        pos = after
    return None


def _chunks(path: Path, span: PixelSpan, swap: bool) -> Iterator[bytes]:
    """The pixel data's bytes in chunks (plain reads: the page cache, not this
    process, holds the file); big endian words swapped to little endian."""
    swap = swap and span.length % 2 == 0
    with open(path, "rb") as fh:
        fh.seek(span.value_at)
        left = span.length
        while left:
            chunk = fh.read(min(_CHUNK, left))
            if not chunk:
                raise _Truncated("pixel data cut")
            left -= len(chunk)
            if swap:
                words = array("H", chunk)
                words.byteswap()
                chunk = words.tobytes()
            yield chunk


def _sha256(chunks: Iterator[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def normalize_file(
    path: Path,
    expected: InstanceUIDs | None,
    out: Path,
    ruleset: RuleSet = STRUCTURAL,
    source_ae: str | None = None,
    modified_at: dt.datetime | None = None,
    stream_from: int = STREAM_FROM_BYTES,
) -> tuple[NormalizeResult, bool]:
    """Normalize the staged file ``path``; a rewrite goes to ``out``. Returns
    the result (its ``data`` is None) and whether ``out`` was written (else the
    staged file is the object, byte for byte)."""
    if path.stat().st_size >= max(stream_from, 1):
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            streamed = _normalize_mapped(path, buf, expected, out, ruleset, source_ae, modified_at)
        if streamed is not None:
            return streamed
    raw = path.read_bytes()
    result = normalize(raw, expected, ruleset, source_ae, modified_at)
    rewritten = result.data is not None and result.data is not raw
    if rewritten:
        out.write_bytes(result.data or b"")
    result.data = None
    return result, rewritten


def _locate(buf: Any) -> tuple[PixelSpan, bool] | None:
    """The pixel data of a file this path takes, and whether it is little endian; None: the in-memory path."""
    try:
        offset, ts = _dataset_offset(buf)
        if ts is None or ts == DeflatedExplicitVRLittleEndian:
            return None
        implicit, little = ts == ImplicitVRLittleEndian, ts != ExplicitVRBigEndian
        body_vr = buf[offset + 4 : offset + 6]
        if not implicit and len(body_vr) == 2 and not body_vr.isalpha():
            return None  # an implicit body under an explicit syntax
        check_structure(buf, ts, offset)
        span = find_pixel_data(buf, offset, implicit, little)
    except (_Truncated, _Quarantine, struct.error, RecursionError):
        return None
    if span is None or span.vr not in (None, b"OB", b"OW"):
        return None
    return span, little


def _normalize_mapped(
    path: Path,
    buf: Any,
    expected: InstanceUIDs | None,
    out: Path,
    ruleset: RuleSet,
    source_ae: str | None,
    modified_at: dt.datetime | None,
) -> tuple[NormalizeResult, bool] | None:
    located = _locate(buf)
    if located is None:
        return None
    span, little = located
    swap = not little and span.vr == b"OW"
    result = NormalizeResult(reason=None)
    try:
        read = _read(buf[: span.start] + buf[span.end :])  # the header: small, whatever the pixels
        result.transfer_syntax_in = read.ts_in
        _check_identity(read, result, expected)
        check_pixel_length(read.ds, read.ts_in, span.length)
        result.pixel_sha256_before = _sha256(_chunks(path, span, swap))
        findings = _structural_findings(read.ds)
        outcome = _apply_rules(read, result, ruleset, source_ae)
        if not _needs_rewrite(read, findings, outcome):
            result.transfer_syntax_out, result.pixel_sha256_after = read.ts_in, result.pixel_sha256_before
            return result, False
        ts_out = prepare_rewrite(read, result, findings, outcome, ruleset, source_ae, modified_at)
        _write_streamed(path, span, read.ds, ts_out, out, swap)
        result.pixel_sha256_after = _read_back(out)  # our own output must read back, same pixel values
        check_pixels_kept(result, outcome)
        result.transfer_syntax_out = ts_out
        return result, True
    except _Quarantine as q:
        result.reason = q.reason
    except RecursionError:
        result.reason = reason(ReasonCode.NESTING_LIMIT)
    out.unlink(missing_ok=True)
    return result, False


def _write_streamed(path: Path, span: PixelSpan, ds: Any, ts_out: str, out: Path, swap: bool) -> None:
    """The rewritten header with the pixel data copied in. pydicom writes the
    header around an empty Pixel Data (so every element keeps its place); the
    value then goes in its stead, as pydicom would write it (VR, even length)."""
    vr = span.vr.decode() if span.vr else ("OB" if span.undefined else "OW")  # pydicom's choice, as in memory
    ds.add_new(_PIXEL_DATA, vr, _EMPTY_ITEM if span.undefined else b"")  # encapsulated: one empty item
    ds[_PIXEL_DATA].is_undefined_length = span.undefined
    try:
        head = _write(ds, ts_out, getattr(ds, "file_meta", None))
    finally:
        del ds[_PIXEL_DATA]
    placeholder = find_pixel_data(head, _dataset_offset(head)[0], implicit=False, little=True)
    assert placeholder is not None
    pad = b"" if span.undefined else b"\x00" * (span.length % 2)
    length = _UNDEFINED if span.undefined else span.length + len(pad)
    with open(out, "wb") as fh:
        fh.write(head[: placeholder.start])
        fh.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, vr.encode(), 0, length))
        for chunk in _chunks(path, span, swap):
            fh.write(chunk)
        fh.write(_SEQUENCE_DELIMITER if span.undefined else pad)
        fh.write(head[placeholder.end :])


def _read_back(out: Path) -> str:
    """The written file parses (header) and its pixel data's SHA-256, read from disk."""
    with open(out, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        span = find_pixel_data(buf, _dataset_offset(buf)[0], implicit=False, little=True)
        if span is None:
            raise AssertionError("normalized output lost its pixel data")
        pydicom.dcmread(io.BytesIO(buf[: span.start] + buf[span.end :]))
    return _sha256(_chunks(out, span, swap=False))
