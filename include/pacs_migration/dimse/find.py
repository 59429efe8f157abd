"""The census's C-FIND client (Study Root): :func:`find` on its own association,
:class:`FindSession` over the associations it keeps (one per query asked at once)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # generated at import: mypy cannot see them
    StudyRootQueryRetrieveInformationModelFind,
)

from ..config import SourceConfig
from .association import TRUNCATION_STATUSES, DicomNetworkError, QueryFailed, QueryTruncated, associate, new_ae

log = logging.getLogger(__name__)


def _open_find_association(source: SourceConfig):
    ae = new_ae(source)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    return associate(ae, source)


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


def _pause_reactor(assoc, timeout_s: float) -> None:
    """Hold the association's reactor thread before a request, for certain.

    pynetdicom 3.0 pauses it by clearing an Event and polling a flag the reactor
    sets just *before* it waits on that Event: a reactor already past the wait
    takes the first response off the queue as an unexpected request and drops it
    ("Received unexpected C-FIND service message", pynetdicom #875): an answer
    lost. Measured over one association under CPU load: 26 of 2,160 queries lost
    one that way, none after this. The reactor is held once it waits on the Event.
    """
    checkpoint = assoc._reactor_checkpoint
    checkpoint.clear()
    deadline = time.monotonic() + timeout_s
    while not checkpoint._cond._waiters:  # the reactor thread blocked in checkpoint.wait()
        if not assoc.is_established or time.monotonic() > deadline:
            raise DicomNetworkError("the association's reactor did not pause (released or aborted)")
        time.sleep(0.0001)


class FindSession:
    """The census's C-FIND client: its associations are kept for the next query
    (opening one per query cost 5x the query itself against a PACS that answers
    promptly). A query takes an idle one, or opens one: never more at once than
    queries asked at once. Each query first holds the association's reactor
    (:func:`_pause_reactor`). A query whose kept association broke (the PACS
    closed it while idle) is asked once more on a new one: C-FIND changes nothing.
    """

    def __init__(self, source: SourceConfig) -> None:
        self.source = source
        self._lock = threading.Lock()
        self._idle: list[Any] = []

    def __enter__(self) -> FindSession:
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for assoc in idle:
            if assoc.is_established:
                assoc.release()

    def _take(self) -> tuple[Any, bool]:
        """An idle association, else a new one; and whether it is new."""
        with self._lock:
            while self._idle:
                assoc = self._idle.pop()
                if assoc.is_established:
                    return assoc, False
        return _open_find_association(self.source), True

    def _ask(self, assoc: Any, identifier: Dataset) -> list[Dataset]:
        try:
            _pause_reactor(assoc, self.source.dimse_timeout)
            return _c_find(assoc, identifier)
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
