"""C-MOVE: this task's side of the worker's shared Storage SCP (:mod:`router`);
and the retrieve function the configuration asks for."""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import logging
import os
import queue
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # generated at import: mypy cannot see them
    StudyRootQueryRetrieveInformationModelMove,
)

from ..config import SourceConfig
from .association import DicomNetworkError, associate, new_ae
from .get import RetrieveOutcome, c_get, failed_sop_instance_uids
from .router import control_address
from .staging import StagingSink

log = logging.getLogger(__name__)
_ROOT = Path(__file__).resolve().parents[3]  # holds the ``include`` package: the router's import path


class RouterClient:
    """This task's registration with the worker's C-MOVE router (started here
    if none runs): stores routed to this task are fed into the current sink."""

    def __init__(
        self,
        source: SourceConfig,
        staging_root: Path,
        start_timeout: float = 20.0,
        idle_seconds: float = 30.0,
        on_alert: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.source = source
        self.on_alert = on_alert  # security alerts the listener relays (refused peers and stores)
        self.sink: StagingSink | None = None
        self._studies: set[str] = set()
        self._calls = threading.Lock()
        self.routed: collections.Counter[str] = collections.Counter()  # how the router found us: id, study, unrouted
        for attempt in (1, 2):  # a router stopping as we connect: start another
            self.sock = _connect_or_start(source, staging_root, start_timeout, idle_seconds)
            self.broken = False
            self._replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
            # The reader holds this attempt's socket and queue: a late one must not touch the next attempt's.
            self._reader = threading.Thread(target=self._read, args=(self.sock, self._replies), daemon=True)
            self._reader.start()
            try:
                self.msg_id = int(self._call({"op": "register"})["msg_id"])
                return
            except DicomNetworkError:
                self.close()
                if attempt == 2:
                    raise

    def _call(self, message: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        with self._calls:  # retrieve threads share the connection: one request at a time
            try:
                self.sock.sendall((json.dumps(message) + "\n").encode())
                reply = self._replies.get(timeout=timeout)
            except (OSError, queue.Empty):  # a broken pipe, a reset, no answer: the router stopped
                reply = None
        if reply is None:
            raise DicomNetworkError("the worker's C-MOVE router did not answer (it stopped?)")
        return reply

    def expect(self, sink: StagingSink, study_uids: Iterable[str]) -> None:
        """Route what arrives with our message ID, or for these studies (and
        those named before for the same sink: retrieve threads share it), into ``sink``."""
        if sink is not self.sink:
            self.sink, self._studies = sink, set()
        self._studies.update(u for u in study_uids if u)
        self._call({"op": "expect", "folder": str(sink.folder), "study_uids": sorted(self._studies)})

    def _read(self, sock: socket.socket, replies: queue.Queue[dict[str, Any] | None]) -> None:
        try:
            for line in sock.makefile("r", encoding="utf-8"):
                msg = json.loads(line)
                if "reply" in msg:
                    replies.put(msg)
                elif "store" in msg:
                    self._stage(msg)
                elif msg.get("full") and self.sink is not None:
                    self.sink.full = True
                elif "warning" in msg:
                    log.warning("C-MOVE router: %s", msg["warning"])
                elif "alert" in msg:
                    self._alert(msg["alert"])
        except (OSError, ValueError):
            pass
        finally:
            if sock is self.sock:
                self.broken = True
            replies.put(None)

    def _alert(self, alert: dict[str, Any]) -> None:
        log.warning("C-MOVE listener: %s (calling AE %s)", alert.get("why"), alert.get("calling_ae") or "?")
        if self.on_alert is not None:
            self.on_alert(alert)

    def _stage(self, msg: dict[str, str]) -> None:
        path, sink = Path(msg["store"]), self.sink
        self.routed[msg.get("routed", "")] += 1
        if sink is None:
            path.unlink(missing_ok=True)
            return
        try:
            sink.store_file(msg["sop_instance_uid"], msg["sop_class_uid"], msg["transfer_syntax"], path)
        except OSError as exc:
            sink.full = sink.full or exc.errno == errno.ENOSPC
            log.error("failed to stage a routed instance (%s)", type(exc).__name__)

    def settle(self, sink: StagingSink, expect_arrivals: int, limit: float) -> None:
        """Wait for stores still in flight after the C-MOVE's final response
        (some PACS answer before their sub-associations finish) until ``sink``
        has seen ``expect_arrivals`` stores or ``limit`` seconds pass; what is
        still missing then is fetched again by the caller."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and sink.arrivals < expect_arrivals and not self.broken:
            time.sleep(0.02)

    def close(self) -> None:
        if self.routed:
            log.info(
                "C-MOVE router: %d store(s) routed to this task by message ID, %d by study, %d unrouted",
                self.routed["id"],
                self.routed["study"],
                self.routed["unrouted"],
            )
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._reader.join(timeout=5)


def _connect(address: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(address)
        return sock
    except OSError:
        sock.close()
        return None


def _connect_or_start(source: SourceConfig, staging_root: Path, timeout: float, idle_seconds: float) -> socket.socket:
    """Connect to the router of ``move_listen_host:port``, starting it if none runs."""
    host, port = source.move_listen_host, source.move_listen_port
    address = control_address(host, port)
    if (sock := _connect(address)) is not None:
        return sock
    args = {
        "ae_title": source.move_ae_title or source.calling_ae_title,
        "host": host,
        "port": port,
        "staging_root": str(staging_root),
        "max_pdu": source.max_pdu,
        "uncompressed_only": source.request_uncompressed,
        "idle_seconds": idle_seconds,
        # Only the source may deliver, only for moves we asked for, over TLS when the source uses it.
        "peer_ae": source.called_ae_title,
        "originator_ae": source.calling_ae_title,
        "tls": _listener_tls(source),
    }
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "include.pacs_migration.dimse.router", json.dumps(args)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # it says why it cannot start on stdout
        env=env,
        start_new_session=True,  # outlives this task: the next task on the worker uses it
        text=True,
    )
    said = _first_line(proc, timeout)
    if said not in ("ready", "running"):
        why = said or f"no answer (exit code {proc.poll()})"
        raise DicomNetworkError(f"the C-MOVE destination {host}:{port} could not start: {why}")
    deadline = time.monotonic() + timeout
    while (sock := _connect(address)) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if sock is None:
        raise DicomNetworkError(f"the C-MOVE router of {host}:{port} did not accept a connection")
    return sock


def _listener_tls(source: SourceConfig) -> dict[str, str] | None:
    tls = source.tls
    if tls is None:
        return None
    if tls.cert_file is None or tls.key_file is None:  # the config refuses this; a guard for callers that build one
        raise DicomNetworkError("C-MOVE over TLS needs source.tls.cert_file and key_file (our listener's certificate)")
    return {"ca_file": str(tls.ca_file), "cert_file": str(tls.cert_file), "key_file": str(tls.key_file)}


def _first_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline().strip() if ready else ""
    proc.stdout.close()
    if not ready:
        proc.kill()
    return line


class MoveRetriever:
    """A :data:`retrieve.GetFn` that retrieves by C-MOVE to the worker's
    shared Storage SCP, its requests carrying this task's message ID."""

    def __init__(self, source: SourceConfig, router: RouterClient) -> None:
        self.source = source
        self.router = router
        self.move_ae_title = source.move_ae_title or source.calling_ae_title

    def __call__(self, identifier: Dataset, sop_class_uids: Iterable[str], sink: StagingSink) -> RetrieveOutcome:
        self.router.expect(sink, [str(identifier.get("StudyInstanceUID", ""))])
        before = sink.arrivals
        ae = new_ae(self.source)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = associate(ae, self.source)
        final: int | None = None
        counts = {"completed": 0, "failed": 0, "warning": 0}
        failed_uids: tuple[str, ...] = ()
        try:
            for status, ident in assoc.send_c_move(
                identifier, self.move_ae_title, StudyRootQueryRetrieveInformationModelMove, msg_id=self.router.msg_id
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
        self.router.settle(sink, before + counts["completed"] + counts["warning"], self.source.move_settle_timeout)
        if final is None:
            raise DicomNetworkError("C-MOVE ended without a final response (DIMSE timeout or association aborted)")
        return RetrieveOutcome(final, counts["completed"], counts["failed"], counts["warning"], failed_uids)


@contextlib.contextmanager
def retriever(
    source: SourceConfig, staging_root: Path, on_alert: Callable[[dict[str, Any]], None] | None = None
) -> Iterator[Callable[[Dataset, Iterable[str], StagingSink], RetrieveOutcome]]:
    """The retrieve function the configuration asks for: C-GET, or C-MOVE to
    the worker's shared Storage SCP, registered for the duration of the block
    (``on_alert``: what the listener refused, for the audit trail)."""
    if source.retrieve_method == "C-MOVE":
        router = RouterClient(source, staging_root, on_alert=on_alert)
        try:
            yield MoveRetriever(source, router)
        finally:
            router.close()
    else:
        yield lambda identifier, classes, sink: c_get(source, identifier, classes, sink)
