"""DICOM network client (SCU) for the legacy PACS, on pynetdicom.

One association per call, opened and released here, with every timeout set, so
a stalled peer never hangs a task. Identifier logging is switched off at import:
pynetdicom would otherwise log query identifiers, which can carry patient data.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, _config, build_role, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from .config import SourceConfig

_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False
# pynetdicom's INFO/DEBUG lines carry AE titles and UIDs, never needed at run time.
logging.getLogger("pynetdicom").setLevel(logging.WARNING)

log = logging.getLogger(__name__)

# Syntaxes we accept on retrieval, one presentation context each, so the source
# sends every instance as it stores it (no silent transcoding).
RETRIEVE_TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still found in old archives)
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
)
_MAX_CONTEXTS = 127  # PS3.8: odd presentation context IDs 1..255


class DicomNetworkError(RuntimeError):
    """The association could not be made or broke; worth a retry."""


class QueryFailed(RuntimeError):
    """The peer answered a C-FIND with a failure status."""

    def __init__(self, status: int) -> None:
        super().__init__(f"C-FIND failed with status 0x{status:04X}")
        self.status = status


class QueryTruncated(QueryFailed):
    """The peer stopped answering early (0xFE00 cancel, 0xA700 out of resources):
    ``answers`` holds what came before. The caller splits the query."""

    def __init__(self, status: int, answers: list[Dataset]) -> None:
        super().__init__(status)
        self.answers = answers


TRUNCATION_STATUSES = (0xFE00, 0xA700)


def nodelay(assoc) -> None:
    """TCP_NODELAY on the association's socket: DIMSE sends small writes that
    Nagle's algorithm would hold back for a delayed ACK (~40 ms each)."""
    try:
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        pass


def _new_ae(source: SourceConfig) -> AE:
    ae = AE(ae_title=source.calling_ae_title)
    ae.acse_timeout = source.acse_timeout
    ae.dimse_timeout = source.dimse_timeout
    ae.network_timeout = source.network_timeout
    ae.connection_timeout = source.acse_timeout
    ae.maximum_pdu_size = source.max_pdu
    return ae


def _associate(ae: AE, source: SourceConfig, **kwargs: Any):
    """Open an association to the source with TCP_NODELAY, or raise DicomNetworkError."""
    assoc = ae.associate(source.host, source.port, ae_title=source.called_ae_title, **kwargs)
    if not assoc.is_established:
        raise DicomNetworkError(
            f"association to {source.called_ae_title}@{source.host}:{source.port} "
            f"{'rejected' if assoc.is_rejected else 'failed'}"
        )
    nodelay(assoc)
    return assoc


def _open_find_association(source: SourceConfig):
    ae = _new_ae(source)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    return _associate(ae, source)


def _c_find(assoc, identifier: Dataset) -> list[Dataset]:
    answers: list[Dataset] = []
    final_status: int | None = None
    for status, ident in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
        if not status:  # empty status: timeout or abort
            raise DicomNetworkError("C-FIND got no response (timeout or abort)")
        code = int(status.Status)
        if code in (0xFF00, 0xFF01):
            if ident is not None:
                answers.append(ident)
        else:
            final_status = code
    if final_status is None:
        raise DicomNetworkError("C-FIND ended without a final status")
    if final_status in TRUNCATION_STATUSES:
        raise QueryTruncated(final_status, answers)
    if final_status != 0x0000:
        raise QueryFailed(final_status)
    return answers


def find(source: SourceConfig, identifier: Dataset) -> list[Dataset]:
    """One Study Root C-FIND on its own association; returns the pending identifiers.

    Raises
    ------
    DicomNetworkError
        When no association could be made or it was aborted.
    QueryTruncated
        When the peer ended early (0xFE00/0xA700); carries the partial answers.
    QueryFailed
        When the final status is a failure.
    """
    assoc = _open_find_association(source)
    try:
        return _c_find(assoc, identifier)
    finally:
        if assoc.is_established:
            assoc.release()


class FindSession:
    """The census's C-FIND client.

    Each C-FIND gets its own association: reusing one association for
    hundreds of queries was measured to lose answers under load with
    pynetdicom 3.0 ("unexpected C-FIND service message"), and a census must
    never lose an answer. TCP_NODELAY keeps the per-association cost small.
    """

    def __init__(self, source: SourceConfig) -> None:
        self.source = source

    def __enter__(self) -> FindSession:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def find(self, identifier: Dataset) -> list[Dataset]:
        return find(self.source, identifier)


