"""The federated fallback: what is not migrated yet is still found (C-FIND)
and still opens (C-GET on demand) on the legacy PACS, through the same client
code as the migration, within ``dicomweb.legacy_associations`` concurrent
associations. Retrieved objects stay in memory (a bounded cache that a
viewer's metadata and frame requests share) and are never written to the
archive or to disk."""

from __future__ import annotations

import io
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from ..config import SourceConfig
from ..dimse.association import DicomNetworkError, QueryFailed
from ..dimse.find import find
from ..dimse.get import c_get, likely_storage_classes
from .qido import RETURNED, Level, QidoQuery

# The C-FIND return keys per level: what a QIDO answer returns (InstanceAvailability is ours to say).
FIND_KEYS = {level: tuple(k for k in keys if k != "InstanceAvailability") for level, keys in RETURNED.items()}
# Matching keys a legacy PACS is expected to support (PS3.4 C.6.2.1.2 required/unique keys, and common optional ones).
LEGACY_MATCHING = frozenset(
    {
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "PatientName",
        "PatientID",
        "StudyID",
        "ModalitiesInStudy",
        "Modality",
        "SeriesNumber",
        "InstanceNumber",
        "StudyDescription",
    }
)


class LegacyUnavailable(RuntimeError):
    """The legacy PACS did not answer (the search says so; a retrieve fails with 502)."""


@dataclass(frozen=True)
class LegacyObject:
    """One instance as the legacy PACS sent it: Part 10 bytes (its dataset as sent, our file meta)."""

    sop_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    data: bytes


class _MemorySink:
    """C-GET's storage handler, in memory: nothing of a legacy study touches disk."""

    def __init__(self, limit_bytes: int) -> None:
        self.objects: list[LegacyObject] = []
        self.size, self.limit = 0, limit_bytes

    def store_stream(
        self, sop_instance_uid: str, sop_class_uid: str, transfer_syntax: str, chunks: Iterable[bytes | memoryview]
    ) -> int:
        """C-GET's store of one instance (:class:`..dimse.get.StoreSink`): held
        in memory up to the fallback's limit; every chunk is taken either way."""
        parts, size = [], 0
        for chunk in chunks:
            size += len(chunk)
            if self.size + size <= self.limit:
                parts.append(bytes(chunk))
        if self.size + size > self.limit:
            return 0xA700  # out of resources: the study is larger than the fallback may hold
        data = b"".join(parts)
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        series = str(ds.get("SeriesInstanceUID", ""))
        self.objects.append(LegacyObject(sop_instance_uid, series, sop_class_uid, data))
        self.size += size
        return 0x0000


class _Cache:
    """Recently retrieved legacy series, bounded in bytes and age (LRU)."""

    def __init__(self, max_bytes: int, ttl: float) -> None:
        self.max_bytes, self.ttl = max_bytes, ttl
        self._items: OrderedDict[tuple[str, ...], tuple[float, list[LegacyObject]]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, ...]) -> list[LegacyObject] | None:
        with self._lock:
            hit = self._items.get(key)
            if hit is None or time.monotonic() - hit[0] > self.ttl:
                self._items.pop(key, None)
                return None
            self._items.move_to_end(key)
            return hit[1]

    def put(self, key: tuple[str, ...], objects: list[LegacyObject]) -> None:
        with self._lock:
            self._items[key] = (time.monotonic(), objects)
            while sum(len(o.data) for _, objs in self._items.values() for o in objs) > self.max_bytes and self._items:
                self._items.popitem(last=False)


def find_identifier(query: QidoQuery) -> Dataset:
    """The C-FIND identifier of a QIDO query: every key QIDO returns asked
    empty (None: an empty value of any VR, US included), the matches the
    legacy PACS can be trusted with filled in."""
    ds = Dataset()
    ds.QueryRetrieveLevel = query.level.value
    for kw in FIND_KEYS[query.level]:
        setattr(ds, kw, None)
    for kw, value in query.matches.items():
        if kw in LEGACY_MATCHING and value not in ("", "*"):
            setattr(ds, kw, value.replace(",", "\\") if kw.endswith("UID") else value)
    return ds


