"""The C-MOVE destination of a worker: one Storage SCP per host and port,
shared by every transfer task on the worker.

The PACS knows our AE at one fixed host/port, but a worker runs several
partition tasks at once, each in its own process. The first task that needs
the port starts this router (a detached process); every task registers with it
over a local control socket and gets a Move Originator Message ID of its own,
which it puts on its C-MOVE requests. Each arriving C-STORE is routed to its
task by that ID (the PACS copies it onto the sub-operations), else by the
Study Instance UID the task said it is moving, else to the oldest registered
task, whose reconciliation quarantines it ``UNSOLICITED``. With no task
registered, a store is refused. The router exits when no task has been
registered for ``idle_seconds``.

The control socket is an abstract Unix socket (no file to leave behind) that
accepts only processes of our own user. Received files land in the task's
staging folder; the router's own temporary files live in a folder under the
staging root, marked with the router's pid so the staging sweep removes it if
the router dies.
"""

from __future__ import annotations

import errno
import functools
import itertools
import json
import logging
import os
import random
import shutil
import socket
import ssl
import struct
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from pydicom import dcmread
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.dimse_primitives import C_STORE

from ..logs import configure_logging
from .association import nodelay
from .get import UNCOMPRESSED_TRANSFER_SYNTAXES

log = logging.getLogger(__name__)

REFUSED = 0xA700  # Out of resources: nothing is waiting for this store, or it could not be staged
NOT_AUTHORIZED = 0x0124  # Refused: not authorized (a store moved for someone else)
HANDSHAKE_SECONDS = 10.0


def control_address(host: str, port: int) -> str:
    """The abstract socket of the router listening on ``host:port``."""
    return f"\0pacs-migration-move-router/{host}/{port}"


def temp_folder(staging_root: Path, port: int) -> Path:
    return staging_root / f".move-router-{port}"


@dataclass(eq=False)
class _Registration:
    msg_id: int
    conn: socket.socket
    created: float = field(default_factory=time.monotonic)
    folder: Path | None = None
    study_uids: frozenset[str] = frozenset()
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, message: dict[str, Any]) -> bool:
        data = (json.dumps(message) + "\n").encode()
        with self.lock:
            try:
                self.conn.sendall(data)
                return True
            except OSError:
                return False


class RouterRunning(Exception):
    """Another router already serves this host and port."""


