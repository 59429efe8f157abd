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
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, build_role, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # generated at import: mypy cannot see them
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from .config import SourceConfig, TlsConfig
from .logs import configure_logging

_CHUNK = 1 << 20
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"

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
UNCOMPRESSED_TRANSFER_SYNTAXES: tuple[str, ...] = RETRIEVE_TRANSFER_SYNTAXES[:3]
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
    with contextlib.suppress(AttributeError, OSError):
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _new_ae(source: SourceConfig) -> AE:
    ae = AE(ae_title=source.calling_ae_title)
    ae.acse_timeout = source.acse_timeout
    ae.dimse_timeout = source.dimse_timeout
    ae.network_timeout = source.network_timeout
    ae.connection_timeout = source.acse_timeout
    ae.maximum_pdu_size = source.max_pdu
    return ae


def tls_context(tls: TlsConfig) -> ssl.SSLContext:
    """A client context that trusts only ``tls.ca_file`` and presents our
    certificate when one is configured. TLS 1.2 at least (PS3.15 BCP 195)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = tls.check_hostname
    if tls.cert_file and tls.key_file:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return ctx


_REJECT_PERMANENT = 0x01
_REJECT_SOURCES = {1: "service user", 2: "service provider (ACSE)", 3: "service provider (presentation)"}


def _associate(ae: AE, source: SourceConfig, **kwargs: Any):
    """Open an association to the source with TCP_NODELAY, or raise DicomNetworkError.

    A transient rejection or a failed connection is retried
    (``source.association_attempts``, exponential backoff); a permanent
    rejection (wrong AE title, unsupported context) is not.
    """
    configure_logging()  # before any association: no identifiers in logs, streamed receive
    peer = f"{source.called_ae_title}@{source.host}:{source.port}"
    attempts = max(1, source.association_attempts)
    handlers = list(kwargs.pop("evt_handlers", []))
    if source.tls is not None:
        kwargs["tls_args"] = (tls_context(source.tls), source.tls.server_name or source.host)
    reason = "failed"
    for attempt in range(attempts):
        answer: dict[str, Any] = {}

        def on_acse(event: evt.Event, answer: dict[str, Any] = answer) -> None:
            primitive: Any = getattr(event, "primitive", None)  # set on ACSE events only
            if getattr(primitive, "result", None) in (0x01, 0x02):
                answer.update(result=primitive.result, source=primitive.result_source, diagnostic=primitive.diagnostic)

        # max_pdu must be passed here: AE.maximum_pdu_size only applies to an acceptor.
        assoc = ae.associate(
            source.host,
            source.port,
            ae_title=source.called_ae_title,
            max_pdu=source.max_pdu,
            evt_handlers=[*handlers, (evt.EVT_ACSE_RECV, on_acse)],
            **kwargs,
        )
        if assoc.is_established:
            nodelay(assoc)
            return assoc
        if assoc.is_rejected:
            kind = "permanently" if answer.get("result") == _REJECT_PERMANENT else "transiently"
            reason = (
                f"rejected {kind} by the {_REJECT_SOURCES.get(answer.get('source', 0), 'peer')}"
                f" (reason {answer.get('diagnostic', '?')})"
            )
            if answer.get("result") == _REJECT_PERMANENT:
                break
        else:
            reason = "failed (no answer, refused connection or TLS handshake)"
        if attempt + 1 < attempts:
            log.warning("association to %s %s; attempt %d of %d", peer, reason, attempt + 1, attempts)
            time.sleep(min(0.5 * 2**attempt, 5.0))
    raise DicomNetworkError(f"association to {peer} {reason}")


def _open_find_association(source: SourceConfig):
    ae = _new_ae(source)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    return _associate(ae, source)


def echo(source: SourceConfig) -> int:
    """C-ECHO the source (association, TLS, AE titles); returns the status (0x0000: success).

    Raises
    ------
    DicomNetworkError
        When no association could be made.
    """
    ae = _new_ae(source)
    ae.add_requested_context(VERIFICATION_SOP_CLASS)
    assoc = _associate(ae, source)
    try:
        status = assoc.send_c_echo()
        if not status:
            raise DicomNetworkError("C-ECHO got no response (timeout or abort)")
        return int(status.Status)
    finally:
        if assoc.is_established:
            assoc.release()


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
    """One instance as it arrived: staged bytes and their hash. ``copy`` is 0
    for the first arrival of a SOP Instance UID, 1, 2... for later arrivals
    whose bytes differ (kept: a copy is never dropped)."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: Path
    sha256: str
    size: int
    copy: int = 0


