"""``trace <SOPInstanceUID>``: where one instance came from, what was done to
it, where it is now, and whether its partition passed validation.

Reads only the bucket's manifests and lineage records. Scans the transfer
manifests (narrowed by ``study_date`` when given); a catalogue index would make
this O(1) on very large archives.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pandas as pd

from .manifest import PartitionManifests, transferred_partitions
from .rollback import Selection
from .store import ObjectStore
from .study_index import read_header


class NotFound(LookupError):
    pass


def _changes(store: ObjectStore, row: dict[str, Any], label: str) -> list[dict[str, Any]]:
    """Structural changes from the manifest; attribute changes with their old
    value from the stored object's Original Attributes Sequence."""
    out: list[dict[str, Any]] = []
    rule_of: dict[str, str] = {}
    for change in (row.get("changes") or "").split(";"):
        if not change:
            continue
        what, _, detail = change.partition(":")
        if what == "rule":
            rule_id, _, keyword = detail.partition(":")
            rule_of[keyword] = rule_id
            continue
        old, sep, new = detail.partition("->")
        out.append(
            {
                "rule_set": label,
                "rule": "structural",
                "change": what,
                "old": old if sep else None,
                "new": new if sep else detail or None,
            }
        )
    if rule_of and row.get("object_key"):
        ds, _ = read_header(store, row["object_key"])  # ranged reads: the header, whatever the object's size
        for item in ds.get("OriginalAttributesSequence", []) or []:
            for modified in item.get("ModifiedAttributesSequence", []) or []:
                for elem in modified:
                    kw = elem.keyword or str(elem.tag)
                    if kw not in rule_of:
                        continue  # recorded by an earlier system, not by us
                    new = ds.get(elem.tag)
                    out.append(
                        {
                            "rule_set": label,
                            "rule": rule_of[kw],
                            "change": kw,
                            "reason": str(item.get("ReasonForTheAttributeModification", "")),
                            "old": None if elem.value in (None, "") else str(elem.value),
                            "new": None if new is None else str(new.value),
                        }
                    )
    return out


def _row(hit: pd.DataFrame) -> dict[str, Any]:
    return {k: (None if pd.isna(v) else v) for k, v in hit.iloc[0].to_dict().items()}


def _ruleset(lineage: dict[str, Any] | None) -> str | None:
    rs = (lineage or {}).get("ruleset") or {}
    return f"{rs.get('id')}@{rs.get('version')}" if rs else None


def _migration(row: dict[str, Any], lineage: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "event": row["state"],  # migrated, quarantined or unresolved
        "run_id": row.get("run_id"),
        "at": (lineage or {}).get("recorded_at"),
        "ruleset": _ruleset(lineage),
        "key": row.get("object_key") or row.get("quarantine_key"),
        "sha256": row.get("object_sha256"),
        "reason": row.get("reason"),
    }