class LegacyArchive:
    """The legacy PACS as the DICOMweb service sees it."""

    def __init__(
        self,
        source: SourceConfig,
        associations: int = 1,
        max_study_bytes: int = 2 << 30,
        cache_bytes: int = 512 << 20,
        cache_seconds: float = 300.0,
    ) -> None:
        self.source = source
        self.ae_title = source.called_ae_title
        self._slots = threading.BoundedSemaphore(associations)
        self.max_study_bytes = max_study_bytes
        self._cache = _Cache(cache_bytes, cache_seconds)
        self._stripes = [threading.Lock() for _ in range(64)]  # one C-GET per series at a time, in bounded memory
        self.retrieves = 0  # C-GETs sent (what the cache saved shows against the requests)

    # -- search ------------------------------------------------------------------

    def search(self, query: QidoQuery) -> list[dict[str, Any]]:
        """The legacy PACS's answers to a QIDO query, as rows keyed by keyword.

        Raises
        ------
        LegacyUnavailable
            When no association could be made or the PACS failed the query.
        """
        try:
            with self._slots:
                answers = find(self.source, find_identifier(query))
        except (DicomNetworkError, QueryFailed, OSError) as exc:
            raise LegacyUnavailable(f"legacy PACS {self.ae_title}: {type(exc).__name__}") from None
        return [{kw: _value(a, kw) for kw in FIND_KEYS[query.level]} for a in answers]

    # -- retrieve ----------------------------------------------------------------

    def retrieve(self, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None) -> list[LegacyObject]:
        """The objects of a study, series or instance, by C-GET (a series is
        fetched whole and cached: a viewer asks for its frames one by one)."""
        if sop_uid is not None and series_uid is not None:
            return [o for o in self.retrieve(study_uid, series_uid) if o.sop_instance_uid == sop_uid]
        key = (study_uid,) if series_uid is None else (study_uid, series_uid)
        with self._stripes[hash(key) % len(self._stripes)]:  # one C-GET per series however many requests wait for it
            cached = self._cache.get(key)
            if cached is not None:
                return cached
            objects = self._get(study_uid, series_uid)
            self._cache.put(key, objects)
            return objects

    def _get(self, study_uid: str, series_uid: str | None) -> list[LegacyObject]:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY" if series_uid is None else "SERIES"
        ds.StudyInstanceUID = study_uid
        if series_uid is not None:
            ds.SeriesInstanceUID = series_uid
        classes = self._classes(study_uid, series_uid)
        sink = _MemorySink(self.max_study_bytes)
        try:
            with self._slots:
                self.retrieves += 1
                outcome = c_get(self.source, ds, classes, sink)
        except (DicomNetworkError, OSError) as exc:
            raise LegacyUnavailable(f"legacy PACS {self.ae_title}: {type(exc).__name__}") from None
        if outcome.final_status not in (0x0000, 0xB000) and not sink.objects:
            raise LegacyUnavailable(f"legacy PACS {self.ae_title}: C-GET status 0x{(outcome.final_status or 0):04X}")
        return sorted(sink.objects, key=lambda o: (o.series_instance_uid, o.sop_instance_uid))

    def _classes(self, study_uid: str, series_uid: str | None) -> list[str]:
        """The SOP classes to accept: from an image-level C-FIND, else the series' modalities' likely ones."""
        where = {"StudyInstanceUID": study_uid, **({"SeriesInstanceUID": series_uid} if series_uid else {})}
        try:
            found = {str(r["SOPClassUID"]) for r in self.search(QidoQuery(Level.IMAGE, where)) if r.get("SOPClassUID")}
            if not found:
                for row in self.search(QidoQuery(Level.SERIES, where)):
                    found.update(likely_storage_classes(str(row.get("Modality") or "OT")))
        except LegacyUnavailable:
            found = set()
        return sorted(found) or list(likely_storage_classes("OT"))


def _value(ds: Dataset, keyword: str) -> Any:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


class LegacySearch:
    """Study-level lookups on the legacy PACS, for the locator (LookupError: no answer)."""

    def __init__(self, legacy: LegacyArchive) -> None:
        self.legacy = legacy

    def studies(self, **match: str) -> list[dict[str, Any]]:
        try:
            return self.legacy.search(QidoQuery(Level.STUDY, dict(match)))
        except LegacyUnavailable as exc:
            raise LookupError(str(exc)) from None
