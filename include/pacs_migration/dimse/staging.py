"""Where retrieved instances land: staged by arrival order, hashed, copies kept."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


_CHUNK = 1 << 20
MIN_FREE_BYTES = 256 << 10  # below this the staging disk counts as full


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
    full: bool = False  # a store failed for lack of disk space (ENOSPC)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _counter: int = 0
    # Called once per first arrival or differing copy, as soon as it is staged
    # (overlaps processing with retrieval).
    on_received: Callable[[ReceivedInstance], None] | None = None

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)

    def out_of_space(self) -> bool:
        """A store failed for lack of space, or less than 1 MiB is free: asking for more is pointless."""
        try:
            return self.full or shutil.disk_usage(self.folder).free < MIN_FREE_BYTES
        except OSError:
            return self.full

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
        """Stage an instance held in memory (a Part 10 byte string), as :meth:`store_stream`."""
        return self.store_stream(sop_instance_uid, sop_class_uid, transfer_syntax, [data])

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

    def store_stream(
        self, sop_instance_uid: str, sop_class_uid: str, transfer_syntax: str, chunks: Iterable[bytes | memoryview]
    ) -> int:
        """Stage an instance as its fragments arrive off the network: written and
        hashed in one pass, never held whole. Every chunk is taken whatever
        happens, so the association stays in step; a failure to write is the
        C-STORE status 0xA700, an error raised by ``chunks`` (the association
        broke) propagates. No ``.part`` file is left either way."""
        path = self._next_path()
        tmp = path.with_suffix(".part")
        digest, size, failure = hashlib.sha256(), 0, None
        try:
            with open(tmp, "wb") as fh:
                for chunk in chunks:
                    if failure is None:
                        try:
                            fh.write(chunk)
                        except OSError as exc:
                            failure = exc  # drain the rest: the peer is still sending it
                            continue
                        digest.update(chunk)
                        size += len(chunk)
            if failure is None:
                tmp.rename(path)
        except OSError as exc:  # open, or the last flush on close
            failure = exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if failure is not None:
            tmp.unlink(missing_ok=True)
            for _ in chunks:  # open failed before any was taken: take them now
                pass
            return self._failed(failure)
        self._commit(ReceivedInstance(sop_instance_uid, sop_class_uid, transfer_syntax, path, digest.hexdigest(), size))
        return 0x0000

    def _failed(self, exc: OSError) -> int:
        """The C-STORE status of a failure to stage: 0xA700 Out of resources."""
        if exc.errno == errno.ENOSPC:
            self.full = True
            log.error("staging is full: an instance could not be staged")
        else:
            log.error("failed to stage a received instance (%s, errno %s)", type(exc).__name__, exc.errno)
        return 0xA700
