"""Radiology reports as the RIS sends them: HL7 v2 ORU^R01, parsed with
python-hl7, legacy quirks included (escape sequences, repeated OBX lines,
line breaks as ``~`` or ``\\.br\\``, a PDF in OBX-5 as base64, the
character set of MSH-18, ``\\n`` or ``\\r\\n`` between segments).

What cannot be read is a :class:`ParseError` naming the segment
(``HL7_PARSE_ERROR:<segment>``); the message itself is kept, never dropped.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
from dataclasses import dataclass, field
from enum import Enum

import hl7

from ..reasons import ReasonCode

# HL7 table 0211 (MSH-18) -> Python codec. Empty: the site's default.
CHARSETS = {
    "ASCII": "ascii",
    "8859/1": "iso8859-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "ISO IR87": "iso2022_jp",
    "ISO IR14": "shift_jis",
    "GB 18030-2000": "gb18030",
    "KS X 1001": "euc_kr",
    "BIG-5": "big5",
    "UNICODE": "utf-8",
    "UNICODE UTF-8": "utf-8",
    "UNICODE UTF-16": "utf-16",
}
ACCESSION_FIELDS = ("OBR-2", "OBR-3", "OBR-18", "OBR-19", "OBR-20")
TEXT_TYPES = frozenset({"TX", "FT", "ST"})
_MSH18 = re.compile(rb"^MSH(.)")


class ReportStatus(str, Enum):
    """OBR-25 (HL7 table 0123) as the report's standing: an amendment (C)
    supersedes what came before, never overwrites it."""

    PRELIMINARY = "P"
    FINAL = "F"
    CORRECTED = "C"

    @property
    def label(self) -> str:
        return {"P": "preliminary", "F": "final", "C": "amended"}[self.value]


class ParseError(ValueError):
    """The message cannot be read as a report; ``segment`` names where."""

    def __init__(self, segment: str, why: str) -> None:
        super().__init__(f"{segment}: {why}")
        self.segment, self.why = segment, why

    @property
    def reason(self) -> str:
        return f"{ReasonCode.HL7_PARSE_ERROR.value}:{self.segment}"


@dataclass(frozen=True)
class Person:
    """An HL7 XCN/CNN person: id, family and given names (DICOM PN built from them)."""

    id: str = ""
    family: str = ""
    given: str = ""

    @property
    def dicom_name(self) -> str:
        return f"{self.family}^{self.given}".rstrip("^")


@dataclass(frozen=True)
class Report:
    """One radiology report, as read from one ORU^R01 message."""

    control_id: str
    sent_at: dt.datetime | None
    patient_id: str
    issuer: str
    accession: str
    status: ReportStatus
    observed_at: dt.datetime  # OBR-7: the examination's date and time
    reported_at: dt.datetime | None  # OBR-22: when the report got its status
    procedure: str
    interpreter: Person | None  # OBR-32: the principal result interpreter (the verifying radiologist)
    text: str = ""
    pdf: bytes | None = field(default=None, repr=False)
    charset: str = "ascii"


def split_messages(data: bytes) -> list[bytes]:
    """The messages of an export file: one or many (batch headers ignored);
    segments end in ``\\r``, ``\\n`` or ``\\r\\n`` (exports differ)."""
    lines = [ln for ln in re.split(rb"\r\n|\r|\n", data) if ln.strip()]
    out: list[list[bytes]] = []
    for line in lines:
        if line[:3] in (b"FHS", b"BHS", b"BTS", b"FTS"):
            continue
        if line.startswith(b"MSH") or not out:
            out.append([])
        out[-1].append(line)
    return [b"\r".join(seg) + b"\r" for seg in out]


def charset_of(raw: bytes, default: str = "8859/1") -> str:
    """The message's Python codec, from MSH-18 (read as bytes: MSH is ASCII)."""
    first = re.split(rb"\r|\n", raw, maxsplit=1)[0]
    m = _MSH18.match(first)
    if m is None:
        raise ParseError("MSH", "the message does not begin with MSH")
    fields = first.split(m.group(1))
    declared = fields[17].split(b"^")[0].strip().decode("ascii", "replace") if len(fields) > 17 else ""
    name = declared or default
    if name not in CHARSETS:
        raise ParseError("MSH", f"MSH-18 character set {name!r} is not supported")
    return CHARSETS[name]


