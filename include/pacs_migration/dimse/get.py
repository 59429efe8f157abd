"""C-GET on our own Upper Layer (:mod:`.upper_layer`): the storage
sub-operations arrive on the retrieve association and are streamed into
staging fragment by fragment, hashed as they are written."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from pydicom.dataset import Dataset

from ..config import SourceConfig
from .association import DicomNetworkError, with_attempts
from .command import (
    AFFECTED_SOP_CLASS_UID,
    AFFECTED_SOP_INSTANCE_UID,
    C_GET_RQ,
    C_GET_RSP,
    C_STORE_RQ,
    COMMAND_FIELD,
    COMPLETED,
    FAILED,
    MESSAGE_ID,
    MESSAGE_ID_RESPONDED_TO,
    PENDING,
    STATUS,
    WARNING,
    c_store_rsp,
    decode,
    encode,
    has_data_set,
    part10_header,
    request,
    split_command,
    ui,
    us,
)
from .upper_layer import EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN, UpperLayer

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
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
_NO_DATA = 0xA900  # C-STORE status: the request carried no data set (Data Set does not match SOP Class)


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


def failed_sop_instance_uids(identifier: Dataset | None) -> tuple[str, ...]:
    """The Failed SOP Instance UID List of a final response, if the peer sent one."""
    if identifier is None or "FailedSOPInstanceUIDList" not in identifier:
        return ()
    value = identifier.FailedSOPInstanceUIDList
    values = [value] if isinstance(value, str) else list(value or ())
    return tuple(str(v) for v in values if v)


class StoreSink(Protocol):
    """Where C-GET's instances go (:class:`StagingSink`; the DICOMweb fallback's memory)."""

    def store_stream(
        self, sop_instance_uid: str, sop_class_uid: str, transfer_syntax: str, chunks: Iterable[bytes | memoryview]
    ) -> int:
        """Take every chunk of one instance (its Part 10 header first); the C-STORE status."""
        ...


def c_get(
    source: SourceConfig,
    identifier: Dataset,
    sop_class_uids: Iterable[str],
    sink: StoreSink,
    on_response: Callable[[int], None] | None = None,
) -> RetrieveOutcome:
    """One Study Root C-GET; instances land in ``sink``.

    Raises
    ------
    DicomNetworkError
        When no association could be made, or it broke before the final response
        (what arrived stays in the sink).
    """
    classes = sorted(set(sop_class_uids))
    storage = storage_contexts(classes, retrieve_syntaxes(source.request_uncompressed))
    contexts = [(STUDY_ROOT_GET, [EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN])]
    contexts += [(sop_class, [ts]) for sop_class, ts in storage]
    assoc = with_attempts(source, lambda: UpperLayer.open_contexts(source, contexts, scp_roles=classes))
    try:
        return _c_get(assoc, identifier, sink, on_response)
    finally:
        if assoc.is_established:
            assoc.release()


def _c_get(
    assoc: UpperLayer, identifier: Dataset, sink: StoreSink, on_response: Callable[[int], None] | None
) -> RetrieveOutcome:
    message_id = assoc.next_message_id()
    implicit = assoc.transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
    assoc.send(request(C_GET_RQ, STUDY_ROOT_GET, message_id), encode(identifier, implicit))
    while True:
        context_id, command = assoc.receive_command()
        fields, appended = split_command(command)
        if us(fields, COMMAND_FIELD) == C_STORE_RQ:
            _store(assoc, context_id, fields, sink)
            continue
        if us(fields, COMMAND_FIELD) != C_GET_RSP or us(fields, MESSAGE_ID_RESPONDED_TO) != message_id:
            assoc.abort()
            raise DicomNetworkError("the peer sent a message that is neither a C-STORE nor this C-GET's response")
        data = assoc.receive(command=False) if has_data_set(fields) else None
        status = us(fields, STATUS)
        if status is None:
            assoc.abort()
            raise DicomNetworkError("the peer sent a C-GET response without a status")
        if on_response:
            on_response(status)
        if status in PENDING:
            continue
        failed = _failed_uids(data, implicit) if data else _failed_uids(appended, True) if appended else ()
        counts = [us(fields, e) or 0 for e in (COMPLETED, FAILED, WARNING)]
        return RetrieveOutcome(status, counts[0], counts[1], counts[2], failed)


def _store(assoc: UpperLayer, context_id: int, fields: dict[int, bytes], sink: StoreSink) -> None:
    """One C-STORE sub-operation: staged as it arrives, then answered on its context."""
    transfer_syntax = assoc.contexts.get(context_id)
    if transfer_syntax is None or context_id == 1:
        assoc.abort()
        raise DicomNetworkError("the peer sent a C-STORE on a presentation context not accepted for storage")
    sop_class, uid = ui(fields, AFFECTED_SOP_CLASS_UID), ui(fields, AFFECTED_SOP_INSTANCE_UID)
    if not has_data_set(fields):
        status = _NO_DATA
    else:
        fragments = assoc.receive_fragments()
        try:
            chunks = itertools.chain([memoryview(part10_header(sop_class, uid, transfer_syntax))], fragments)
            status = sink.store_stream(uid, sop_class, transfer_syntax, chunks)
        except DicomNetworkError:
            raise
        except Exception as exc:  # a staging error must not break the association
            # The class only: a message can quote a value of the instance.
            log.error("failed to stage a received instance (%s)", type(exc).__name__)
            for _ in fragments:  # whatever the sink left untaken
                pass
            status = 0xA700
    assoc.send(c_store_rsp(us(fields, MESSAGE_ID) or 0, sop_class, uid, status), None, context_id)


def _failed_uids(data: bytes, implicit: bool) -> tuple[str, ...]:
    """The final response's Failed SOP Instance UID List; none from an identifier
    that does not decode (the retrieve reconciles by UID whatever the peer says)."""
    try:
        return failed_sop_instance_uids(decode(data, implicit))
    except Exception:
        return ()
