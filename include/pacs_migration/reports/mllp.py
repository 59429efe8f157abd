"""The MLLP listener the RIS pushes ORU^R01 messages to (``make hl7-listen``).

Each message is kept in the inbox *before* it is acknowledged (original-mode
acknowledgement, HL7 v2 2.9.2):

- ``AA``: kept and readable as a report;
- ``AE``: kept, but not readable as a report: MSA-3 and ERR-8 say
  ``HL7_PARSE_ERROR:<segment>`` (a person reviews it; sending it again changes nothing);
- ``AR``: not kept (the archive did not answer, or the block is over the size
  limit): the RIS should send it again.

A broken block, an oversized one or a silent connection never stops the
listener: the connection is answered or closed and the next one is served.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hl7.mllp import InvalidBlockError, start_hl7_server

from ..store import ObjectStore
from .intake import Received, receive

log = logging.getLogger(__name__)


@dataclass
class ListenerStats:
    accepted: int = 0  # AA
    errors: int = 0  # AE
    rejected: int = 0  # AR
    connections: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, code: str) -> None:
        with self._lock:
            if code == "AA":
                self.accepted += 1
            elif code == "AE":
                self.errors += 1
            else:
                self.rejected += 1


def _fields(raw: bytes) -> list[bytes]:
    first = raw.replace(b"\n", b"\r").split(b"\r", 1)[0]
    return first.split(first[3:4]) if first.startswith(b"MSH") and len(first) > 8 else []


def ack(raw: bytes, code: str, text: str = "", now: dt.datetime | None = None) -> bytes:
    """An ACK for ``raw`` (the sender and receiver swapped, MSA-2 its control
    id); built from its MSH as bytes, so a message that cannot be parsed still gets one."""
    f = _fields(raw)

    def at(n: int) -> bytes:  # MSH-n
        return f[n - 1] if len(f) >= n else b""

    enc = at(2) or b"^~\\&"
    trigger = at(9).split(enc[:1])[1] if enc[:1] in at(9) else b""
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%d%H%M%S").encode()
    control = at(10)
    msh = [b"MSH", enc, at(5) or b"PACSMIG", at(6), at(3), at(4), stamp, b"", b"ACK^" + trigger + b"^ACK"]
    msh += [b"ACK" + stamp + control[:10], at(11) or b"P", at(12) or b"2.5"]
    segments = [b"|".join(msh), b"|".join([b"MSA", code.encode(), control, text.encode()[:80]])]
    if code != "AA":  # ERR-3 the HL7 error code, ERR-4 the severity, ERR-8 what a person reads
        err = [b"ERR", b"", b"", b"207^Application internal error^HL70357", b"E", b"", b"", b"", text.encode()[:80]]
        segments.append(b"|".join(err))
    return b"\r".join(segments) + b"\r"


class MllpListener:
    """Serves MLLP on ``host:port`` in a thread of its own (``start``/``stop``)."""

    def __init__(
        self,
        store: ObjectStore,
        accession_field: str = "OBR-3",
        default_charset: str = "8859/1",
        max_bytes: int = 20 << 20,
        idle_seconds: float = 300.0,
        on_received: Callable[[Received], None] | None = None,
    ) -> None:
        self.store, self.accession_field, self.default_charset = store, accession_field, default_charset
        self.max_bytes, self.idle_seconds, self.on_received = max_bytes, idle_seconds, on_received
        self.stats = ListenerStats()
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None

    def handle(self, raw: bytes) -> bytes:
        """Keep the message, then say what became of it (blocking: S3 I/O)."""
        try:
            got = receive(self.store, raw, self.accession_field, self.default_charset)
        except Exception as exc:  # the archive did not take it: the RIS keeps it and sends it again
            log.warning("hl7: a message could not be kept (%s); answered AR", type(exc).__name__)
            self.stats.add("AR")
            return ack(raw, "AR", "not stored; send again")
        if self.on_received is not None:
            self.on_received(got)
        code, text = ("AA", "") if got.error is None else ("AE", got.error.reason)
        self.stats.add(code)
        return ack(raw, code, text)

    async def _connection(self, reader: Any, writer: Any) -> None:
        self.stats.connections += 1
        try:
            while True:
                try:
                    block = await asyncio.wait_for(reader.readblock(), self.idle_seconds)
                except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    return  # idle, or the sender closed
                except InvalidBlockError:
                    log.warning("hl7: a block without the MLLP start byte; connection closed")
                    return
                except ValueError:  # over the limit: the stream cannot be resynchronized
                    self.stats.add("AR")
                    writer.writeblock(ack(b"", "AR", f"message over {self.max_bytes} bytes"))
                    await writer.drain()
                    return
                answer = await asyncio.to_thread(self.handle, bytes(block))
                writer.writeblock(answer)
                await writer.drain()
        finally:
            writer.close()

    async def _serve(self, host: str, port: int, ready: threading.Event) -> None:
        server: Any = await start_hl7_server(self._connection, host, port, limit=self.max_bytes)
        self._server = server
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        async with server:
            await server.serve_forever()

    def start(self, host: str = "127.0.0.1", port: int = 0) -> MllpListener:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            assert self._loop is not None
            try:
                self._loop.run_until_complete(self._serve(host, port, ready))
            except asyncio.CancelledError:
                pass
            finally:
                ready.set()

        self._thread = threading.Thread(target=run, name="hl7-mllp", daemon=True)
        self._thread.start()
        if not ready.wait(10) or not self.port:
            raise OSError(f"the MLLP listener could not listen on {host}:{port}")
        log.info("hl7: MLLP listener on %s:%d", host, self.port)
        return self

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.cancel()

    def stop(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed() and loop.is_running():
            with contextlib.suppress(RuntimeError, TimeoutError, asyncio.CancelledError):  # already stopping
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(10)
        if self._thread is not None:
            self._thread.join(10)
        if loop is not None and not loop.is_running() and not loop.is_closed():
            loop.close()
