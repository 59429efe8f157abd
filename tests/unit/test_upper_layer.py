"""The census's C-FIND over our own DICOM Upper Layer, against a scripted peer on
loopback that does what real PACSs do at the edges of PS3.8: fragments messages
across PDVs and PDUs, announces a small maximum PDU, rejects, refuses the
context, aborts mid-answer, falls silent, answers with another message ID.
Interoperability with real peers (Orthanc, DCMTK dcmqrscp, pynetdicom, TLS) is
in tests/integration (test_find_session, test_dcmqrscp_interop, test_dicom_tls…)."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable
from io import BytesIO

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from include.pacs_migration.config import SourceConfig
from include.pacs_migration.dimse import DicomNetworkError, FindSession, QueryFailed, QueryTruncated, find
from include.pacs_migration.dimse.find import _open_find_association, command_fields
from include.pacs_migration.dimse.upper_layer import EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN

Script = Callable[["Peer", socket.socket], None]


class Peer:
    """A listening socket on loopback; each connection runs ``script``."""

    def __init__(self, script: Script, max_pdu: int = 16384, transfer_syntax: str = EXPLICIT_VR_LITTLE_ENDIAN) -> None:
        self.script, self.max_pdu, self.transfer_syntax = script, max_pdu, transfer_syntax
        self.connections = 0
        self.request_pdu_lengths: list[int] = []
        self.requests: list[Dataset] = []
        self.errors: list[BaseException] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            with conn:
                self.script(self, conn)
        except (OSError, AssertionError) as exc:
            self.errors.append(exc)

    def stop(self) -> None:
        self._server.close()

    # -- PDUs -------------------------------------------------------------
    @staticmethod
    def read_pdu(conn: socket.socket) -> tuple[int, bytes]:
        head = _recv(conn, 6)
        kind, length = struct.unpack(">BxL", head)
        return kind, _recv(conn, length)

    def accept(self, conn: socket.socket, result: int = 0) -> None:
        kind, body = self.read_pdu(conn)
        assert kind == 0x01
        ts = self.transfer_syntax.encode()
        context = struct.pack(">BxBx", 1, result) + _item(0x40, ts)
        user = _item(0x51, struct.pack(">L", self.max_pdu))
        reply = body[:68] + _item(0x10, b"1.2.840.10008.3.1.1.1") + _item(0x21, context) + _item(0x50, user)
        conn.sendall(struct.pack(">BxL", 0x02, len(reply)) + reply)

    def reject(self, conn: socket.socket, result: int) -> None:
        self.read_pdu(conn)
        conn.sendall(struct.pack(">BxL", 0x03, 4) + bytes([0, result, 1, 7]))

    def request(self, conn: socket.socket) -> int:
        """Read one C-FIND-RQ (command and identifier); its message ID."""
        parts: dict[int, list[bytes]] = {1: [], 0: []}
        done = {1: False, 0: False}
        while not (done[1] and done[0]):
            kind, body = self.read_pdu(conn)
            assert kind == 0x04, f"PDU type {kind:#x} where P-DATA was expected"
            self.request_pdu_lengths.append(len(body))
            at = 0
            while at < len(body):
                (length,) = struct.unpack_from(">L", body, at)
                control = body[at + 5]
                parts[control & 1].append(body[at + 6 : at + 4 + length])
                done[control & 1] = bool(control & 2)
                at += 4 + length
        implicit = self.transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
        self.requests.append(read_dataset(BytesIO(b"".join(parts[0])), implicit, True))
        fields = command_fields(b"".join(parts[1]))
        return struct.unpack("<H", fields[0x0110])[0]

    def respond(self, conn: socket.socket, message_id: int, status: int, identifier: Dataset | None = None,
                split: int = 1) -> None:  # fmt: skip
        """A C-FIND-RSP, its command and identifier each in ``split`` PDVs, one PDU per PDV."""
        command = _rsp(message_id, status, identifier is not None)
        for control, payload in [(0x01, command), (0x00, _encode(identifier, self.transfer_syntax))][
            : 2 if identifier is not None else 1
        ]:
            size = -(-len(payload) // split)
            chunks = [payload[i : i + size] for i in range(0, len(payload), size)]
            for n, chunk in enumerate(chunks):
                last = 0x02 if n == len(chunks) - 1 else 0
                pdv = struct.pack(">LBB", len(chunk) + 2, 1, control | last) + chunk
                conn.sendall(struct.pack(">BxL", 0x04, len(pdv)) + pdv)

    def release(self, conn: socket.socket) -> None:
        kind, _ = self.read_pdu(conn)
        assert kind == 0x05
        conn.sendall(struct.pack(">BxL", 0x06, 4) + bytes(4))


def _recv(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BxH", kind, len(body)) + body


def _us(element: int, value: int) -> bytes:
    return struct.pack("<HHLH", 0x0000, element, 2, value)


def _rsp(message_id: int, status: int, with_data: bool) -> bytes:
    data_set_type = 0x0001 if with_data else 0x0101
    body = _us(0x0100, 0x8020) + _us(0x0120, message_id) + _us(0x0800, data_set_type) + _us(0x0900, status)
    return struct.pack("<HHLL", 0, 0, 4, len(body)) + body


def _encode(ds: Dataset | None, transfer_syntax: str) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
    write_dataset(fp, ds or Dataset())
    return fp.getvalue()


def _answer(n: int) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "IMAGE"
    ds.SOPInstanceUID = f"1.2.3.{n}"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    return ds


def _query() -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE"
    q.StudyInstanceUID = "1.2.3"
    q.SeriesInstanceUID = "1.2.3.4"
    q.SOPInstanceUID = ""
    q.add_new(0x00091010, "OB", bytes(10_000))  # larger than the peer's maximum PDU: sent in fragments
    return q


def _source(port: int, **kw) -> SourceConfig:
    base = {"host": "127.0.0.1", "port": port, "called_ae_title": "PEER", "calling_ae_title": "PACSMIGRATE",
            "acse_timeout": 2, "dimse_timeout": 0.5, "association_attempts": 2}  # fmt: skip
    return SourceConfig(**{**base, **kw})


@pytest.fixture
def peer_of():
    peers: list[Peer] = []

    def make(script: Script, **kw) -> Peer:
        peers.append(Peer(script, **kw))
        return peers[-1]

    yield make
    for p in peers:
        p.stop()


@pytest.mark.parametrize("transfer_syntax", [EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN])
def test_fragmented_answers_are_reassembled_and_the_request_fits_the_peer_pdu(peer_of, transfer_syntax):
    def script(peer: Peer, conn: socket.socket) -> None:
        peer.accept(conn)
        mid = peer.request(conn)
        peer.respond(conn, mid, 0xFF00, _answer(1), split=3)
        peer.respond(conn, mid, 0xFF01, _answer(2))
        peer.respond(conn, mid, 0x0000)
        peer.release(conn)

    peer = peer_of(script, max_pdu=4096, transfer_syntax=transfer_syntax)
    answers = find(_source(peer.port), _query())
    assert [a.SOPInstanceUID for a in answers] == ["1.2.3.1", "1.2.3.2"]
    assert len(peer.request_pdu_lengths) >= 3 and max(peer.request_pdu_lengths) <= 4096
    assert peer.requests[0].SeriesInstanceUID == "1.2.3.4" and len(peer.requests[0][0x00091010].value) == 10_000
    assert peer.errors == []


def test_several_queries_over_one_association_count_their_message_ids(peer_of):
    ids: list[int] = []

    def script(peer: Peer, conn: socket.socket) -> None:
        peer.accept(conn)
        for n in range(3):
            ids.append(peer.request(conn))
            peer.respond(conn, ids[-1], 0xFF00, _answer(n))
            peer.respond(conn, ids[-1], 0x0000)
        peer.release(conn)

    peer = peer_of(script)
    with FindSession(_source(peer.port)) as session:
        got = [session.find(_query())[0].SOPInstanceUID for _ in range(3)]
    assert got == ["1.2.3.0", "1.2.3.1", "1.2.3.2"]
    assert ids == [1, 2, 3] and peer.connections == 1
    assert peer.errors == []  # the session released the association


def test_the_census_client_runs_no_thread_of_its_own(peer_of):
    """pynetdicom ran two reactor threads per association; their hand-offs cost
    more CPU than the PACS spent finding each answer."""

    def script(peer: Peer, conn: socket.socket) -> None:
        peer.accept(conn)
        peer.release(conn)

    peer = peer_of(script)
    time.sleep(0.05)
    before = threading.active_count()
    assoc = _open_find_association(_source(peer.port))
    during = threading.active_count() - 1  # the peer's connection thread
    assoc.release()
    assert during == before


def test_status_failure_and_truncation_are_told_apart(peer_of):
    statuses = iter([0xA900, 0xA700])

    def script(peer: Peer, conn: socket.socket) -> None:
        peer.accept(conn)
        mid = peer.request(conn)
        peer.respond(conn, mid, 0xFF00, _answer(1))
        peer.respond(conn, mid, next(statuses))
        peer.release(conn)

    peer = peer_of(script)
    with pytest.raises(QueryFailed) as failed:
        find(_source(peer.port), _query())
    assert failed.value.status == 0xA900 and not isinstance(failed.value, QueryTruncated)
    with pytest.raises(QueryTruncated) as truncated:
        find(_source(peer.port), _query())
    assert [a.SOPInstanceUID for a in truncated.value.answers] == ["1.2.3.1"]


def test_an_abort_mid_answers_is_a_network_error(peer_of):
    def script(peer: Peer, conn: socket.socket) -> None:
        peer.accept(conn)
        mid = peer.request(conn)
        peer.respond(conn, mid, 0xFF00, _answer(1))
        conn.sendall(struct.pack(">BxL", 0x07, 4) + bytes([0, 0, 2, 0]))

    peer = peer_of(script)
    with pytest.raises(DicomNetworkError, match="aborted"):
        find(_source(peer.port), _query())


def test_a_silent_peer_times_out_within_the_dimse_timeout(peer_of):
    def script(peer: Peer, conn: socket.socket) -> None:
        peer.accept(conn)
        peer.request(conn)
        time.sleep(5)

    peer = peer_of(script)
    started = time.monotonic()
    with pytest.raises(DicomNetworkError, match="DIMSE timeout"):
        find(_source(peer.port, dimse_timeout=0.3), _query())
    assert time.monotonic() - started < 2


def test_a_response_to_another_message_is_refused(peer_of):
    def script(peer: Peer, conn: socket.socket) -> None:
        peer.accept(conn)
        mid = peer.request(conn)
        peer.respond(conn, mid + 7, 0x0000)
        time.sleep(1)

    peer = peer_of(script)
    with pytest.raises(DicomNetworkError, match="not this C-FIND's response"):
        find(_source(peer.port), _query())


def test_a_pdu_longer_than_we_accept_is_refused_before_it_is_read(peer_of):
    def script(peer: Peer, conn: socket.socket) -> None:
        peer.accept(conn)
        peer.request(conn)
        conn.sendall(struct.pack(">BxL", 0x04, 2**31 - 1))
        time.sleep(1)

    peer = peer_of(script)
    with pytest.raises(DicomNetworkError, match="the association broke"):
        find(_source(peer.port), _query())


def test_a_permanent_rejection_is_not_retried_and_a_transient_one_is(peer_of):
    permanent = peer_of(lambda peer, conn: peer.reject(conn, 1))
    with pytest.raises(DicomNetworkError, match="rejected permanently by the service user"):
        find(_source(permanent.port), _query())
    assert permanent.connections == 1
    transient = peer_of(lambda peer, conn: peer.reject(conn, 2))
    with pytest.raises(DicomNetworkError, match="rejected transiently"):
        find(_source(transient.port), _query())
    assert transient.connections == 2  # association_attempts


def test_a_refused_presentation_context_is_permanent(peer_of):
    peer = peer_of(lambda peer, conn: peer.accept(conn, result=3))  # abstract syntax not supported
    with pytest.raises(DicomNetworkError, match="without the presentation context"):
        find(_source(peer.port), _query())
    assert peer.connections == 1


def test_a_refused_or_closed_connection_fails_after_the_attempts(peer_of):
    closing = peer_of(lambda peer, conn: peer.read_pdu(conn))  # reads the request, then closes
    with pytest.raises(DicomNetworkError, match=r"failed \(the peer closed the connection\)"):
        find(_source(closing.port), _query())
    assert closing.connections == 2
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    with pytest.raises(DicomNetworkError, match=r"failed \(connection: ConnectionRefusedError\)"):
        find(_source(port, association_attempts=1), _query())


@pytest.mark.parametrize("how", ["abort while idle", "release with the last answer", "close while idle"])
def test_a_kept_association_the_peer_ended_is_replaced(peer_of, how):
    def script(peer: Peer, conn: socket.socket) -> None:
        peer.accept(conn)
        mid = peer.request(conn)
        if peer.connections > 1:  # the second association answers, then is released
            peer.respond(conn, mid, 0xFF00, _answer(2))
            peer.respond(conn, mid, 0x0000)
            peer.release(conn)
            return
        peer.respond(conn, mid, 0xFF00, _answer(1))
        if how == "release with the last answer":
            conn.sendall(_p_data_final(mid) + struct.pack(">BxL", 0x05, 4) + bytes(4))
            peer.read_pdu(conn)  # our reply: A-RELEASE-RP
            return
        peer.respond(conn, mid, 0x0000)
        time.sleep(0.1)
        if how == "abort while idle":
            conn.sendall(struct.pack(">BxL", 0x07, 4) + bytes([0, 0, 2, 0]))

    peer = peer_of(script)
    with FindSession(_source(peer.port)) as session:
        first = session.find(_query())
        time.sleep(0.3)
        second = session.find(_query())
    assert [a.SOPInstanceUID for a in first + second] == ["1.2.3.1", "1.2.3.2"]
    assert peer.connections == 2 and peer.errors == []


def _p_data_final(message_id: int) -> bytes:
    pdv = struct.pack(">LBB", len(_rsp(message_id, 0, False)) + 2, 1, 0x03) + _rsp(message_id, 0, False)
    return struct.pack(">BxL", 0x04, len(pdv)) + pdv


def _identifiers() -> list[Dataset]:
    flat = _answer(7)
    flat.SpecificCharacterSet = "ISO_IR 192"
    flat.PatientName = "Ünal^Zoë"  # a value in the answer's own character set
    flat.NumberOfSeriesRelatedInstances = "12"
    flat.add_new(0x00091010, "UN", b"\x01\x02")  # long-length VR
    flat.Modality = ["CT", "PT"]
    nested = _answer(8)
    item = Dataset()
    item.CodeValue = "X"
    nested.ProcedureCodeSequence = [item]  # a sequence: pydicom's reader takes it
    return [flat, nested, Dataset()]


@pytest.mark.parametrize("transfer_syntax", [EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN])
def test_answers_decode_as_pydicom_reads_them(transfer_syntax):
    from include.pacs_migration.dimse import answer_text
    from include.pacs_migration.dimse.find import decode_identifier

    implicit = transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
    for ds in _identifiers():
        data = _encode(ds, transfer_syntax)
        ours, theirs = decode_identifier(data, implicit), read_dataset(BytesIO(data), implicit, True)
        assert [(e.tag, e.VR, e.value) for e in ours] == [(e.tag, e.VR, e.value) for e in theirs]
        for tag in (0x00080016, 0x00080018, 0x00201209, 0x00100010):
            assert answer_text(decode_identifier(data, implicit), tag) == str(
                theirs.get(tag).value if tag in theirs else ""
            )
    truncated = _encode(_answer(9), transfer_syntax)[:-5]  # a short buffer: pydicom decides, as before
    ours, theirs = decode_identifier(truncated, implicit), read_dataset(BytesIO(truncated), implicit, True)
    assert [(e.tag, e.value) for e in ours] == [(e.tag, e.value) for e in theirs]
