"""C-MOVE: our Storage SCP receives what the PACS sends; and the retrieve
function the configuration asks for."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import cast

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # generated at import: mypy cannot see them
    StudyRootQueryRetrieveInformationModelMove,
)

from ..config import SourceConfig
from ..logs import configure_logging
from .association import DicomNetworkError, associate, new_ae, nodelay
from .get import UNCOMPRESSED_TRANSFER_SYNTAXES, RetrieveOutcome, c_get, failed_sop_instance_uids
from .staging import StagingSink

log = logging.getLogger(__name__)


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
        ae = new_ae(self.source)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = associate(ae, self.source)
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
                failed_uids = failed_sop_instance_uids(ident)
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