def instance_history(
    manifests: PartitionManifests, sop_instance_uid: str, live: dict[str, Any] | None
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Every migration of the instance (with its run's rule set), every
    rollback that took it out (who, when, why, where its copy is), oldest
    first; and its row as the last rollback found it."""
    events: list[dict[str, Any]] = []
    seen: set[tuple[Any, Any]] = set()
    last = None

    def migrated(row: dict[str, Any], lineage: dict[str, Any] | None) -> None:
        mark = (row.get("run_id"), row.get("object_sha256") or row.get("quarantine_key"))
        if mark not in seen:
            seen.add(mark)
            events.append(_migration(row, lineage))

    for rec in manifests.rollback_records():
        rid, snap = rec["rollback_id"], manifests.rolled_back_transfer(rec["rollback_id"])
        hit = None if snap is None else snap[snap["sop_instance_uid"] == sop_instance_uid]
        if hit is None or hit.empty:
            continue
        last = row = _row(hit)
        run_lineage = manifests.lineage_run_key(str(row.get("run_id")))
        migrated(row, manifests.read_key_json(manifests.rolled_back_copy(rid, run_lineage)))
        if Selection.from_json(rec["selection"]).mask(manifests.partition, hit).iloc[0]:
            key = row.get("object_key") or row.get("quarantine_key")
            events.append(
                {
                    "event": "rolled_back",
                    "rollback_id": rid,
                    "at": rec.get("rolled_back_at"),
                    "by": rec.get("requested_by"),
                    "reason": rec.get("reason"),
                    "key": manifests.rolled_back_copy(rid, key) if key else None,
                    "sha256": row.get("object_sha256"),
                }
            )
    if live is not None:
        migrated(live, manifests.read_key_json(manifests.lineage_run_key(str(live.get("run_id")))))
    return events, last


def trace_instance(store: ObjectStore, sop_instance_uid: str, study_date: dt.date | None = None) -> dict[str, Any]:
    """The instance's story, as a JSON-able dict, with its ``history``
    (migrations, rollbacks, re-migrations). An instance rolled back and not
    migrated again is found too (state ``rolled_back``).

    Raises
    ------
    NotFound
        If no transfer manifest, live or rolled back, holds the SOP Instance UID.
    """
    for p in transferred_partitions(store, study_date, rolled_back=True):
        manifests = PartitionManifests(store, p)
        df = manifests.transfer_or_none()
        hit = None if df is None else df[df["sop_instance_uid"] == sop_instance_uid]
        live = None if hit is None or hit.empty else _row(hit)
        history, last = instance_history(manifests, sop_instance_uid, live)
        if live is None and last is None:
            continue
        row = live or {**(last or {}), "state": "rolled_back", "reason": history[-1].get("rollback_id")}
        lineage = manifests.read_key_json(manifests.lineage_run_key(str(row.get("run_id")))) or {}
        validation = manifests.latest_verdict() or {}
        changes = _changes(store, row, _ruleset(lineage) or "?@?") if live else []
        return {
            "sop_instance_uid": sop_instance_uid,
            "partition": p.key,
            "state": row["state"],
            "reason": row.get("reason"),
            "run_id": row.get("run_id"),
            "source": lineage.get("source"),
            "census_sha256": lineage.get("census_sha256"),
            "study_instance_uid": row.get("study_instance_uid"),
            "series_instance_uid": row.get("series_instance_uid"),
            "patient_key": row.get("patient_key"),  # keyed (privacy.py): for the audit record of this lookup
            "received": {
                "sha256": row.get("received_sha256"),
                "bytes": row.get("received_size"),
                "transfer_syntax": row.get("transfer_syntax_in"),
            },
            "rules_applied": changes,
            "pixel_data_sha256": {"before": row.get("pixel_sha256_before"), "after": row.get("pixel_sha256_after")},
            "target": {
                "bucket": store.bucket,
                "key": row.get("object_key") if live else None,
                "sha256": row.get("object_sha256"),
                "bytes": row.get("object_size"),
                "transfer_syntax": row.get("transfer_syntax_out"),
                "load_action": row.get("load_action"),
                "quarantine_key": row.get("quarantine_key") if live else None,
            },
            "validation": {
                "success": validation.get("success"),
                "run_id": validation.get("run_id"),
                "failed_expectations": validation.get("failed_expectations", []),
            },
            "history": history,
        }
    raise NotFound(f"SOP Instance UID {sop_instance_uid} is in no transfer manifest of s3://{store.bucket}")


def render_trace(t: dict[str, Any]) -> str:
    """Human-readable form of :func:`trace_instance`'s answer."""
    src = t.get("source") or {}
    lines = [
        f"SOP Instance UID  {t['sop_instance_uid']}",
        f"state             {t['state']}" + (f" ({t['reason']})" if t.get("reason") else ""),
        f"partition         {t['partition']}   run {t['run_id']}",
        f"source            {src.get('uri')}  as {src.get('calling_ae_title')} via {src.get('retrieve_method')}",
        f"                  query {json.dumps(src.get('query'))}",
        f"study / series    {t['study_instance_uid']} / {t['series_instance_uid']}",
        f"received          {t['received']['bytes']} bytes, sha256 {t['received']['sha256']}, "
        f"transfer syntax {t['received']['transfer_syntax']}",
    ]
    if t["rules_applied"]:
        for c in t["rules_applied"]:
            lines.append(f"rule              {c['rule_set']} {c['rule']} {c['change']}: {c['old']} -> {c['new']}")
    else:
        lines.append("rule              none changed it (stored byte for byte as received)")
    px = t["pixel_data_sha256"]
    lines.append(f"pixel data        sha256 before {px['before']}  after {px['after']}")
    tg = t["target"]
    if tg["key"]:
        lines.append(f"target            s3://{tg['bucket']}/{tg['key']}")
        detail = f"{tg['bytes']} bytes, sha256 {tg['sha256']}, {tg['transfer_syntax']}, {tg['load_action']}"
        lines.append(f"                  {detail}")
    if tg["quarantine_key"]:
        lines.append(f"quarantined at    s3://{tg['bucket']}/{tg['quarantine_key']}")
    v = t["validation"]
    verdict = "passed" if v["success"] else f"FAILED {', '.join(v['failed_expectations'])}"
    lines.append(f"validation        partition {verdict} (run {v['run_id']})")
    for i, e in enumerate(t.get("history") or []):
        head = "history           " if i == 0 else "                  "
        if e["event"] == "rolled_back":
            lines.append(f"{head}{e['at']}  rolled back by {e['rollback_id']} ({e['by']}: {e['reason']})")
            lines.append(f"                    copy s3://{tg['bucket']}/{e['key']}")
        else:
            lines.append(f"{head}{e['at']}  {e['event']} by run {e['run_id']} under rule set {e['ruleset']}")
            if e.get("key"):
                lines.append(f"                    s3://{tg['bucket']}/{e['key']}  sha256 {e['sha256']}")
    return "\n".join(lines)