class MoveRouter:
    """The router process's state: the Storage SCP and the registered tasks."""

    def __init__(
        self,
        ae_title: str,
        host: str,
        port: int,
        staging_root: Path,
        max_pdu: int = 131072,
        uncompressed_only: bool = False,
        idle_seconds: float = 30.0,
        peer_ae: str | None = None,
        originator_ae: str | None = None,
        tls: dict[str, str] | None = None,
    ) -> None:
        configure_logging()
        self.peer_ae, self.originator_ae, self.tls = peer_ae, originator_ae, tls
        self.idle_seconds = idle_seconds
        self.control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.control.bind(control_address(host, port))
        except OSError as exc:
            self.control.close()
            if exc.errno == errno.EADDRINUSE:
                raise RouterRunning from exc
            raise
        self.control.listen(64)
        self.temp = temp_folder(staging_root, port)
        shutil.rmtree(self.temp, ignore_errors=True)  # what a dead router left
        self.temp.mkdir(parents=True)
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        (self.temp / ".owner").write_text(json.dumps(owner))
        tempfile.tempdir = str(self.temp)  # pynetdicom's streamed receive
        _config.STORE_RECV_CHUNKED_DATASET = True
        self._regs: dict[int, _Registration] = {}
        self._sessions = 0  # control connections open, registered or not
        self._lock = threading.Lock()
        self._ids = itertools.count(random.randint(1, 60000))
        self._names = itertools.count(1)
        self._last_busy = time.monotonic()
        try:
            self.server = self._start_scp(ae_title, host, port, max_pdu, uncompressed_only)
        except BaseException:
            self.control.close()
            shutil.rmtree(self.temp, ignore_errors=True)
            raise

    def _start_scp(self, ae_title: str, host: str, port: int, max_pdu: int, uncompressed_only: bool) -> Any:
        ae = AE(ae_title=ae_title)
        ae.maximum_pdu_size = max_pdu
        ae.network_timeout = 60
        ae.dimse_timeout = 60
        if self.peer_ae:  # only the PACS we retrieve from may associate
            ae.require_calling_aet = [self.peer_ae]
        syntaxes = list(UNCOMPRESSED_TRANSFER_SYNTAXES) if uncompressed_only else ALL_TRANSFER_SYNTAXES
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cast(str, cx.abstract_syntax), syntaxes)
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ESTABLISHED, lambda e: nodelay(e.assoc)),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        server: Any = ae.start_server((host, port), block=False, evt_handlers=handlers, ssl_context=self._tls_context())
        if server.ssl_context is not None:
            server.get_request = functools.partial(_tls_request, server, self._alert)
        return server

    def _tls_context(self) -> ssl.SSLContext | None:
        """DICOM TLS as the source uses it: our certificate, and the PACS's
        client certificate required and verified against the same CA."""
        if not self.tls:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=self.tls["ca_file"])
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_cert_chain(self.tls["cert_file"], self.tls["key_file"])
        return ctx

    # -- security alerts -----------------------------------------------------

    def _alert(self, calling_ae: str | None, address: str | None, why: str) -> None:
        """Tell the oldest registered task (it records a DICOM security alert);
        with none registered, the router's log says it (no patient data in it)."""
        with self._lock:
            regs = sorted(self._regs.values(), key=lambda r: r.created)
        alert = {"calling_ae": calling_ae, "address": address, "why": why}
        if not (regs and regs[0].send({"alert": alert})):
            log.warning("C-MOVE listener refused %s from %s: %s", calling_ae or "a peer", address or "?", why)

    def _on_rejected(self, event: evt.Event) -> None:
        calling = str(getattr(event.assoc.requestor, "ae_title", "") or "").strip()
        self._alert(
            calling, event.assoc.requestor.address, f"association refused: calling AE {calling!r} is not the source"
        )

    def _originator_refused(self, req: C_STORE, event: evt.Event) -> bool:
        """A store naming a Move Originator other than us was not moved for us.
        The source's own title passes too: some PACS (pynetdicom's move SCP
        among them) name themselves there instead of the C-MOVE's requestor."""
        origin = getattr(req, "MoveOriginatorApplicationEntityTitle", None)
        origin = str(origin).strip() if origin else ""
        if not origin or not self.originator_ae or origin in (self.originator_ae, self.peer_ae):
            return False
        calling = str(event.assoc.requestor.ae_title or "").strip()
        self._alert(calling, event.assoc.requestor.address, f"store refused: Move Originator {origin!r} is not us")
        return True

    # -- control connections -------------------------------------------------

    def serve(self) -> None:
        """Accept tasks until idle for ``idle_seconds``; then stop."""
        self.control.settimeout(0.5)
        with self._lock:
            self._last_busy = time.monotonic()  # idle from now: starting may have taken longer than idle_seconds
        try:
            while True:
                try:
                    conn, _ = self.control.accept() if not self._idle() else self._pending()
                except TimeoutError:
                    continue
                if conn is None:
                    return
                if not _same_user(conn):
                    conn.close()
                    continue
                with self._lock:
                    self._sessions += 1  # counted before the next idle check
                threading.Thread(target=self._session, args=(conn,), daemon=True).start()
        finally:
            self.server.shutdown()
            shutil.rmtree(self.temp, ignore_errors=True)
            self.control.close()  # last: a new router can start once this one is gone

    def _idle(self) -> bool:
        """No task connected, registered or not (a task that has connected and not yet
        registered is busy: stopping then would break its first request)."""
        with self._lock:  # a registration lives as long as its connection: sessions count both
            return not self._sessions and time.monotonic() - self._last_busy > self.idle_seconds

    def _pending(self) -> tuple[socket.socket | None, Any]:
        """A connection already waiting when idle time ran out is served, not dropped."""
        self.control.settimeout(0)
        try:
            return self.control.accept()
        except BlockingIOError:
            return None, None
        finally:
            self.control.settimeout(0.5)

    def _session(self, conn: socket.socket) -> None:
        reg: _Registration | None = None
        try:
            for line in conn.makefile("r", encoding="utf-8"):
                msg = json.loads(line)
                if msg.get("op") == "register" and reg is None:
                    reg = self._register(conn)
                    reg.send({"reply": "registered", "msg_id": reg.msg_id})
                elif msg.get("op") == "expect" and reg is not None:
                    reg.folder, reg.study_uids = Path(msg["folder"]), frozenset(msg.get("study_uids", ()))
                    reg.send({"reply": "ok"})
        except (OSError, ValueError):
            pass  # a task that died or spoke nonsense: drop it
        finally:
            with self._lock:
                self._sessions -= 1
                if reg is not None:  # a probe that never registered does not extend the idle time
                    self._regs.pop(reg.msg_id, None)
                    self._last_busy = time.monotonic()
            conn.close()

    def _register(self, conn: socket.socket) -> _Registration:
        with self._lock:
            msg_id = next(i % 65535 + 1 for i in self._ids if i % 65535 + 1 not in self._regs)
            reg = self._regs[msg_id] = _Registration(msg_id, conn)
            self._last_busy = time.monotonic()
            return reg

    # -- stores --------------------------------------------------------------

    def _route(self, msg_id: int | None, path: Path | None) -> tuple[_Registration | None, str]:
        """The task a store belongs to, and how it was told: ``id``, ``study`` or ``unrouted``."""
        with self._lock:
            regs = [r for r in self._regs.values() if r.folder is not None]
        if not regs:
            return None, "refused"
        by_id = next((r for r in regs if r.msg_id == msg_id), None) if msg_id else None
        if by_id is not None:
            return by_id, "id"
        study = _study_uid(path)
        by_study = [r for r in regs if study in r.study_uids]
        if len(by_study) == 1:
            return by_study[0], "study"
        return min(regs, key=lambda r: r.created), "unrouted"  # quarantined UNSOLICITED by that task

    def _on_store(self, event: evt.Event) -> int:
        req = cast(C_STORE, event.request)
        chunked = getattr(req, "_dataset_path", None)
        if (handle := getattr(req, "_dataset_file", None)) is not None:
            handle.close()
        path = chunked if isinstance(chunked, Path) else None
        reg: _Registration | None = None
        try:
            if self._originator_refused(req, event):
                return NOT_AUTHORIZED
            reg, how = self._route(getattr(req, "MoveOriginatorMessageID", None), path)
            if reg is None or reg.folder is None:
                return REFUSED
            target = reg.folder / f"routed-{next(self._names):08d}.dcm"
            _place(path, target, event)
            sent = reg.send(
                {
                    "store": str(target),
                    "sop_instance_uid": str(req.AffectedSOPInstanceUID),
                    "sop_class_uid": str(req.AffectedSOPClassUID),
                    "transfer_syntax": str(event.context.transfer_syntax),
                    "routed": how,
                }
            )
            if not sent:
                target.unlink(missing_ok=True)
                return REFUSED
            return 0x0000
        except OSError as exc:
            if exc.errno == errno.ENOSPC and reg is not None:
                reg.send({"full": True})
            elif reg is not None:
                reg.send({"warning": f"an instance could not be staged ({type(exc).__name__}, errno {exc.errno})"})
            return REFUSED
        except Exception as exc:  # never let a handler exception kill the association
            if reg is not None:
                reg.send({"warning": f"an instance could not be staged ({type(exc).__name__})"})
            return REFUSED
        finally:
            if path is not None:
                path.unlink(missing_ok=True)