def parse_report(raw: bytes, accession_field: str = "OBR-3", default_charset: str = "8859/1") -> Report:
    """Read one ORU^R01 message.

    Raises
    ------
    ParseError
        Naming the segment at fault (never quoting patient data).
    """
    codec = charset_of(raw, default_charset)
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError:
        raise ParseError("MSH", f"the bytes are not {codec} as MSH-18 declares") from None
    text = re.sub(r"\r\n|\n", "\r", text)
    try:
        msg = hl7.parse(text)
    except Exception as exc:  # python-hl7 raises several types on broken framing
        raise ParseError("MSH", f"unreadable ({type(exc).__name__})") from None
    if (_get(msg, "MSH.F9.R1.C1"), _get(msg, "MSH.F9.R1.C2")) != ("ORU", "R01"):
        raise ParseError("MSH", "MSH-9 is not ORU^R01")
    for seg in ("PID", "OBR", "OBX"):
        if not _has(msg, seg):
            raise ParseError(seg, "segment missing")
    patient_id = _get(msg, "PID.F3.R1.C1")
    if not patient_id:
        raise ParseError("PID", "PID-3 has no patient identifier")
    seg, num = accession_field.split("-")
    accession = _get(msg, f"{seg}.F{num}.R1.C1")
    if not accession:
        raise ParseError("OBR", f"{accession_field} has no accession number")
    observed = parse_dtm(_get(msg, "OBR.F7"))
    if observed is None:
        raise ParseError("OBR", "OBR-7 has no observation date")
    status_code = _get(msg, "OBR.F25") or _get(msg, "OBX.F11")
    try:
        status = ReportStatus(status_code)
    except ValueError:
        raise ParseError("OBR", "OBR-25 result status is not P, F or C") from None
    body, pdf = _observations(msg)
    return Report(
        control_id=_get(msg, "MSH.F10"),
        sent_at=parse_dtm(_get(msg, "MSH.F7")),
        patient_id=msg.unescape(patient_id),
        issuer=msg.unescape(_get(msg, "PID.F3.R1.C4")),
        accession=msg.unescape(accession),
        status=status,
        observed_at=observed,
        reported_at=parse_dtm(_get(msg, "OBR.F22")),
        procedure=msg.unescape(_get(msg, "OBR.F4.R1.C2") or _get(msg, "OBR.F4.R1.C1")),
        interpreter=_person(msg, "OBR", 32),
        text=body,
        pdf=pdf,
        charset=codec,
    )


def _observations(msg: hl7.Message) -> tuple[str, bytes | None]:
    """The report's text (OBX lines in order, each repetition a line) and its PDF, if any."""
    lines: list[str] = []
    pdf = None
    for obx in msg.segments("OBX"):
        kind = str(obx[2]).strip()
        if kind in TEXT_TYPES:
            for rep in obx[5] if len(obx) > 5 else []:
                lines.append(msg.unescape(str(rep)).replace("\r", "\n"))
        elif kind == "ED":
            pdf = _pdf(obx)
    text = "\n".join(lines).strip("\n")
    if not text and pdf is None:
        raise ParseError("OBX", "no text (TX, FT, ST) nor PDF (ED) observation")
    return text, pdf


def _pdf(obx: hl7.Segment) -> bytes:
    """OBX-5 as ED: source^type^subtype^encoding^data, e.g. ^application^pdf^Base64^JVBERi0..."""
    try:
        parts = [str(c) for c in obx[5][0]]
    except (IndexError, TypeError):
        raise ParseError("OBX", "ED observation without data") from None
    if len(parts) < 5 or parts[2].lower() != "pdf" or parts[3].lower() != "base64":
        raise ParseError("OBX", "ED observation is not a base64 PDF")
    try:
        data = base64.b64decode(parts[4].replace("\\", ""), validate=False)
    except (binascii.Error, ValueError):
        raise ParseError("OBX", "ED observation's base64 is broken") from None
    if not data.startswith(b"%PDF-"):
        raise ParseError("OBX", "ED observation is not a PDF document")
    return data


def _person(msg: hl7.Message, segment: str, number: int) -> Person | None:
    """An XCN (id^family^given) or, in OBR-32, a CNN in subcomponents (id&family&given)."""
    try:
        value = str(msg.segment(segment)[number]) if len(msg.segment(segment)) > number else ""
    except (KeyError, IndexError):
        return None
    first = value.split(msg.separators[2])[0]  # the first repetition
    comp, sub = msg.separators[3], msg.separators[4]
    parts = first.split(sub) if sub in first else first.split(comp)
    ident, family, given = [*parts, "", "", ""][:3]
    if not (ident or family):
        return None
    return Person(msg.unescape(ident), msg.unescape(family), msg.unescape(given))


def parse_dtm(value: str) -> dt.datetime | None:
    """HL7 DTM (YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ]) as a naive local datetime; None if absent or broken."""
    m = re.match(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?", value.strip())
    if m is None:
        return None
    y, mo, d, h, mi, s = (int(g) if g else None for g in m.groups())
    try:
        return dt.datetime(y or 1, mo or 1, d or 1, h or 0, mi or 0, s or 0)
    except ValueError:
        return None


def _get(msg: hl7.Message, path: str) -> str:
    try:
        return str(msg[path]).strip()
    except (IndexError, KeyError, ValueError, TypeError):
        return ""


def _has(msg: hl7.Message, segment: str) -> bool:
    try:
        msg.segment(segment)
    except KeyError:
        return False
    return True
