"""The census's C-FIND client (Study Root), on our own Upper Layer
(:mod:`.upper_layer`): :func:`find` on its own association,
:class:`FindSession` over the associations it keeps."""

from __future__ import annotations

import struct
import threading
from io import BytesIO

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag

from ..config import SourceConfig
from .association import TRUNCATION_STATUSES, DicomNetworkError, QueryFailed, QueryTruncated, with_attempts
from .command import (
    C_FIND_RQ,
    C_FIND_RSP,
    COMMAND_FIELD,
    MESSAGE_ID_RESPONDED_TO,
    PENDING,
    STATUS,
    command_fields,
    encode,
    has_data_set,
    request,
    us,
)
from .upper_layer import EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN, UpperLayer

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_EXPLICIT = struct.Struct("<HH2sH")
_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI"})


class _NotFlat(Exception):
    pass


def _flat(data: bytes) -> Dataset:
    """An explicit VR little endian identifier of plain elements, each left raw
    until read; :class:`_NotFlat` at a sequence, an undefined length or a short buffer."""
    elements: dict[BaseTag, DataElement | RawDataElement] = {}
    at, end = 0, len(data)
    while at < end:
        if at + 8 > end:
            raise _NotFlat
        group, element, vr, length = _EXPLICIT.unpack_from(data, at)
        start = at + 8
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<L", data, start) if start + 4 <= end else (0xFFFFFFFF,)
            start += 4
        if vr == b"SQ" or group == 0xFFFE or length == 0xFFFFFFFF or start + length > end:
            raise _NotFlat
        tag = BaseTag(group << 16 | element)
        value = data[start : start + length]
        elements[tag] = RawDataElement(tag, vr.decode("ascii"), length, value, start, False, True)
        at = start + length
    return Dataset(elements)


def decode_identifier(data: bytes, implicit: bool) -> Dataset:
    """A C-FIND answer's identifier. A census reads tens of thousands of them:
    the flat ones (explicit VR, no sequence: what PACSs answer) are split here in
    a quarter of pydicom's time; pydicom's reader takes the rest."""
    if not implicit:
        try:
            return _flat(data)
        except (_NotFlat, UnicodeDecodeError):
            pass
    return read_dataset(BytesIO(data), implicit, True)


def answer_text(answer: Dataset, tag: int) -> str:
    """An answer's element as text. A UID, code string or number of one value
    is read from its raw bytes (ASCII, PS3.5 6.2): pydicom's conversion of a
    value costs more than decoding the whole answer. Anything else is converted."""
    element = answer.get_item(tag)
    if element is None:
        return ""
    raw = element.value
    if isinstance(element, RawDataElement) and element.VR in _ASCII_VRS and isinstance(raw, bytes) and b"\\" not in raw:
        return raw.decode("ascii", "replace").strip("\0 ")
    value = answer[tag].value
    return "" if value is None else str(value)


def _open_find_association(source: SourceConfig) -> UpperLayer:
    syntaxes = [EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN]
    return with_attempts(source, lambda: UpperLayer.open(source, STUDY_ROOT_FIND, syntaxes))


def _c_find(assoc: UpperLayer, identifier: Dataset, message_id: int = 1) -> list[Dataset]:
    implicit = assoc.transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
    assoc.send(request(C_FIND_RQ, STUDY_ROOT_FIND, message_id), encode(identifier, implicit))
    answers: list[Dataset] = []
    while True:
        fields = command_fields(assoc.receive(command=True))
        if us(fields, COMMAND_FIELD) != C_FIND_RSP or us(fields, MESSAGE_ID_RESPONDED_TO) != message_id:
            assoc.abort()
            raise DicomNetworkError("the peer sent a message that is not this C-FIND's response")
        status = us(fields, STATUS)
        data = assoc.receive(command=False) if has_data_set(fields) else None
        if status in PENDING:
            if data is not None:
                answers.append(decode_identifier(data, implicit))
            continue
        if status is None:
            assoc.abort()
            raise DicomNetworkError("the peer sent a C-FIND response without a status")
        break
    if status in TRUNCATION_STATUSES:
        raise QueryTruncated(status, answers)
    if status != 0x0000:
        raise QueryFailed(status)
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
    """The census's C-FIND client: its associations are kept for the next query
    (opening one per query cost 5x the query itself against a PACS that answers
    promptly). A query takes an idle one, or opens one: never more at once than
    queries asked at once. A query whose kept association broke (the PACS
    closed it while idle) is asked once more on a new one: C-FIND changes nothing.
    """

    def __init__(self, source: SourceConfig) -> None:
        self.source = source
        self._lock = threading.Lock()
        self._idle: list[UpperLayer] = []

    def __enter__(self) -> FindSession:
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for assoc in idle:
            if assoc.is_established:
                assoc.release()

    def _take(self) -> tuple[UpperLayer, bool]:
        """An idle association, else a new one; and whether it is new."""
        with self._lock:
            while self._idle:
                assoc = self._idle.pop()
                if assoc.is_established and not assoc.readable():
                    return assoc, False
                assoc.abort()  # the peer spoke while it was idle: released, aborted or closed
        return _open_find_association(self.source), True

    def _ask(self, assoc: UpperLayer, identifier: Dataset) -> list[Dataset]:
        try:
            return _c_find(assoc, identifier, assoc.next_message_id())
        except DicomNetworkError:
            if assoc.is_established:
                assoc.abort()
            raise
        finally:
            if assoc.is_established:
                with self._lock:
                    self._idle.append(assoc)

    def find(self, identifier: Dataset) -> list[Dataset]:
        """As :func:`find`, over a kept association."""
        assoc, new = self._take()
        try:
            return self._ask(assoc, identifier)
        except DicomNetworkError:
            if new:
                raise
        return self._ask(_open_find_association(self.source), identifier)
