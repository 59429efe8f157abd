"""The study index: what DICOMweb search and the locator need of every migrated
instance, one Parquet file per partition under
``_index/studies/date=YYYY-MM-DD/modality=XX/instances.parquet``.

It holds patient data (names, IDs, accession numbers): it lives under its own
prefix, apart from the manifests and the dashboard's ``_index/partitions.parquet``,
so that IAM keeps the dashboard and auditor principals off it (``docs/iam``).
It is built after each partition's lineage from the transfer manifest and the
stored objects' headers (ranged reads that stop before the pixels), and rebuilt
the same way by ``python -m include.cli study-index-rebuild`` if it is lost.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pandas as pd
import pydicom
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import BaseTag
from pydicom.uid import UID

from .manifest import PARQUET, PartitionManifests, transferred_partitions
from .normalize import _HEADERS, _LONG_VRS, _UNDEFINED, _dataset_offset, _walk
from .part10 import _NOT_EXPLICIT_LE, _VRS  # the encodings and VRs pydicom's reader reads as ours do
from .partition import Partition
from .store import ObjectStore

log = logging.getLogger(__name__)

INDEX_PREFIX = "_index/studies/"
REPORTS_MODALITY = "RIS"  # the index partition of a date's reports from the RIS (rows carry SR or DOC)
INSTANCES = "instances.parquet"

# Columns named by their DICOM keyword, by level (what QIDO-RS returns and matches on).
STUDY_KEYWORDS: tuple[str, ...] = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "PatientID",
    "IssuerOfPatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyDescription",
    "StudyID",
    "ReferringPhysicianName",
)
SERIES_KEYWORDS: tuple[str, ...] = (
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "SeriesDate",
    "SeriesTime",
    "BodyPartExamined",
)
INSTANCE_KEYWORDS: tuple[str, ...] = (
    "SOPInstanceUID",
    "SOPClassUID",
    "InstanceNumber",
    "Rows",
    "Columns",
    "NumberOfFrames",
)
# Where the object is and what it is: from the transfer manifest and the file meta.
OBJECT_COLUMNS: tuple[str, ...] = (
    "TransferSyntaxUID",
    "object_key",
    "object_size",
    "object_sha256",
    "run_id",
    "partition",
    # the study's instances of this partition that did not migrate (quarantined, unresolved):
    # the service completes such a study from the legacy PACS
    "study_not_migrated",
)
COLUMNS: tuple[str, ...] = (*STUDY_KEYWORDS, *SERIES_KEYWORDS, *INSTANCE_KEYWORDS, *OBJECT_COLUMNS)
INTEGERS = frozenset(
    {"SeriesNumber", "InstanceNumber", "Rows", "Columns", "NumberOfFrames", "object_size", "study_not_migrated"}
)
HEADER_READERS = 8  # ranged GETs in flight per partition


def index_key(store: ObjectStore, partition: Partition) -> str:
    return f"{store.target.prefix}{INDEX_PREFIX}{partition.hive_path}/{INSTANCES}"


class RangeReader(io.RawIOBase):
    """An S3 object as a seekable file that fetches only the blocks read (and
    keeps them: pydicom seeks back and forth within a header): it parses a
    header through it and stops before the pixel data."""

    def __init__(self, store: ObjectStore, key: str, block: int = 64 * 1024) -> None:
        self.store, self.key, self.pos, self.block = store, key, 0, block
        self.name = key  # pydicom records it as the dataset's filename
        self._blocks: dict[int, bytes] = {}
        self.gets = 0
        self.size = self._size()  # from S3 itself, not from a manifest

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def _size(self) -> int:
        self._blocks[0], size = self.store.get_range(self.key, 0, self.block - 1)
        self.gets += 1
        return size

    def _block(self, n: int) -> bytes:
        if n not in self._blocks:
            start = n * self.block
            self._blocks[n], _ = self.store.get_range(self.key, start, min(self.size, start + self.block) - 1)
            self.gets += 1
        return self._blocks[n]

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self.size - self.pos)
        if want <= 0:
            return 0
        n, offset = divmod(self.pos, self.block)
        data = self._block(n)[offset : offset + want]
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


def read_header(store: ObjectStore, key: str) -> tuple[Dataset, int]:
    """A stored object's dataset up to its pixel data, from ranged reads
    (one 64 KiB block for a typical header), and the object's size."""
    with RangeReader(store, key) as f:
        return pydicom.dcmread(f, stop_before_pixels=True), f.size


