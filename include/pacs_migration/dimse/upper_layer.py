"""The DICOM Upper Layer (PS3.8) as our requestor uses it: one thread, blocking
reads, no reactor. The census's C-FIND speaks it on one presentation context,
C-GET on many (the Query/Retrieve model and one per storage class and syntax).

pynetdicom runs two threads per association that poll the socket and hand
each PDU and message over queues; for the census's tens of thousands of small
C-FIND answers that cost ~0.6 ms of CPU an answer, more than the PACS took to
find it, and a C-GET ran at a quarter of DCMTK getscu's speed. Here a message
is read where it is awaited. Only what a requestor needs: A-ASSOCIATE (our
maximum PDU, the peer's, the accepted transfer syntaxes, SCP role selection),
P-DATA with fragments both ways, A-RELEASE, A-ABORT; every wait bounded by the
source's timeouts; DICOM TLS. Nothing of a message is logged.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import struct
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO, cast

from ..config import SourceConfig
from ..uids import IMPLEMENTATION_CLASS_UID
from .association import DicomNetworkError, Rejected, nodelay_socket, tls_context

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
IMPLEMENTATION_VERSION_NAME = b"PACSMIGRATE_01"

# PDU types (PS3.8 9.3)
A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07
_PDU_HEADER = struct.Struct(">BxL")
_COMMAND, _LAST = 0x01, 0x02  # message control header bits (PS3.8 E.2)
_READ_BUFFER = 1 << 16


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BxH", kind, len(body)) + body


def _uid(value: str) -> bytes:
    return value.encode("ascii")


def _ae(title: str) -> bytes:
    return title.encode("ascii").ljust(16)[:16]


def _role(sop_class_uid: str) -> bytes:
    """SCP/SCU Role Selection (PS3.7 D.3.3.4): we take the SCP role, not the SCU's."""
    uid = _uid(sop_class_uid)
    return _item(0x54, struct.pack(">H", len(uid)) + uid + b"\x00\x01")


def associate_rq(
    source: SourceConfig, contexts: Sequence[tuple[str, Sequence[str]]], scp_roles: Sequence[str] = ()
) -> bytes:
    """An A-ASSOCIATE-RQ proposing ``contexts`` (abstract syntax, transfer
    syntaxes) as IDs 1, 3, 5...; the SCP role for each of ``scp_roles``."""
    items = b"".join(
        _item(
            0x20,
            struct.pack(">B3x", 2 * n + 1)
            + _item(0x30, _uid(abstract))
            + b"".join(_item(0x40, _uid(ts)) for ts in syntaxes),
        )
        for n, (abstract, syntaxes) in enumerate(contexts)
    )
    user = (
        _item(0x51, struct.pack(">L", source.max_pdu))
        + _item(0x52, _uid(IMPLEMENTATION_CLASS_UID))
        + b"".join(_role(c) for c in scp_roles)
        + _item(0x55, IMPLEMENTATION_VERSION_NAME)
    )
    body = (
        struct.pack(">H2x", 1)
        + _ae(source.called_ae_title)
        + _ae(source.calling_ae_title)
        + bytes(32)
        + _item(0x10, _uid(APPLICATION_CONTEXT))
        + items
        + _item(0x50, user)
    )
    return _PDU_HEADER.pack(A_ASSOCIATE_RQ, len(body)) + body


@dataclass(frozen=True)
class Accepted:
    """What an A-ASSOCIATE-AC agreed: the accepted contexts' transfer syntaxes by ID."""

    contexts: dict[int, str]
    peer_max_pdu: int  # 0: no limit

    @property
    def transfer_syntax(self) -> str:
        """Context 1's: the service's own (C-FIND, C-GET)."""
        return self.contexts[1]


def parse_associate_ac(body: bytes) -> Accepted:
    """The accepted contexts, the peer's maximum PDU; raises :class:`Rejected`
    (permanent) when context 1, the service's own, was not accepted."""
    at, contexts, peer_max, first = 68, {}, 0, None
    while at + 4 <= len(body):
        kind, length = struct.unpack_from(">BxH", body, at)
        value = body[at + 4 : at + 4 + length]
        at += 4 + length
        if kind == 0x21 and len(value) >= 4:
            context_id, result = value[0], value[2]
            first = result if context_id == 1 else first
            if result == 0 and len(value) >= 8 and value[4] == 0x40:
                (ts_len,) = struct.unpack_from(">H", value, 6)
                contexts[context_id] = value[8 : 8 + ts_len].rstrip(b"\0 ").decode("ascii")
        elif kind == 0x50:
            sub = 0
            while sub + 4 <= len(value):
                sub_kind, sub_len = struct.unpack_from(">BxH", value, sub)
                if sub_kind == 0x51 and sub_len == 4:
                    (peer_max,) = struct.unpack_from(">L", value, sub + 4)
                sub += 4 + sub_len
    if first != 0 or not contexts.get(1):
        raise Rejected(f"accepted without the presentation context (result {first})", permanent=True)
    return Accepted(contexts, peer_max)


