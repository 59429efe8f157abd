"""Messages in: from the RIS's export folder (read only) or one by one from
the MLLP listener. Each is kept as it arrived in the inbox of its study date
(OBR-7; MSH-7 when the message cannot be read; the day it arrived when not
even that), before anything else is done with it."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from ..store import ObjectStore
from .hl7 import ParseError, Report, parse_dtm, parse_report, split_messages
from .ledger import REPORTS, ReportLedger

log = logging.getLogger(__name__)

EXTENSIONS = (".hl7", ".txt", ".er7", ".msg", "")  # what RIS exports are called


@dataclass(frozen=True)
class Received:
    key: str
    study_date: dt.date
    new: bool
    report: Report | None
    error: ParseError | None


def _msh7(raw: bytes) -> dt.datetime | None:
    first = re.split(rb"\r|\n", raw, maxsplit=1)[0]
    if not first.startswith(b"MSH") or len(first) < 4:
        return None
    fields = first.split(first[3:4])
    return parse_dtm(fields[6].decode("ascii", "replace")) if len(fields) > 6 else None


def receive(
    store: ObjectStore, raw: bytes, accession_field: str, default_charset: str, today: dt.date | None = None
) -> Received:
    """Keep one message in its date's inbox (write-once); what it says, or why it cannot be read."""
    report, error = None, None
    try:
        report = parse_report(raw, accession_field, default_charset)
        day = report.observed_at.date()
    except ParseError as exc:
        error = exc
        sent = _msh7(raw)
        day = sent.date() if sent else (today or dt.datetime.now(dt.UTC).date())
    key, new = ReportLedger(store, day).receive(raw)
    return Received(key, day, new, report, error)


@dataclass(frozen=True)
class FolderIntake:
    files: int  # files read this time
    skipped: int  # files read before, unchanged since
    messages: int
    new: int  # messages not in the inbox before
    unreadable: int  # kept, but not readable as a report (HL7_PARSE_ERROR)
    dates: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        return {**self.__dict__, "dates": list(self.dates)}


def _record_key(store: ObjectStore) -> str:
    return f"{store.target.prefix}{REPORTS}intake/files.json"


def import_folder(
    store: ObjectStore, folder: Path, accession_field: str, default_charset: str, max_bytes: int = 64 << 20
) -> FolderIntake:
    """Read every export file not read before (by name, size and mtime: a file
    the RIS rewrites is read again; the inbox keeps each message once). Names
    are recorded hashed: a RIS may name a file after an accession number."""
    if not folder.is_dir():
        raise FileNotFoundError(f"reports.export_dir {folder}: not a folder")
    record_key = _record_key(store)
    seen: dict[str, str] = json.loads(store.get_or_none(record_key) or b"{}")
    files = skipped = messages = new = unreadable = 0
    dates: set[str] = set()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS):
        st = path.stat()
        ident = hashlib.sha256(str(path.relative_to(folder)).encode()).hexdigest()
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
        if seen.get(ident) == stamp:
            skipped += 1
            continue
        if st.st_size > max_bytes:
            log.warning("reports: an export file of %d bytes is over the limit (%d); not read", st.st_size, max_bytes)
            continue
        files += 1
        for raw in split_messages(path.read_bytes()):
            got = receive(store, raw, accession_field, default_charset, dt.date.fromtimestamp(st.st_mtime))
            messages, new, unreadable = messages + 1, new + got.new, unreadable + (got.error is not None)
            dates.add(got.study_date.isoformat())
        seen[ident] = stamp
    store.put(record_key, json.dumps(seen, sort_keys=True).encode(), "application/json")
    log.info("reports: %d export file(s) read, %d message(s), %d new, %d unreadable", files, messages, new, unreadable)
    return FolderIntake(files, skipped, messages, new, unreadable, tuple(sorted(dates)))


@dataclass(frozen=True)
class DateReports:
    """What the RIS holds for a date, and what migration runs made of it so far."""

    messages: int
    accessions: frozenset[str]
    migrated: int = 0
    unmatched: int = 0


def accessions_of_date(
    store: ObjectStore, study_date: dt.date, accession_field: str, default_charset: str
) -> DateReports:
    """The inbox's messages of a date: how many, the accession numbers of those that read as
    reports, and the date's ledger counts (a date not migrated yet has none)."""
    from .place import ReportCounts

    found: set[str] = set()
    messages = ReportLedger(store, study_date).messages()
    for _key, _sha, raw in messages:
        try:
            found.add(parse_report(raw, accession_field, default_charset).accession)
        except ParseError:
            continue
    c = ReportCounts.of(ReportLedger(store, study_date).read())
    return DateReports(len(messages), frozenset(found), c.migrated, c.unmatched)
