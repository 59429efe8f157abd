"""C-GET: the storage sub-operations arrive on the retrieve association."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # generated at import: mypy cannot see them
    StudyRootQueryRetrieveInformationModelGet,
)

from ..config import SourceConfig
from .association import DicomNetworkError, associate, new_ae
from .staging import StagingSink

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
    ae = new_ae(source)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    classes = sorted(set(sop_class_uids))
    for sop_class, ts in storage_contexts(classes, retrieve_syntaxes(source.request_uncompressed)):
        ae.add_requested_context(sop_class, ts)
    roles = [build_role(UID(c), scp_role=True) for c in classes]
    assoc = associate(ae, source, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, sink.handle_store)])
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
            failed_uids = failed_sop_instance_uids(ident)
    finally:
        if assoc.is_established:
            assoc.release()
    if final is None:
        raise DicomNetworkError("C-GET ended without a final response (DIMSE timeout or association aborted)")
    return RetrieveOutcome(final, counts["completed"], counts["failed"], counts["warning"], failed_uids)
