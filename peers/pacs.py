"""A simulated legacy PACS: a pynetdicom Query/Retrieve SCP serving an archive
folder (C-FIND at study/series/image level, C-GET, C-MOVE). It sends each
instance in the encoding it is stored in, like a real archive."""

from __future__ import annotations

import fnmatch
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from include.pacs_migration.dimse import nodelay

_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False
log = logging.getLogger(__name__)

_INDEX_KEYS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "AccessionNumber",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesTime",
    "SOPInstanceUID",
    "SOPClassUID",
    "InstanceNumber",
    "SpecificCharacterSet",
    "Rows",
    "Columns",
    "BitsAllocated",
    "SamplesPerPixel",
    "NumberOfFrames",
)
_INTEGER_VRS = {"US", "UL", "SS", "SL", "IS"}
_LEVEL_KEYS = {
    "PATIENT": ("PatientID",),
    # Like Orthanc: a StudyInstanceUID filed under two patients answers twice.
    "STUDY": ("StudyInstanceUID", "PatientID"),
    "SERIES": ("StudyInstanceUID", "SeriesInstanceUID"),
    "IMAGE": ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"),
}


@dataclass(frozen=True)
class Record:
    path: Path
    attrs: dict[str, str]
    transfer_syntax: str


def _text(value: Any) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value)


def _answer_value(keyword: str, text: str) -> Any:
    if text and dictionary_VR(keyword) in _INTEGER_VRS:
        return int(text)
    return text


def _read_record(path: Path) -> Record | None:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        attrs = {k: _text(ds.get(k)) for k in _INDEX_KEYS}
    except Exception:
        return None
    if not attrs["SOPInstanceUID"]:
        return None
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.TransferSyntaxUID) if meta is not None and "TransferSyntaxUID" in meta else ""
    if not ts:
        implicit, little = ds.original_encoding
        ts = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return Record(path, attrs, ts)


def _matches(value: str, wanted: Any) -> bool:
    if isinstance(wanted, (list, pydicom.multival.MultiValue)):
        return value in [str(w) for w in wanted]
    w = str(wanted)
    if w in ("", "*"):
        return True
    if "-" in w and w.replace("-", "").replace(".", "").isdigit():  # date or time range
        lo, hi = w.split("-", 1)
        return (not lo or value >= lo) and (not hi or value <= hi)
    if "*" in w or "?" in w:
        return fnmatch.fnmatchcase(value, w)
    return value == w


@dataclass
class Faults:
    """DICOM-level faults to script into the simulated PACS (tests).

    Counters are consumed as faults fire, so a fault can be transient (the
    next N times) or, with a large count, persistent.
    """

    reject_associations: int = 0  # the next N associations: A-ASSOCIATE-RJ transient, local limit exceeded
    abort_after: int = 0  # on a retrieve, A-ABORT after this many sub-operations ...
    abort_times: int = 0  # ... for this many retrieve requests
    stall_seconds: float = 0.0  # on a retrieve, say nothing for this long before the first response ...
    stall_times: int = 0  # ... for this many retrieve requests
    withhold: frozenset[str] = frozenset()  # SOP Instance UIDs not sent; the final status is 0xB000 ...
    withhold_times: int = 0  # ... for this many retrieve requests naming one of them
    failed_list: bool = True  # whether that 0xB000 names them in a Failed SOP Instance UID List
    move_success_before_stores: float = 0.0  # C-MOVE: answer success at once, send the stores this late
    # C-FIND failures (0xC000), like a PACS with an unreadable stored file:
    fail_series_find: frozenset[str] = frozenset()  # Study Instance UIDs whose SERIES-level query fails
    fail_image_find: frozenset[str] = frozenset()  # Series Instance UIDs whose IMAGE-level query fails

    def take(self, name: str) -> bool:
        """Consume one firing of the counted fault ``name``."""
        left = getattr(self, name)
        if left > 0:
            setattr(self, name, left - 1)
            return True
        return False