@dataclass
class StagingSink:
    """Receives C-STORE sub-operations into a staging folder.

    Files are named by arrival order, never by UID: a UID is untrusted input
    until normalize has validated it. Every arrival is staged and hashed; an
    identical re-arrival is counted once and its file removed; a different
    one under the same SOP Instance UID is kept as another copy
    (``ReceivedInstance.copy``) for the caller to quarantine. No fsync:
    staging is not the durable copy (S3 is, verified by checksum), and a
    retried task starts clean. Thread-safe: several associations may deliver
    into one sink.
    """

    folder: Path
    received: dict[str, ReceivedInstance] = field(default_factory=dict)
    copies: list[ReceivedInstance] = field(default_factory=list)  # differing later arrivals
    duplicates: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _counter: int = 0
    # Called once per first arrival or differing copy, as soon as it is staged
    # (overlaps processing with retrieval).
    on_received: Callable[[ReceivedInstance], None] | None = None

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)

    @property
    def arrivals(self) -> int:
        """Stores seen so far, duplicates included."""
        with self._lock:
            return len(self.received) + len(self.copies) + self.duplicates

    def _next_path(self) -> Path:
        with self._lock:
            self._counter += 1
            return self.folder / f"{self._counter:08d}.dcm"

    def _commit(self, item: ReceivedInstance) -> None:
        with self._lock:
            first = self.received.get(item.sop_instance_uid)
            known = [first, *(c for c in self.copies if c.sop_instance_uid == item.sop_instance_uid)]
            if first is None:
                self.received[item.sop_instance_uid] = item
            elif any(k is not None and k.sha256 == item.sha256 for k in known):
                self.duplicates += 1
                item.path.unlink(missing_ok=True)
                return
            else:
                item.copy = len(known)
                self.copies.append(item)
        if self.on_received is not None:
            self.on_received(item)

    def store(self, sop_instance_uid: str, sop_class_uid: str, transfer_syntax: str, data: bytes) -> int:
        """Stage an instance held in memory (a Part 10 byte string)."""
        path = self._next_path()
        tmp = path.with_suffix(".part")
        try:
            tmp.write_bytes(data)
            tmp.rename(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._commit(
            ReceivedInstance(
                sop_instance_uid, sop_class_uid, transfer_syntax, path, hashlib.sha256(data).hexdigest(), len(data)
            )
        )
        return 0x0000

    def store_file(self, sop_instance_uid: str, sop_class_uid: str, transfer_syntax: str, source: Path) -> int:
        """Stage an instance pynetdicom has already written to ``source``
        (STORE_RECV_CHUNKED_DATASET): hashed in chunks and moved, never loaded
        whole, so memory stays flat whatever the instance's size. ``source``
        is gone afterwards, whatever happens."""
        path = self._next_path()
        try:
            digest = hashlib.sha256()
            size = 0
            with open(source, "rb") as fh:
                while chunk := fh.read(_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
            try:
                os.replace(source, path)
            except OSError:  # another file system: copy, then drop the temporary
                tmp = path.with_suffix(".part")
                shutil.copyfile(source, tmp)
                tmp.rename(path)
        finally:
            source.unlink(missing_ok=True)
        self._commit(ReceivedInstance(sop_instance_uid, sop_class_uid, transfer_syntax, path, digest.hexdigest(), size))
        return 0x0000

    def handle_store(self, event: evt.Event) -> int:
        """pynetdicom ``EVT_C_STORE`` handler."""
        try:
            req = cast(C_STORE, event.request)
            uid, cls, ts = (
                str(req.AffectedSOPInstanceUID),
                str(req.AffectedSOPClassUID),
                str(event.context.transfer_syntax),
            )
            chunked = getattr(req, "_dataset_path", None)
            if isinstance(chunked, Path):
                # As a C-GET requestor pynetdicom leaves the temporary open: close it.
                if (handle := getattr(req, "_dataset_file", None)) is not None:
                    handle.close()
                return self.store_file(uid, cls, ts, chunked)
            return self.store(uid, cls, ts, event.encoded_dataset(include_meta=True))
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


# Storage SOP classes a modality's series is likely to hold, for sources whose
# census answers carry no SOP Class UID (DCMTK dcmqrscp, many legacy PACS).
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
LIKELY_STORAGE_CLASSES: dict[str, tuple[str, ...]] = {
    "CT": ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1"),
    "MR": ("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1"),
    "CR": ("1.2.840.10008.5.1.4.1.1.1",),
    "DX": ("1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1.1"),
    "MG": ("1.2.840.10008.5.1.4.1.1.1.2", "1.2.840.10008.5.1.4.1.1.1.2.1", "1.2.840.10008.5.1.4.1.1.13.1.3"),
    # Current and retired ultrasound, single and multi-frame.
    "US": (
        "1.2.840.10008.5.1.4.1.1.6.1",
        "1.2.840.10008.5.1.4.1.1.3.1",
        "1.2.840.10008.5.1.4.1.1.6",
        "1.2.840.10008.5.1.4.1.1.3",
    ),
    "NM": ("1.2.840.10008.5.1.4.1.1.20",),
    "PT": ("1.2.840.10008.5.1.4.1.1.128", "1.2.840.10008.5.1.4.1.1.130"),
    "XA": ("1.2.840.10008.5.1.4.1.1.12.1", "1.2.840.10008.5.1.4.1.1.12.1.1"),
    "RF": ("1.2.840.10008.5.1.4.1.1.12.2",),
    "SR": ("1.2.840.10008.5.1.4.1.1.88.11", "1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.33"),
}


def likely_storage_classes(modality: str) -> tuple[str, ...]:
    """Storage SOP classes to propose for a series of ``modality`` whose
    instances' classes the census could not learn."""
    return (*LIKELY_STORAGE_CLASSES.get(modality.upper(), ()), _SECONDARY_CAPTURE)


def retrieve_syntaxes(uncompressed_only: bool) -> tuple[str, ...]:
    """What we accept on retrieval: everything as stored, or only uncompressed
    (the source must then decompress)."""
    return UNCOMPRESSED_TRANSFER_SYNTAXES if uncompressed_only else RETRIEVE_TRANSFER_SYNTAXES


def storage_contexts(
    sop_class_uids: Iterable[str],
    syntaxes: tuple[str, ...] = RETRIEVE_TRANSFER_SYNTAXES,
) -> list[tuple[str, str]]:
    """(SOP class, transfer syntax) pairs to propose for C-GET's C-STOREs.

    One context per pair; when many SOP classes would exceed the 127-context
    limit, compressed syntaxes are dropped first for the extra classes.
    """
    classes = sorted(set(sop_class_uids))
    budget = _MAX_CONTEXTS - 1  # one for the Get model itself
    per_class = max(min(3, len(syntaxes)), min(len(syntaxes), budget // max(1, len(classes))))
    pairs = [(c, ts) for c in classes for ts in syntaxes[:per_class]]
    if len(pairs) > budget:
        raise ValueError(f"{len(classes)} SOP classes in one retrieve exceed the presentation-context limit")
    return pairs


def _failed_uids(identifier: Dataset | None) -> tuple[str, ...]:
    """The Failed SOP Instance UID List of a final response, if the peer sent one."""
    if identifier is None or "FailedSOPInstanceUIDList" not in identifier:
        return ()
    value = identifier.FailedSOPInstanceUIDList
    values = [value] if isinstance(value, str) else list(value or ())
    return tuple(str(v) for v in values if v)


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
    for sop_class, ts in storage_contexts(classes, retrieve_syntaxes(source.request_uncompressed)):
        ae.add_requested_context(sop_class, ts)
    roles = [build_role(UID(c), scp_role=True) for c in classes]
    assoc = _associate(ae, source, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, sink.handle_store)])
    final: int | None = None
    counts = {"completed": 0, "failed": 0, "warning": 0}
    failed_uids: tuple[str, ...] = ()
    try:
        for status, ident in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet):
            if not status:
                break  # DIMSE timeout or abort: raised below; what arrived stays in the sink
            code = int(status.Status)
            if on_response:
                on_response(code)
            if code in (0xFF00, 0xFF01):
                continue
            final = code
            counts["completed"] = int(status.get("NumberOfCompletedSuboperations", 0) or 0)
            counts["failed"] = int(status.get("NumberOfFailedSuboperations", 0) or 0)
            counts["warning"] = int(status.get("NumberOfWarningSuboperations", 0) or 0)
            failed_uids = _failed_uids(ident)
    finally:
        if assoc.is_established:
            assoc.release()
    if final is None:
        raise DicomNetworkError("C-GET ended without a final response (DIMSE timeout or association aborted)")
    return RetrieveOutcome(final, counts["completed"], counts["failed"], counts["warning"], failed_uids)


class StorageListener:
    """Our Storage SCP, the destination of C-MOVE: accepts every storage SOP
    class in every transfer syntax and delivers into the current sink.

    The PACS knows this AE at a fixed host/port, so one listener serves one
    partition task at a time; what arrives is reconciled against the census by
    the caller (anything unasked is quarantined ``UNSOLICITED``).
    """

    def __init__(
        self,
        ae_title: str,
        host: str = "127.0.0.1",
        port: int = 11112,
        max_pdu: int = 131072,
        uncompressed_only: bool = False,
    ) -> None:
        configure_logging()
        ae = AE(ae_title=ae_title)
        ae.maximum_pdu_size = max_pdu
        ae.network_timeout = 60
        ae.dimse_timeout = 60
        syntaxes = list(UNCOMPRESSED_TRANSFER_SYNTAXES) if uncompressed_only else ALL_TRANSFER_SYNTAXES
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cast(str, cx.abstract_syntax), syntaxes)
        self.sink: StagingSink | None = None
        self.active = 0
        self._lock = threading.Lock()
        server = ae.start_server(
            (host, port),
            block=False,
            evt_handlers=[
                (evt.EVT_C_STORE, self._on_store),
                (evt.EVT_ESTABLISHED, self._on_open),
                (evt.EVT_RELEASED, self._on_close),
                (evt.EVT_ABORTED, self._on_close),
            ],
        )
        assert server is not None  # block=False returns the server
        self.server = server
        self.port = server.server_address[1]

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
        return sink.handle_store(event)

    def settle(self, sink: StagingSink, expect_arrivals: int, limit: float = 30.0) -> None:
        """Wait for stores still in flight after the C-MOVE's final response:
        some PACS report success before their sub-associations finish. Returns
        once ``sink`` has seen ``expect_arrivals`` stores (duplicates included)
        and no store association is open, or after ``limit`` seconds. What is
        still missing then is fetched again by the caller."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            with self._lock:
                busy = self.active > 0
            if not busy and sink.arrivals >= expect_arrivals:
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
        before = sink.arrivals
        ae = _new_ae(self.source)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = _associate(ae, self.source)
        final: int | None = None
        counts = {"completed": 0, "failed": 0, "warning": 0}
        failed_uids: tuple[str, ...] = ()
        try:
            for status, ident in assoc.send_c_move(
                identifier, self.move_ae_title, StudyRootQueryRetrieveInformationModelMove
            ):
                if not status:
                    break
                code = int(status.Status)
                if code in (0xFF00, 0xFF01):
                    continue
                final = code
                for k in counts:
                    counts[k] = int(status.get(f"NumberOf{k.capitalize()}Suboperations", 0) or 0)
                failed_uids = _failed_uids(ident)
        finally:
            if assoc.is_established:
                assoc.release()
        # The peer's counters only tell how long to wait; completion is decided
        # by reconciling UIDs (retrieve.py).
        self.listener.settle(sink, before + counts["completed"] + counts["warning"], self.source.move_settle_timeout)
        if final is None:
            raise DicomNetworkError("C-MOVE ended without a final response (DIMSE timeout or association aborted)")
        return RetrieveOutcome(final, counts["completed"], counts["failed"], counts["warning"], failed_uids)


@contextlib.contextmanager
def retriever(source: SourceConfig) -> Iterator[Callable[[Dataset, Iterable[str], StagingSink], RetrieveOutcome]]:
    """The retrieve function the configuration asks for: C-GET, or C-MOVE to a
    Storage SCP listening for the duration of the block."""
    if source.retrieve_method == "C-MOVE":
        ae_title = source.move_ae_title or source.calling_ae_title
        listener = StorageListener(
            ae_title, source.move_listen_host, source.move_listen_port, source.max_pdu, source.request_uncompressed
        )
        try:
            yield MoveRetriever(source, listener, ae_title)
        finally:
            listener.stop()
    else:
        yield lambda identifier, classes, sink: c_get(source, identifier, classes, sink)