def _place(path: Path | None, target: Path, event: evt.Event) -> None:
    """Move the received instance to ``target`` (written whole, then renamed)."""
    part = target.with_suffix(".part")
    try:
        if path is None:
            part.write_bytes(event.encoded_dataset(include_meta=True))
        else:
            try:
                os.replace(path, part)
            except OSError:  # another file system
                shutil.copyfile(path, part)
        part.rename(target)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def _tls_request(server: Any, alert: Any) -> tuple[socket.socket, tuple[str, int]]:
    """pynetdicom's ``get_request`` with the handshake's failure reported: a
    peer without a certificate our CA signed is a security alert, not silence."""
    client, address = server.socket.accept()
    client.settimeout(HANDSHAKE_SECONDS)  # a peer that never handshakes must not hold the accept loop
    try:
        tls = server.ssl_context.wrap_socket(client, server_side=True)
        tls.settimeout(None)
        return tls, address
    except (OSError, ValueError) as exc:
        client.close()
        alert(None, address[0], f"TLS handshake refused ({type(exc).__name__})")
        raise


def _study_uid(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
        return str(ds.get("StudyInstanceUID", "")) or None
    except Exception:
        return None


def _same_user(conn: socket.socket) -> bool:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid == os.getuid()


def main(argv: list[str]) -> int:
    """``python -m include.pacs_migration.dimse.router '<json>'``: start, say
    ``ready`` (or why not) on stdout, then serve until idle."""
    args = json.loads(argv[0])
    try:
        router = MoveRouter(
            args["ae_title"],
            args["host"],
            args["port"],
            Path(args["staging_root"]),
            args.get("max_pdu", 131072),
            args.get("uncompressed_only", False),
            args.get("idle_seconds", 30.0),
            args.get("peer_ae"),
            args.get("originator_ae"),
            args.get("tls"),
        )
    except RouterRunning:
        print("running", flush=True)  # the task connects to that one
        return 0
    except OSError as exc:
        print(f"error: {type(exc).__name__}: {exc.strerror or exc}", flush=True)
        return 1
    except Exception as exc:
        print(f"error: {type(exc).__name__}", flush=True)
        return 1
    print("ready", flush=True)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    router.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