@dataclass
class ReceivedInstance:
    """One instance as it arrived: staged bytes and their hash."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: Path
    sha256: str
    size: int


@dataclass
class StagingSink:
    """Receives C-STORE sub-operations into a staging folder.

    Files are named by arrival order, never by UID: a UID is untrusted input
    until normalize has validated it. Thread-safe: several associations may
    deliver into one sink.
    """

    folder: Path
    received: dict[str, ReceivedInstance] = field(default_factory=dict)
    duplicates: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _counter: int = 0

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)

    def store(self, sop_instance_uid: str, sop_class_uid: str, transfer_syntax: str, data: bytes) -> int:
        digest = hashlib.sha256(data).hexdigest()
        with self._lock:
            if sop_instance_uid in self.received:
                self.duplicates += 1
                return 0x0000
            self._counter += 1
            path = self.folder / f"{self._counter:08d}.dcm"
        tmp = path.with_suffix(".part")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.rename(path)
        with self._lock:
            self.received[sop_instance_uid] = ReceivedInstance(
                sop_instance_uid, sop_class_uid, transfer_syntax, path, digest, len(data)
            )
        return 0x0000

    def handle_store(self, event: evt.Event) -> int:
        """pynetdicom ``EVT_C_STORE`` handler."""
        try:
            data = event.encoded_dataset(include_meta=True)
            req = event.request
            return self.store(
                str(req.AffectedSOPInstanceUID),
                str(req.AffectedSOPClassUID),
                str(event.context.transfer_syntax),
                data,
            )
        except Exception:  # never let a handler exception kill the association
            log.exception("failed to stage a received instance")
            return 0xA700  # Out of resources


@dataclass(frozen=True)
class RetrieveOutcome:
    """What the peer said about a C-GET. Never trusted alone: reconcile UIDs."""

    final_status: int | None
    completed: int
    failed: int
    warning: int
    failed_sop_instance_uids: tuple[str, ...]


def storage_contexts(sop_class_uids: Iterable[str]) -> list[tuple[str, str]]:
    """(SOP class, transfer syntax) pairs to propose for C-GET's C-STOREs.

    One context per pair; when many SOP classes would exceed the 127-context
    limit, compressed syntaxes are dropped first for the extra classes.
    """
    classes = sorted(set(sop_class_uids))
    budget = _MAX_CONTEXTS - 1  # one for the Get model itself
    per_class = max(3, min(len(RETRIEVE_TRANSFER_SYNTAXES), budget // max(1, len(classes))))
    pairs = [(c, ts) for c in classes for ts in RETRIEVE_TRANSFER_SYNTAXES[:per_class]]
    if len(pairs) > budget:
        raise ValueError(f"{len(classes)} SOP classes in one retrieve exceed the presentation-context limit")
    return pairs


def c_get(
    source: SourceConfig,
    identifier: Dataset,
    sop_class_uids: Iterable[str],
    sink: StagingSink,
    on_response: Callable[[int], None] | None = None,
) -> RetrieveOutcome:
    """One Study Root C-GET; instances land in ``sink``.

    Raises
    ------
    DicomNetworkError
        When no association could be made.
    """
    ae = _new_ae(source)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    classes = sorted(set(sop_class_uids))
    for sop_class, ts in storage_contexts(classes):
        ae.add_requested_context(sop_class, ts)
    roles = [build_role(UID(c), scp_role=True) for c in classes]
    assoc = _associate(ae, source, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, sink.handle_store)])
    final: int | None = None
    counts = {"completed": 0, "failed": 0, "warning": 0}
    failed_uids: tuple[str, ...] = ()
    try:
        for status, ident in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet):
            if not status:
                break  # timeout/abort: what arrived is reconciled by the caller
            code = int(status.Status)
            if on_response:
                on_response(code)
            if code in (0xFF00, 0xFF01):
                continue
            final = code
            counts["completed"] = int(status.get("NumberOfCompletedSuboperations", 0) or 0)
            counts["failed"] = int(status.get("NumberOfFailedSuboperations", 0) or 0)
            counts["warning"] = int(status.get("NumberOfWarningSuboperations", 0) or 0)
            if ident is not None and "FailedSOPInstanceUIDList" in ident:
                value = ident.FailedSOPInstanceUIDList
                failed_uids = tuple(str(v) for v in (value if isinstance(value, list | tuple) else [value]) if v)
    finally:
        if assoc.is_established:
            assoc.release()
    return RetrieveOutcome(final, counts["completed"], counts["failed"], counts["warning"], failed_uids)



class StorageListener:
    """Our Storage SCP, the destination of C-MOVE: accepts every storage SOP
    class in every transfer syntax and delivers into the current sink.

    The PACS knows this AE at a fixed host/port, so one listener serves one
    partition task at a time; what arrives is reconciled against the census by
    the caller (anything unasked is quarantined ``UNSOLICITED``).
    """

    def __init__(self, ae_title: str, host: str = "127.0.0.1", port: int = 11112, max_pdu: int = 131072) -> None:
        ae = AE(ae_title=ae_title)
        ae.maximum_pdu_size = max_pdu
        ae.network_timeout = 60
        ae.dimse_timeout = 60
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.sink: StagingSink | None = None
        self.active = 0
        self.last_store = 0.0
        self._lock = threading.Lock()
        self.server = ae.start_server(
            (host, port),
            block=False,
            evt_handlers=[
                (evt.EVT_C_STORE, self._on_store),
                (evt.EVT_ESTABLISHED, self._on_open),
                (evt.EVT_RELEASED, self._on_close),
                (evt.EVT_ABORTED, self._on_close),
            ],
        )
        self.port = self.server.server_address[1]

    def _on_open(self, event: evt.Event) -> None:
        nodelay(event.assoc)
        with self._lock:
            self.active += 1

    def _on_close(self, event: evt.Event) -> None:
        with self._lock:
            self.active = max(0, self.active - 1)

    def _on_store(self, event: evt.Event) -> int:
        sink = self.sink
        if sink is None:
            return 0xA801  # no partition is being retrieved: refuse
        self.last_store = time.monotonic()
        return sink.handle_store(event)

    def settle(self, quiet: float = 0.5, limit: float = 30.0) -> None:
        """Wait for stores still in flight after the C-MOVE's final status
        (some PACS report success before their sub-associations finish)."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            with self._lock:
                busy = self.active > 0
            if not busy and time.monotonic() - self.last_store >= quiet:
                return
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.shutdown()


