"""The append-only audit log in the bucket: ``_audit/chain/<seq>.json``,
write-once links, each holding a batch of audit messages and the SHA-256 of
the link before it. A removed, altered or reordered link breaks the chain;
a removed tail is caught by the head marker (``_audit/head.json``, the
highest link ever written), and, on a versioned bucket, an overwritten link
by its second version. :func:`verify` proves all of it."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import ClientError

from ..store import ObjectStore

log = logging.getLogger(__name__)

GENESIS = "0" * 64
MAX_APPEND_TRIES = 50  # links raced for by concurrent writers


def _prefix(store: ObjectStore) -> str:
    return f"{store.target.prefix}_audit/"


def link_key(store: ObjectStore, seq: int) -> str:
    return f"{_prefix(store)}chain/{seq:012d}.json"


def _head_key(store: ObjectStore) -> str:
    return f"{_prefix(store)}head.json"


@dataclass(frozen=True)
class Link:
    seq: int
    prev_sha256: str
    writer: str
    written_at: str
    messages: tuple[str, ...]
    sha256: str = ""  # of the stored bytes

    @classmethod
    def parse(cls, data: bytes) -> Link:
        doc = json.loads(data)
        return cls(
            int(doc["seq"]),
            str(doc["prev_sha256"]),
            str(doc["writer"]),
            str(doc["written_at"]),
            tuple(doc["messages"]),
            hashlib.sha256(data).hexdigest(),
        )


def _encode(seq: int, prev: str, writer: str, messages: list[bytes]) -> bytes:
    doc = {
        "seq": seq,
        "prev_sha256": prev,
        "writer": writer,
        "written_at": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
        "messages": [m.decode("utf-8") for m in messages],
    }
    return json.dumps(doc, sort_keys=True).encode()


def _tip(store: ObjectStore) -> tuple[int, str]:
    """The last link (seq, sha256): from the head marker, then forward while links exist."""
    head = store.get_or_none(_head_key(store))
    seq, sha = (json.loads(head)["seq"], json.loads(head)["sha256"]) if head else (0, GENESIS)
    while (data := store.get_or_none(link_key(store, seq + 1))) is not None:
        seq, sha = seq + 1, hashlib.sha256(data).hexdigest()
    return seq, sha


def append(store: ObjectStore, messages: list[bytes], writer: str) -> int:
    """Write ``messages`` as the next link; returns its sequence number."""
    for _ in range(MAX_APPEND_TRIES):
        seq, prev = _tip(store)
        data = _encode(seq + 1, prev, writer, messages)
        try:
            store.put(link_key(store, seq + 1), data, "application/json", condition={"IfNoneMatch": "*"})
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
                continue  # another writer took this place: chain after it
            raise
        _advance_head(store, seq + 1, hashlib.sha256(data).hexdigest())
        return seq + 1
    raise RuntimeError(f"audit log: no free link after {MAX_APPEND_TRIES} tries")


def _advance_head(store: ObjectStore, seq: int, sha: str) -> None:
    """The head marker only moves forward (a hint for writers, a tail check for verify)."""
    for _ in range(MAX_APPEND_TRIES):
        data, etag = store.get_versioned(_head_key(store))
        if data is not None and json.loads(data)["seq"] >= seq:
            return
        body = json.dumps({"seq": seq, "sha256": sha}).encode()
        if store.put_if_unchanged(_head_key(store), body, "application/json", etag, {}):
            return


def links(store: ObjectStore) -> Iterator[tuple[str, bytes]]:
    for key in sorted(store.list_keys(f"{_prefix(store)}chain/")):
        yield key, store.get(key)


@dataclass
class Verification:
    links: int = 0
    messages: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(store: ObjectStore, validate: Any = None) -> Verification:
    """Walk the chain from its first link; ``validate(xml) -> str | None``
    checks each message against the audit schema (None: not checked)."""
    out, prev, expected = Verification(), GENESIS, 1
    for key, data in links(store):
        try:
            link = Link.parse(data)
        except (ValueError, KeyError) as exc:
            out.problems.append(f"{key}: not a link ({type(exc).__name__})")
            prev, expected = hashlib.sha256(data).hexdigest(), expected + 1
            continue
        if key != link_key(store, link.seq) or link.seq != expected:
            out.problems.append(f"{key}: link {link.seq} where link {expected} belongs (removed or moved)")
        if link.prev_sha256 != prev:
            out.problems.append(f"{key}: does not chain to the link before it (altered, removed or inserted)")
        for i, xml in enumerate(link.messages):
            if validate is not None and (err := validate(xml.encode())):
                out.problems.append(f"{key}: message {i + 1} is not a valid DICOM audit message: {err}")
        out.links, out.messages = out.links + 1, out.messages + len(link.messages)
        prev, expected = link.sha256, link.seq + 1
    head = store.get_or_none(_head_key(store))
    if head is not None and json.loads(head)["seq"] > out.links:
        out.problems.append(f"head marker names link {json.loads(head)['seq']}, the chain ends at {out.links}")
    out.problems.extend(_overwritten(store))
    return out


def _overwritten(store: ObjectStore) -> list[str]:
    """On a versioned bucket: links with more than one version were overwritten."""
    paginator = store.client.get_paginator("list_object_versions")
    seen: dict[str, int] = {}
    try:
        for page in paginator.paginate(Bucket=store.bucket, Prefix=f"{_prefix(store)}chain/"):
            for v in page.get("Versions", []) + page.get("DeleteMarkers", []):
                if v.get("VersionId") not in (None, "null"):
                    seen[v["Key"]] = seen.get(v["Key"], 0) + 1
    except ClientError:
        return []  # not allowed to list versions: the chain alone decides
    return [f"{k}: {n} versions (overwritten or deleted)" for k, n in sorted(seen.items()) if n > 1]


def find(store: ObjectStore, object_ids: set[str]) -> list[dict[str, Any]]:
    """Every recorded event naming one of ``object_ids`` (a Study Instance UID,
    a patient key): when, what, the outcome, and who took part, from where."""
    from xml.etree import ElementTree as ET

    out = []
    for _key, data in links(store):
        link = Link.parse(data)
        for xml in link.messages:
            root = ET.fromstring(xml)
            named = {o.get("ParticipantObjectID") for o in root.iter("ParticipantObjectIdentification")}
            if not named & object_ids:
                continue
            ev = root.find("EventIdentification")
            assert ev is not None
            event, kind = ev.find("EventID"), ev.find("EventTypeCode")
            out.append(
                {
                    "at": ev.get("EventDateTime"),
                    "event": event.get("originalText") if event is not None else "?",
                    "type": kind.get("originalText") if kind is not None else None,
                    "action": ev.get("EventActionCode"),
                    "outcome": ev.get("EventOutcomeIndicator"),
                    "description": ev.findtext("EventOutcomeDescription"),
                    "participants": [_who(p) for p in root.iter("ActiveParticipant")],
                    "link": link.seq,
                }
            )
    return sorted(out, key=lambda r: str(r["at"]))


def _who(p: Any) -> str:
    role = p.find("RoleIDCode")
    where = p.get("NetworkAccessPointID")
    text = p.get("UserID", "?") + (f" [{role.get('originalText')}]" if role is not None else "")
    return text + (f" at {where}" if where else "") + (" (requestor)" if p.get("UserIsRequestor") == "true" else "")


def schema_validator() -> Any:
    """``validate(xml) -> error | None`` against the DICOM audit message schema."""
    from pathlib import Path

    from lxml import etree

    schema = etree.RelaxNG(etree.parse(str(Path(__file__).with_name("audit_message.rng"))))

    def validate(xml: bytes) -> str | None:
        try:
            doc = etree.fromstring(xml)
        except etree.XMLSyntaxError as exc:
            return f"not XML ({exc.msg})"
        return None if schema.validate(doc) else str(schema.error_log.last_error)

    return validate