def pdvs(context_id: int, payload: bytes, command: bool, max_pdu: int) -> list[bytes]:
    """``payload`` as P-DATA-TF PDUs of one PDV each, none over ``max_pdu`` (0: no limit)."""
    # The maximum bounds a PDU's variable field: one PDV, its length (4) and header (2) included.
    room = max(max_pdu - 6, 1) if max_pdu else max(len(payload), 1)
    chunks = [payload[i : i + room] for i in range(0, len(payload), room)] or [b""]
    out = []
    for n, chunk in enumerate(chunks):
        control = (_COMMAND if command else 0) | (_LAST if n == len(chunks) - 1 else 0)
        pdv = struct.pack(">LBB", len(chunk) + 2, context_id, control) + chunk
        out.append(_PDU_HEADER.pack(P_DATA_TF, len(pdv)) + pdv)
    return out


class UpperLayer:
    """An established association; context 1 is the service's own."""

    def __init__(self, sock: socket.socket, reader: BinaryIO, source: SourceConfig, accepted: Accepted) -> None:
        self._sock = sock
        self._reader = reader
        self.source = source
        self.contexts = accepted.contexts
        self.transfer_syntax = accepted.transfer_syntax
        self.peer_max_pdu = accepted.peer_max_pdu
        self.is_established = True
        # PDVs read but not yet taken: (context ID, control, data)
        self._pending: deque[tuple[int, int, memoryview]] = deque()
        self._message_id = 0

    def next_message_id(self) -> int:
        self._message_id = self._message_id % 0xFFFF + 1
        return self._message_id

    @classmethod
    def open(cls, source: SourceConfig, abstract_syntax: str, transfer_syntaxes: list[str]) -> UpperLayer:
        """One presentation context; as :meth:`open_contexts`."""
        return cls.open_contexts(source, [(abstract_syntax, transfer_syntaxes)])

    @classmethod
    def open_contexts(
        cls, source: SourceConfig, contexts: Sequence[tuple[str, Sequence[str]]], scp_roles: Sequence[str] = ()
    ) -> UpperLayer:
        """Connect, negotiate; raises :class:`Rejected` (A-ASSOCIATE-RJ, context 1
        refused) or :class:`DicomNetworkError` (no connection, TLS, timeout)."""
        try:
            sock = socket.create_connection((source.host, source.port), timeout=source.acse_timeout)
        except OSError as exc:
            raise DicomNetworkError(f"failed (connection: {exc.__class__.__name__})") from exc
        try:
            nodelay_socket(sock)
            if source.tls is not None:
                sock = tls_context(source.tls).wrap_socket(sock, server_hostname=source.tls.server_name or source.host)
            sock.sendall(associate_rq(source, contexts, scp_roles))
            # Buffered: many small answers, or a large PDU, in one recv.
            reader = cast(BinaryIO, sock.makefile("rb", buffering=_READ_BUFFER))
            kind, body = _read_pdu(reader, source.max_pdu)
            if kind == A_ASSOCIATE_RJ and len(body) >= 4:
                result, origin, reason = body[1], body[2], body[3]
                raise Rejected.from_rj(result, origin, reason)
            if kind != A_ASSOCIATE_AC:
                raise DicomNetworkError(f"the peer answered with PDU type 0x{kind:02X}")
            ul = cls(sock, reader, source, parse_associate_ac(body))
        except Rejected:
            sock.close()
            raise
        except (OSError, ssl.SSLError, DicomNetworkError) as exc:
            sock.close()
            why = str(exc) if isinstance(exc, DicomNetworkError) else f"negotiation or TLS: {exc.__class__.__name__}"
            raise DicomNetworkError(f"failed ({why})") from exc
        sock.settimeout(source.dimse_timeout)
        return ul

    # -- messages ---------------------------------------------------------
    def send(self, command: bytes, dataset: bytes | None, context_id: int = 1) -> None:
        """One DIMSE message: its command set, then its data set if any."""
        pdus = pdvs(context_id, command, True, self.peer_max_pdu)
        if dataset is not None:
            pdus += pdvs(context_id, dataset, False, self.peer_max_pdu)
        try:
            self._sock.sendall(b"".join(pdus))  # one write: a query is a few hundred bytes
        except OSError as exc:
            self._lost()
            raise DicomNetworkError(f"sending failed ({exc.__class__.__name__})") from exc

    def receive(self, command: bool) -> bytes:
        """The next whole command set (``command``) or data set, its fragments joined."""
        if command:
            return self.receive_command()[1]
        return b"".join(self.receive_fragments())

    def receive_command(self) -> tuple[int, bytes]:
        """The next message's presentation context ID and whole command set."""
        context_id, control, data = self._next_pdv()
        if not control & _COMMAND:
            self.abort()
            raise DicomNetworkError("the peer sent a data set where a command was due")
        fragments = [data]
        while not control & _LAST:
            context, control, data = self._next_pdv()
            if context != context_id or not control & _COMMAND:
                self.abort()
                raise DicomNetworkError("the peer sent a fragment out of order")
            fragments.append(data)
        return context_id, b"".join(fragments)

    def receive_fragments(self) -> Iterator[memoryview]:
        """The next data set's fragments as they arrive (views of the PDUs read,
        not copies): a large instance is never held whole."""
        while True:
            _context, control, data = self._next_pdv()
            if control & _COMMAND:
                self.abort()
                raise DicomNetworkError("the peer sent a fragment out of order")
            yield data
            if control & _LAST:
                return

    def _next_pdv(self) -> tuple[int, int, memoryview]:
        if not self._pending:
            self._read_p_data()
        return self._pending.popleft()

    def _read_p_data(self) -> None:
        try:
            kind, body = _read_pdu(self._reader, self.source.max_pdu)
        except TimeoutError as exc:
            self.abort()
            raise DicomNetworkError("no response within the DIMSE timeout") from exc
        except (OSError, ssl.SSLError, DicomNetworkError) as exc:
            self._lost()
            raise DicomNetworkError(f"the association broke ({exc.__class__.__name__})") from exc
        if kind == P_DATA_TF:
            at, view = 0, memoryview(body)  # slices without copies: a PDV may be a whole PDU of pixel data
            while at + 6 <= len(body):
                (length,) = struct.unpack_from(">L", body, at)
                if length < 2 or at + 4 + length > len(body):
                    self.abort()
                    raise DicomNetworkError("the peer sent a malformed P-DATA PDU")
                self._pending.append((body[at + 4], body[at + 5], view[at + 6 : at + 4 + length]))
                at += 4 + length
            return
        if kind == A_RELEASE_RQ:
            self._reply_release()
            raise DicomNetworkError("the peer released the association")
        self._lost()
        what = "aborted" if kind == A_ABORT else f"sent PDU type 0x{kind:02X}"
        raise DicomNetworkError(f"the peer {what}")

    def readable(self) -> bool:
        """Something arrived while idle: the peer closed, released or aborted.
        (What came in one read with the last answer is found by the next query,
        which then fails as a broken association.)"""
        try:
            decrypted = isinstance(self._sock, ssl.SSLSocket) and self._sock.pending() > 0  # read, not yet taken
            return decrypted or bool(select.select([self._sock], [], [], 0)[0])
        except (OSError, ValueError):
            return True

    # -- ending -----------------------------------------------------------
    def release(self) -> None:
        """A-RELEASE, waiting at most the ACSE timeout for its reply."""
        if not self.is_established:
            return
        try:
            self._sock.sendall(_PDU_HEADER.pack(A_RELEASE_RQ, 4) + bytes(4))
            self._sock.settimeout(self.source.acse_timeout)
            for _ in range(64):  # answers still in flight come first; bounded
                kind, _body = _read_pdu(self._reader, self.source.max_pdu)
                if kind in (A_RELEASE_RP, A_ABORT):
                    break
        except (OSError, ssl.SSLError, DicomNetworkError):
            pass
        self._lost()

    def abort(self) -> None:
        if self.is_established:
            with contextlib.suppress(OSError):
                self._sock.sendall(_PDU_HEADER.pack(A_ABORT, 4) + bytes(4))
        self._lost()

    def _reply_release(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.sendall(_PDU_HEADER.pack(A_RELEASE_RP, 4) + bytes(4))
        self._lost()

    def _lost(self) -> None:
        self.is_established = False
        with contextlib.suppress(OSError):
            self._reader.close()
        with contextlib.suppress(OSError):  # whatever the reader did: the socket closes now
            self._sock.close()


def _read_exact(reader: BinaryIO, n: int) -> bytes:
    data = reader.read(n)
    if data is None or len(data) < n:
        raise DicomNetworkError("the peer closed the connection")
    return data


def _read_pdu(reader: BinaryIO, max_pdu: int) -> tuple[int, bytes]:
    kind, length = _PDU_HEADER.unpack(_read_exact(reader, 6))
    # Lenient with a peer that overshoots the maximum we announced (some do),
    # never reading an absurd length into memory.
    limit = max(4 * max_pdu, 1 << 20) if kind == P_DATA_TF else 1 << 20
    if length > limit:
        raise DicomNetworkError(f"the peer sent a PDU of {length} bytes, over the {limit} we accept")
    return kind, _read_exact(reader, length)
