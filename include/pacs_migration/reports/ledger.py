"""The one owner of a study date's report keys.

- ``_reports/inbox/date=YYYY-MM-DD/<sha256>.hl7``: each RIS message as it
  arrived (export folder or MLLP), keyed by its hash, write-once. It holds
  patient data: its own prefix, which only the writer and the DICOMweb
  principals reach. A message that cannot be dated is filed under the day
  it arrived.
- ``_reports/date=YYYY-MM-DD/ledger.parquet`` (and ``ledger-run=<id>.parquet``):
  one row per message of the date, what became of it, no patient data.
- ``_reports/date=YYYY-MM-DD/verdict.json``: the last validation, with its run.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
from typing import Any

import pandas as pd

from ..store import ObjectStore

REPORTS = "_reports/"
HL7_TYPE = "x-application/hl7-v2+er7"
# The ledger's columns: one row per message (no patient data: UIDs, codes, hashes).
COLUMNS = (
    "message_sha256",
    "inbox_key",
    "control_id_sha256",  # MSH-10 may carry an order number: hashed
    "status",  # P, F, C (OBR-25); None when unreadable
    "state",  # ReportState
    "reason",
    "study_instance_uid",
    "patient_key",  # the study's patient, keyed (privacy.py): never the ID itself
    "sr_sop_instance_uid",
    "sr_key",
    "sr_sha256",
    "pdf_sop_instance_uid",
    "pdf_key",
    "pdf_sha256",
    "supersedes",  # the SOP Instance UID this report's SR supersedes
    "superseded_by",
    "load_action",  # created | already_present
    "run_id",
)


OBJECT_COLUMNS = ("study_instance_uid", "object_key", "object_sha256", "run_id", "state")


class ReportLedger:
    """Keys and records of one study date's reports (see the module)."""

    def __init__(self, store: ObjectStore, study_date: dt.date) -> None:
        self.store, self.study_date = store, study_date

    @property
    def base(self) -> str:
        return f"{self.store.target.prefix}{REPORTS}"

    @property
    def inbox_prefix(self) -> str:
        return f"{self.base}inbox/date={self.study_date.isoformat()}/"

    def inbox_key(self, message_sha256: str) -> str:
        return f"{self.inbox_prefix}{message_sha256}.hl7"

    @property
    def prefix(self) -> str:
        return f"{self.base}date={self.study_date.isoformat()}/"

    def key(self, name: str) -> str:
        return self.prefix + name

    # --- the inbox

    def receive(self, raw: bytes) -> tuple[str, bool]:
        """Keep one message as it arrived, write-once: (its key, whether it was new)."""
        digest = hashlib.sha256(raw).hexdigest()
        put = self.store.put_verified(self.inbox_key(digest), raw, digest, content_type=HL7_TYPE)
        return self.inbox_key(digest), put.outcome.value == "created"

    def messages(self) -> list[tuple[str, str, bytes]]:
        """(key, sha256, bytes) of every message of the date, in key order."""
        out = []
        for key in sorted(self.store.list_keys(self.inbox_prefix)):
            if key.endswith(".hl7"):
                out.append((key, key.rsplit("/", 1)[1][: -len(".hl7")], self.store.get(key)))
        return out

    # --- the ledger and its verdict

    def write(self, rows: list[dict[str, Any]], run_id: str) -> str:
        df = frame(rows)
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        data = buf.getvalue()
        self.store.put(self.key(f"ledger-run={run_id}.parquet"), data, "application/vnd.apache.parquet")
        self.store.put(self.key("ledger.parquet"), data, "application/vnd.apache.parquet")
        return self.key("ledger.parquet")

    def write_rolled_back(self, rows: list[dict[str, Any]]) -> str:
        """The ledger after a rollback took some of its reports out (no run copy: no run wrote it)."""
        buf = io.BytesIO()
        frame(rows).to_parquet(buf, index=False)
        self.store.put(self.key("ledger.parquet"), buf.getvalue(), "application/vnd.apache.parquet")
        return self.key("ledger.parquet")

    def read(self) -> pd.DataFrame | None:
        data = self.store.get_or_none(self.key("ledger.parquet"))
        return None if data is None else pd.read_parquet(io.BytesIO(data))

    def objects(self, df: pd.DataFrame | None = None) -> pd.DataFrame:
        """The stored report objects of the date (of ``df``, the ledger just read, or as
        stored) as transfer-like rows (the study index reads them)."""
        rows = []
        df = self.read() if df is None else df
        for r in [] if df is None else df[df["state"] == "migrated"].to_dict("records"):
            for kind in ("sr", "pdf"):
                if isinstance(r.get(f"{kind}_key"), str):
                    rows.append(
                        {
                            "study_instance_uid": r["study_instance_uid"],
                            "object_key": r[f"{kind}_key"],
                            "object_sha256": r[f"{kind}_sha256"],
                            "run_id": r["run_id"],
                            "state": "migrated",
                        }
                    )
        return pd.DataFrame(rows, columns=list(OBJECT_COLUMNS))

    def write_verdict(self, verdict: dict[str, Any], run_id: str) -> str:
        body = json.dumps({**verdict, "run_id": run_id}, indent=2, sort_keys=True, default=str).encode()
        self.store.put(self.key("verdict.json"), body, "application/json")
        return self.key("verdict.json")

    def verdict(self, run_id: str | None = None) -> dict[str, Any] | None:
        """The last verdict; with ``run_id``, only if that run reached it."""
        data = self.store.get_or_none(self.key("verdict.json"))
        value = None if data is None else json.loads(data)
        return value if value is None or run_id is None or value.get("run_id") == run_id else None


def frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame([{c: r.get(c) for c in COLUMNS} for r in rows], columns=list(COLUMNS)).astype(object)


def report_dates(store: ObjectStore) -> list[dt.date]:
    """Dates with messages in the inbox."""
    base = f"{store.target.prefix}{REPORTS}inbox/"
    found = set()
    for key in store.list_keys(base):
        head = key[len(base) :].split("/", 1)[0]
        if head.startswith("date="):
            found.add(dt.date.fromisoformat(head[5:]))
    return sorted(found)


def reports_failed(store: ObjectStore, dates: set[dt.date], run_id: str) -> list[str]:
    """``reports <date>`` for each date whose reports this run validated and failed."""
    out = []
    for day in sorted(dates):
        verdict = ReportLedger(store, day).verdict(run_id)
        if verdict is not None and not verdict.get("success"):
            out.append(f"reports {day.isoformat()}")
    return out


def ledger_dates(store: ObjectStore) -> list[dt.date]:
    """Dates with a report ledger."""
    base = f"{store.target.prefix}{REPORTS}"
    return sorted(
        dt.date.fromisoformat(k[len(base) + 5 :].split("/", 1)[0])
        for k in store.list_keys(base + "date=")
        if k.endswith("/ledger.parquet")
    )
