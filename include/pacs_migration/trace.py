"""``trace <SOPInstanceUID>``: where one instance came from, what was done to
it, where it is now, and whether its partition passed validation.

Reads only the bucket's manifests and lineage records. Scans the transfer
manifests (narrowed by ``study_date`` when given); a catalogue index would make
this O(1) on very large archives.
"""

from __future__ import annotations

import datetime as dt
import io
import json
from typing import Any

import pandas as pd
import pydicom

from .manifest import PartitionManifests, transferred_partitions
from .partition import Partition
from .store import ObjectStore


class NotFound(LookupError):
    pass


def _partitions(store: ObjectStore, study_date: dt.date | None) -> list[Partition]:
    return transferred_partitions(store, study_date)


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
        ds = pydicom.dcmread(io.BytesIO(store.get(row["object_key"])), stop_before_pixels=True)
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


def trace_instance(store: ObjectStore, sop_instance_uid: str, study_date: dt.date | None = None) -> dict[str, Any]:
    """The instance's story, as a JSON-able dict.

    Raises
    ------
    NotFound
        If no transfer manifest holds the SOP Instance UID.
    """
    for p in _partitions(store, study_date):
        manifests = PartitionManifests(store, p)
        df = manifests.transfer()
        hit = df[df["sop_instance_uid"] == sop_instance_uid]
        if hit.empty:
            continue
        row = {k: (None if pd.isna(v) else v) for k, v in hit.iloc[0].to_dict().items()}
        lineage = manifests.lineage() or {}
        validation = manifests.latest_verdict() or {}
        rs = lineage.get("ruleset") or {}
        label = f"{rs.get('id')}@{rs.get('version')}"
        changes = _changes(store, row, label)
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
                "key": row.get("object_key"),
                "sha256": row.get("object_sha256"),
                "bytes": row.get("object_size"),
                "transfer_syntax": row.get("transfer_syntax_out"),
                "load_action": row.get("load_action"),
                "quarantine_key": row.get("quarantine_key"),
            },
            "validation": {
                "success": validation.get("success"),
                "run_id": validation.get("run_id"),
                "failed_expectations": validation.get("failed_expectations", []),
            },
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
    return "\n".join(lines)