class SimulatedPACS:
    """Serve ``archive`` on ``host:port`` as ``ae_title``.

    Parameters
    ----------
    move_destinations : dict
        AE title -> (host, port), for C-MOVE.
    """

    def __init__(
        self,
        archive: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        ae_title: str = "LEGACYPACS",
        move_destinations: dict[str, tuple[str, int]] | None = None,
        max_associations: int = 8,
        find_limit: int | None = None,
        truncation_status: int = 0x0000,
        faults: Faults | None = None,
        image_find_limit: int | None = None,
    ) -> None:
        """``find_limit`` caps C-FIND answers at study and series level,
        ``image_find_limit`` at image level (default: ``find_limit``), as legacy
        PACS do; the answer then ends with ``truncation_status`` (0x0000:
        silently, like most)."""
        self.archive = Path(archive)
        self.host = host
        self.ae_title = ae_title
        self.move_destinations = dict(move_destinations or {})
        self.find_limit = find_limit
        self.image_find_limit = image_find_limit if image_find_limit is not None else find_limit
        self.truncation_status = truncation_status
        self.faults = faults or Faults()
        self.max_associations = max_associations
        self.rejected = 0
        self.aborted = 0
        self.stalled = 0
        self._late_senders: list[threading.Thread] = []
        self.find_requests = 0
        self.records: list[Record] = []
        self.active = 0
        self.max_active = 0
        self.associations = 0
        self._lock = threading.Lock()
        self.reindex()
        ae = AE(ae_title=ae_title)
        ae.maximum_associations = max_associations
        ae.network_timeout = 60
        ae.dimse_timeout = 60
        ae.add_supported_context(Verification)  # C-ECHO, as any PACS answers it
        for model in (
            StudyRootQueryRetrieveInformationModelFind,
            PatientRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelGet,
            PatientRootQueryRetrieveInformationModelGet,
            StudyRootQueryRetrieveInformationModelMove,
            PatientRootQueryRetrieveInformationModelMove,
        ):
            ae.add_supported_context(model)
        sop_classes = sorted({r.attrs["SOPClassUID"] for r in self.records if r.attrs["SOPClassUID"]})
        for sop_class in sop_classes:
            # C-GET: the requestor acts as Storage SCP on this association.
            ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES, scu_role=False, scp_role=True)
        # C-MOVE sub-associations: one context per (SOP class, syntax stored), so each
        # instance goes out in the encoding it is stored in.
        stored = sorted({(r.attrs["SOPClassUID"], r.transfer_syntax) for r in self.records if r.attrs["SOPClassUID"]})
        for sop_class, ts in stored[:127]:
            ae.add_requested_context(sop_class, ts)
        self.ae = ae
        handlers = [
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_GET, self._on_get),
            (evt.EVT_C_MOVE, self._on_move),
            (evt.EVT_CONN_OPEN, self._on_connect),
            (evt.EVT_ESTABLISHED, self._on_open),
            (evt.EVT_RELEASED, self._on_close),
            (evt.EVT_ABORTED, self._on_close),
        ]
        self.server = ae.start_server((host, port), block=False, evt_handlers=handlers)
        self.port = self.server.server_address[1]

    def reindex(self) -> None:
        """(Re)read the archive folder; new files become visible to queries."""
        records = [r for p in sorted(self.archive.rglob("*.dcm")) if (r := _read_record(p))]
        self.records = records

    def stop(self) -> None:
        for thread in self._late_senders:
            thread.join(timeout=30)
        self.server.shutdown()

    def _on_connect(self, event: evt.Event) -> None:
        # pynetdicom rejects (transient, local-limit-exceeded) when its active
        # acceptors exceed maximum_associations: 0 rejects this one.
        if self.faults.take("reject_associations"):
            self.rejected += 1
            self.ae.maximum_associations = 0
        else:
            self.ae.maximum_associations = self.max_associations

    # --- association accounting (lets tests assert the concurrency bound)
    def _on_open(self, event: evt.Event) -> None:
        nodelay(event.assoc)
        with self._lock:
            self.active += 1
            self.associations += 1
            self.max_active = max(self.max_active, self.active)

    def _on_close(self, event: evt.Event) -> None:
        with self._lock:
            self.active = max(0, self.active - 1)

    # --- matching
    def _match(self, identifier: Dataset) -> tuple[str, list[list[Record]]]:
        level = str(identifier.get("QueryRetrieveLevel", "STUDY") or "STUDY")
        filters = {
            e.keyword: e.value
            for e in identifier
            if e.keyword in _INDEX_KEYS and e.value not in (None, "") and e.keyword != "QueryRetrieveLevel"
        }
        hits = [r for r in self.records if all(_matches(r.attrs[k], v) for k, v in filters.items())]
        groups: dict[tuple[str, ...], list[Record]] = defaultdict(list)
        for r in hits:
            groups[tuple(r.attrs[k] for k in _LEVEL_KEYS.get(level, ("StudyInstanceUID",)))].append(r)
        return level, [groups[k] for k in sorted(groups)]

    def _on_find(self, event: evt.Event):
        identifier = event.identifier
        level, groups = self._match(identifier)
        self.find_requests += 1
        if self._find_fails(level, identifier):
            yield (0xC000, None)  # unable to process
            return
        limit = self.image_find_limit if level == "IMAGE" else self.find_limit
        truncated = limit is not None and len(groups) > limit
        if truncated:
            groups = groups[:limit]
        for group in groups:
            if event.is_cancelled:
                yield (0xFE00, None)
                return
            first = group[0]
            rsp = Dataset()
            rsp.QueryRetrieveLevel = level
            for elem in identifier:
                kw = elem.keyword
                if kw in _INDEX_KEYS:
                    setattr(rsp, kw, _answer_value(kw, first.attrs[kw]))
                elif kw == "AvailableTransferSyntaxUID":
                    rsp.AvailableTransferSyntaxUID = first.transfer_syntax
                elif kw == "NumberOfStudyRelatedInstances":
                    study = first.attrs["StudyInstanceUID"]
                    rsp.NumberOfStudyRelatedInstances = sum(
                        1 for r in self.records if r.attrs["StudyInstanceUID"] == study
                    )
                elif kw == "NumberOfStudyRelatedSeries":
                    study = first.attrs["StudyInstanceUID"]
                    rsp.NumberOfStudyRelatedSeries = len(
                        {r.attrs["SeriesInstanceUID"] for r in self.records if r.attrs["StudyInstanceUID"] == study}
                    )
                elif kw == "NumberOfSeriesRelatedInstances":
                    rsp.NumberOfSeriesRelatedInstances = len(group)
                elif kw == "ModalitiesInStudy":
                    rsp.ModalitiesInStudy = sorted({r.attrs["Modality"] for r in group})
            rsp.RetrieveAETitle = self.ae_title
            yield (0xFF00, rsp)
        if truncated and self.truncation_status:
            yield (self.truncation_status, None)

    def _find_fails(self, level: str, identifier: Dataset) -> bool:
        if level == "SERIES":
            return str(identifier.get("StudyInstanceUID", "")) in self.faults.fail_series_find
        if level == "IMAGE":
            return str(identifier.get("SeriesInstanceUID", "")) in self.faults.fail_image_find
        return False

    def _datasets(self, records: list[Record]):
        for r in records:
            ds = pydicom.dcmread(r.path, force=True)
            if getattr(ds, "file_meta", None) is None or "TransferSyntaxUID" not in ds.file_meta:
                ds.file_meta = FileMetaDataset()
                ds.file_meta.TransferSyntaxUID = r.transfer_syntax
            yield ds

    def _sub_operations(self, event: evt.Event):
        """C-GET/C-MOVE tail: the count, then one pending status per instance,
        with the scripted faults."""
        _, groups = self._match(event.identifier)
        records = [r for g in groups for r in g]
        faults = self.faults
        withheld = [r for r in records if r.attrs["SOPInstanceUID"] in faults.withhold]
        if not (withheld and faults.take("withhold_times")):
            withheld = []
        send = [r for r in records if r not in withheld]
        if faults.take("stall_times"):
            self.stalled += 1
            time.sleep(faults.stall_seconds)  # the requestor's DIMSE timeout fires meanwhile
        yield len(records)
        for n, ds in enumerate(self._datasets(send)):
            if event.is_cancelled:
                yield (0xFE00, None)
                return
            if n == faults.abort_after and faults.take("abort_times"):
                self.aborted += 1
                event.assoc.abort()
                return
            yield (0xFF00, ds)
        if withheld:
            status = Dataset()
            status.FailedSOPInstanceUIDList = (
                [r.attrs["SOPInstanceUID"] for r in withheld] if faults.failed_list else []
            )
            yield (0xB000, status)  # warning: some sub-operations failed

    def _on_get(self, event: evt.Event):
        yield from self._sub_operations(event)

    def _on_move(self, event: evt.Event):
        destination = str(event.move_destination).strip()
        dest = self.move_destinations.get(destination)
        if dest is None:
            yield (None, None)  # unknown destination: 0xA801
            return
        delay = self.faults.move_success_before_stores
        if delay:
            # Answer success with no sub-operations now; deliver later on our own association.
            _, groups = self._match(event.identifier)
            records = [r for g in groups for r in g]
            thread = threading.Thread(target=self._send_late, args=(dest, destination, records, delay), daemon=True)
            self._late_senders.append(thread)
            thread.start()
            yield dest
            yield 0
            return
        yield dest
        yield from self._sub_operations(event)

    def _send_late(self, dest: tuple[str, int], ae_title: str, records: list[Record], delay: float) -> None:
        time.sleep(delay)
        assoc = self.ae.associate(dest[0], dest[1], ae_title=ae_title)
        if not assoc.is_established:
            return
        try:
            for ds in self._datasets(records):
                assoc.send_c_store(ds)
        finally:
            assoc.release()