# What a row reads of a header, and the pixel data tags pydicom's stop_before_pixels stops at.
_ROW_TAGS = frozenset(
    BaseTag(tag_for_keyword(k) or 0)
    for k in ("SpecificCharacterSet", *STUDY_KEYWORDS, *SERIES_KEYWORDS, *INSTANCE_KEYWORDS)
)
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
_, _HEAD, _LENGTH = _HEADERS["<"]


def scan_header(head: bytes) -> Dataset | None:
    """The elements a row reads, from a Part 10 header in explicit VR little endian (what the
    pipeline stores): each element up to the pixel data is stepped over by its length (a
    sequence walked item by item), only those of the row are kept, undecoded, as pydicom's
    reader would hold them; pydicom decodes them when read. ~4x cheaper than pydicom's parse
    of the whole header. None for anything else (another encoding, an odd or cut structure):
    the caller parses with pydicom."""
    try:
        pos, ts = _dataset_offset(head)
        if ts is None or ts in _NOT_EXPLICIT_LE:
            return None
        found = _row_elements(head, pos)
        if found is None:
            return None
        ds = Dataset(dict[BaseTag, DataElement | RawDataElement](found))
        encoding: Any = default_encoding
        if 0x00080005 in found:  # decoded as pydicom's reader decodes it
            encoding = convert_encodings(convert_raw_data_element(found[BaseTag(0x00080005)]).value)
        ds.set_original_encoding(False, True, encoding)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = UID(ts)
        return ds
    except Exception:  # noqa: BLE001 - whatever this scan cannot follow, pydicom reads
        return None


def _row_elements(buf: bytes, pos: int) -> dict[BaseTag, RawDataElement] | None:
    """The row's elements of the top-level dataset at ``pos``; None where the scan stops short."""
    end, found = len(buf), dict[BaseTag, RawDataElement]()
    while pos + 8 <= end:
        group, element, vr, length = _HEAD.unpack_from(buf, pos)
        tag = group << 16 | element
        if tag in _PIXEL_TAGS:
            return found
        if group == 0xFFFE or vr not in _VRS:
            return None  # an item at the top level, or no VR pydicom knows
        if vr in _LONG_VRS:
            length, value_at = _LENGTH.unpack_from(buf, pos + 8)[0], pos + 12
        else:
            value_at = pos + 8
        if length == _UNDEFINED:
            if tag in _ROW_TAGS:
                return None
            pos = _walk(buf, value_at, end, vr == b"UN", True, True, 1)
            continue
        pos = value_at + length
        if pos > end:
            return None
        if tag in _ROW_TAGS:
            value = buf[value_at:pos]
            found[BaseTag(tag)] = RawDataElement(BaseTag(tag), vr.decode(), length, value, value_at, False, True)
    return found if pos == end else None


def _text(ds: Dataset, keyword: str) -> Any:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if keyword in INTEGERS:
        try:
            return int(value)
        except (TypeError, ValueError):
            return None
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value)


def header_row(ds: Dataset, size: int, row: dict[str, Any], partition: Partition) -> dict[str, Any]:
    """One index row: the object's attributes and where it is."""
    out = {k: _text(ds, k) for k in (*STUDY_KEYWORDS, *SERIES_KEYWORDS, *INSTANCE_KEYWORDS)}
    meta = getattr(ds, "file_meta", None)
    out.update(
        TransferSyntaxUID=str(meta.TransferSyntaxUID) if meta is not None and "TransferSyntaxUID" in meta else None,
        object_key=row["object_key"],
        object_size=size,
        object_sha256=row["object_sha256"],
        run_id=row["run_id"],
        partition=partition.key,
    )
    return out