class MoveRetriever:
    """A :data:`retrieve.GetFn` that retrieves by C-MOVE to ``listener``."""

    def __init__(self, source: SourceConfig, listener: StorageListener, move_ae_title: str) -> None:
        self.source = source
        self.listener = listener
        self.move_ae_title = move_ae_title

    def __call__(self, identifier: Dataset, sop_class_uids: Iterable[str], sink: StagingSink) -> RetrieveOutcome:
        self.listener.sink = sink
        ae = _new_ae(self.source)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = _associate(ae, self.source)
        final: int | None = None
        counts = {"completed": 0, "failed": 0, "warning": 0}
        try:
            for status, _ in assoc.send_c_move(identifier, self.move_ae_title, StudyRootQueryRetrieveInformationModelMove):
                if not status:
                    break
                code = int(status.Status)
                if code in (0xFF00, 0xFF01):
                    continue
                final = code
                for k in counts:
                    counts[k] = int(status.get(f"NumberOf{k.capitalize()}Suboperations", 0) or 0)
        finally:
            if assoc.is_established:
                assoc.release()
        self.listener.settle()
        return RetrieveOutcome(final, counts["completed"], counts["failed"], counts["warning"], ())


@contextlib.contextmanager
def retriever(source: SourceConfig) -> Iterator[Callable[[Dataset, Iterable[str], StagingSink], RetrieveOutcome]]:
    """The retrieve function the configuration asks for: C-GET, or C-MOVE to a
    Storage SCP listening for the duration of the block."""
    if source.retrieve_method == "C-MOVE":
        ae_title = source.move_ae_title or source.calling_ae_title
        listener = StorageListener(ae_title, source.move_listen_host, source.move_listen_port, source.max_pdu)
        try:
            yield MoveRetriever(source, listener, ae_title)
        finally:
            listener.stop()
    else:
        yield lambda identifier, classes, sink: c_get(source, identifier, classes, sink)