def frame(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(list(rows), columns=list(COLUMNS))
    for col in INTEGERS:
        df[col] = df[col].astype("Int64")
    return df


def read_partition(store: ObjectStore, partition: Partition) -> pd.DataFrame | None:
    data = store.get_or_none(index_key(store, partition))
    return None if data is None else pd.read_parquet(io.BytesIO(data))


def index_partition(
    store: ObjectStore,
    partition: Partition,
    transfer: pd.DataFrame | None = None,
    reread: bool = False,
    headers: Mapping[tuple[str, str], dict[str, Any]] | None = None,
) -> int:
    """Write the partition's index from its transfer manifest (the live one
    unless given); rows of objects already indexed with the same hash are
    kept (``reread``: none), ``headers`` (rows by object key and hash, from a
    re-read that just verified them) taken as given, the others' headers read.
    Returns the rows written (0: the partition holds nothing migrated and its
    index is emptied)."""
    if transfer is None and partition.modality == REPORTS_MODALITY:  # the reports placed in studies
        from .reports.ledger import ReportLedger

        transfer = ReportLedger(store, partition.study_date).objects()
    elif transfer is None:
        transfer = PartitionManifests(store, partition).transfer_or_none()
    if transfer is not None and "other_source" in transfer:  # another archive's copy is indexed with its partition
        transfer = transfer[~(transfer["other_source"].notna() & (transfer["state"] == "migrated"))]
    migrated = [] if transfer is None else transfer[transfer["state"] == "migrated"].to_dict("records")
    key = index_key(store, partition)
    if not migrated:
        if store.head(key) is not None:  # emptied, not deleted: the writer and rollback principals delete nothing here
            _write(store, key, [])
        return 0
    previous = None if reread else read_partition(store, partition)
    known: dict[tuple[str, str], dict[str, Any]] = {}
    if previous is not None:
        for r in previous.to_dict("records"):
            known[(r["object_key"], r["object_sha256"])] = {**r, "run_id": None}
    given = headers or {}
    todo = [
        r for r in migrated if (key_sha := (r["object_key"], r["object_sha256"])) not in known and key_sha not in given
    ]

    def one(row: dict[str, Any]) -> dict[str, Any]:
        return header_row(*read_header(store, row["object_key"]), row, partition)

    with ThreadPoolExecutor(HEADER_READERS, thread_name_prefix="index-header") as pool:
        fresh = {**given, **{(r["object_key"], r["object_sha256"]): r for r in pool.map(one, todo)}}
    assert transfer is not None
    missing = transfer[transfer["state"] != "migrated"]["study_instance_uid"].value_counts().to_dict()
    rows = []
    for r in migrated:
        ident = (r["object_key"], r["object_sha256"])
        row = fresh.get(ident) or {**known[ident], "run_id": r["run_id"]}
        rows.append({**row, "study_not_migrated": int(missing.get(r["study_instance_uid"], 0))})
    _write(store, key, rows)
    return len(rows)


def _write(store: ObjectStore, key: str, rows: list[dict[str, Any]]) -> None:
    buf = io.BytesIO()
    frame(rows).to_parquet(buf, index=False)
    store.put(key, buf.getvalue(), PARQUET)


def update(store: ObjectStore, partitions: Iterable[Partition], transfers: dict[Partition, Any] | None = None) -> int:
    """Index these partitions (after their lineage, or a rollback); returns the rows written."""
    return sum(index_partition(store, p, (transfers or {}).get(p)) for p in partitions)


def indexed_partitions(store: ObjectStore) -> list[Partition]:
    base = f"{store.target.prefix}{INDEX_PREFIX}"
    found = []
    for key in store.list_keys(base):
        if key.endswith("/" + INSTANCES) and (p := Partition.from_hive(key[len(base) : -len(INSTANCES) - 1])):
            found.append(p)
    return sorted(found)


def rebuild(store: ObjectStore) -> dict[str, int]:
    """Rebuild the whole index from the manifests, the report ledgers and the
    objects' headers; an index file of a partition without either is emptied."""
    from .reports.ledger import ReportLedger, ledger_dates
    from .reports.place import index_partition_of

    live = transferred_partitions(store)
    rows = 0
    for p in live:
        rows += index_partition(store, p, reread=True)
    for day in ledger_dates(store):  # the reports placed in studies, one index partition per date
        p = index_partition_of(day)
        live.append(p)
        rows += index_partition(store, p, ReportLedger(store, day).objects(), reread=True)
    stale = [p for p in indexed_partitions(store) if p not in set(live)]
    for p in stale:
        _write(store, index_key(store, p), [])
    return {"partitions": len(live), "instances": rows, "removed": len(stale)}
