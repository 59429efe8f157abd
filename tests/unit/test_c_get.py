"""C-GET on our own Upper Layer, against a scripted peer on loopback that does
what PACSs do at the edges: accepts some storage contexts and refuses others,
fragments an instance across PDVs and PDUs under a small maximum PDU, appends
the Failed SOP Instance UID List to the command set (DCMTK, so Orthanc) or
sends it as a data set, aborts or falls silent mid-instance, stores on a context
it was not given. Real peers (Orthanc, DCMTK dcmqrscp, our pynetdicom SCP,
TLS) are in tests/integration (test_transfer_syntaxes, test_dicom_faults...)."""

from __future__ import annotations

import hashlib
import io
import socket
import struct
import threading
import time
from collections.abc import Collection

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from include.pacs_migration.dimse import DicomNetworkError, StagingSink, c_get
from include.pacs_migration.dimse.command import (
    C_GET_RSP,
    C_STORE_RQ,
    C_STORE_RSP,
    command_fields,
    command_set,
    encode,
    us,
)
from include.pacs_migration.dimse.get import STUDY_ROOT_GET
from include.pacs_migration.dimse.upper_layer import EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN
from tests.unit.test_upper_layer import Peer, _item, _source

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"


def _instance(uid: str) -> bytes:
    """CT_small's data set (explicit VR little endian) under ``uid``: what a C-STORE carries."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = uid
    return encode(ds, implicit=False)


class GetPeer:
    """The C-GET SCP side of a :class:`Peer`'s connection."""

    def __init__(self, conn: socket.socket, max_pdu: int) -> None:
        self.conn, self.max_pdu = conn, max_pdu
        self.contexts: dict[int, tuple[str, str]] = {}  # accepted: ID -> (abstract syntax, transfer syntax)
        self.proposed: list[tuple[int, str, list[str]]] = []
        self.roles: list[tuple[str, int, int]] = []

    def accept(self, refuse: Collection[str] = ()) -> None:
        """Accept every proposed context but those of ``refuse``d abstract syntaxes."""
        kind, body = Peer.read_pdu(self.conn)
        assert kind == 0x01
        at, reply = 68, b""
        while at < len(body):
            item, length = struct.unpack_from(">BxH", body, at)
            value = body[at + 4 : at + 4 + length]
            at += 4 + length
            if item == 0x20:
                cid, syntaxes, sub, abstract = value[0], [], 4, ""
                while sub < len(value):
                    k, n = struct.unpack_from(">BxH", value, sub)
                    text = value[sub + 4 : sub + 4 + n].decode()
                    abstract, syntaxes = (text, syntaxes) if k == 0x30 else (abstract, [*syntaxes, text])
                    sub += 4 + n
                self.proposed.append((cid, abstract, syntaxes))
                result = 3 if abstract in refuse else 0
                if not result:
                    self.contexts[cid] = (abstract, syntaxes[0])
                reply += _item(0x21, struct.pack(">BxBx", cid, result) + _item(0x40, syntaxes[0].encode()))
            elif item == 0x50:
                sub = 0
                while sub < len(value):
                    k, n = struct.unpack_from(">BxH", value, sub)
                    if k == 0x54:
                        (uid_len,) = struct.unpack_from(">H", value, sub + 4)
                        uid = value[sub + 6 : sub + 6 + uid_len].decode()
                        self.roles.append((uid, value[sub + 6 + uid_len], value[sub + 7 + uid_len]))
                    sub += 4 + n
        user = _item(0x51, struct.pack(">L", self.max_pdu))
        reply = body[:68] + _item(0x10, b"1.2.840.10008.3.1.1.1") + reply + _item(0x50, user)
        self.conn.sendall(struct.pack(">BxL", 0x02, len(reply)) + reply)

    def context_of(self, abstract: str) -> int:
        return next(cid for cid, (a, _ts) in self.contexts.items() if a == abstract)

    def read_message(self) -> tuple[int, dict[int, bytes], bytes | None]:
        """The next whole message: context ID, command fields, data set (or None)."""
        parts: dict[int, list[bytes]] = {1: [], 0: []}
        cid, done_command = 0, False
        while True:
            kind, body = Peer.read_pdu(self.conn)
            assert kind == 0x04, f"PDU type {kind:#x} where P-DATA was expected"
            at = 0
            while at < len(body):
                (length,) = struct.unpack_from(">L", body, at)
                cid, control = body[at + 4], body[at + 5]
                parts[control & 1].append(body[at + 6 : at + 4 + length])
                at += 4 + length
                if control == 0x03:
                    done_command = True
                    fields = command_fields(b"".join(parts[1]))
                    if us(fields, 0x0800) == 0x0101:
                        return cid, fields, None
                elif control == 0x02 and done_command:
                    return cid, command_fields(b"".join(parts[1])), b"".join(parts[0])

    def send(self, cid: int, command: bytes, data: bytes | None = None, pdv: int = 0) -> None:
        """A message, each part in PDVs of at most ``pdv`` bytes (0: the peer's limit), one PDU each."""
        room = pdv or self.max_pdu - 6
        for control, payload in [(0x01, command), *([(0x00, data)] if data is not None else [])]:
            chunks = [payload[i : i + room] for i in range(0, len(payload), room)]
            for n, chunk in enumerate(chunks):
                last = 0x02 if n == len(chunks) - 1 else 0
                pdv_bytes = struct.pack(">LBB", len(chunk) + 2, cid, control | last) + chunk
                self.conn.sendall(struct.pack(">BxL", 0x04, len(pdv_bytes)) + pdv_bytes)

    def store(self, uid: str, message_id: int, sop_class: str = CT, pdv: int = 0) -> tuple[int, dict[int, bytes]]:
        """A C-STORE sub-operation of ``uid``; its response's context and fields."""
        cid = self.context_of(sop_class)
        command = command_set(
            {
                0x0002: sop_class.encode(),
                0x0100: C_STORE_RQ,
                0x0110: message_id,
                0x0700: 0,
                0x0800: 1,
                0x1000: uid.encode(),
            }  # fmt: skip
        )
        self.send(cid, command, _instance(uid), pdv)
        rsp_cid, fields, _ = self.read_message()
        return rsp_cid, fields

    def final(self, message_id: int, status: int, completed: int, failed: int = 0, appended: bytes = b"",
              data: bytes | None = None) -> None:  # fmt: skip
        fields = {0x0002: STUDY_ROOT_GET.encode(), 0x0100: C_GET_RSP, 0x0120: message_id,
                  0x0800: 0x0101 if data is None else 1, 0x0900: status, 0x1021: completed, 0x1022: failed,
                  0x1023: 0}  # fmt: skip
        self.send(1, command_set(fields) + appended, data)


def _failed_list(uids: list[str]) -> Dataset:
    ds = Dataset()
    ds.FailedSOPInstanceUIDList = uids
    return ds


@pytest.fixture
def serve():
    """``serve(script)``: a peer whose connections run ``script(GetPeer)``; its port and errors."""
    peers: list[Peer] = []

    def make(script, max_pdu: int = 16384) -> Peer:
        peer = Peer(lambda p, conn: script(GetPeer(conn, max_pdu)), max_pdu=max_pdu)
        peers.append(peer)
        return peer

    yield make
    for p in peers:
        p.stop()


def _query() -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = "SERIES"
    q.StudyInstanceUID, q.SeriesInstanceUID = "1.2.3", "1.2.3.4"
    return q


def test_fragmented_instances_are_staged_whole_and_answered_on_their_context(serve, tmp_path):
    """Two instances, each split into 1 KB PDVs; MR's contexts refused. Each is
    staged as a Part 10 file pydicom reads, hashed as staged; its C-STORE-RSP
    answers its message ID on its context; the SCP role was asked for each class."""
    seen: dict[str, object] = {}

    def script(peer: GetPeer) -> None:
        peer.accept(refuse={MR})
        cid, fields, data = peer.read_message()
        assert cid == 1 and us(fields, 0x0100) == 0x0010 and data is not None
        seen["request"] = pydicom.filereader.read_dataset(
            io.BytesIO(data), peer.contexts[1][1] != EXPLICIT_VR_LITTLE_ENDIAN, True
        )
        seen["responses"] = [peer.store(uid, 7 + n, pdv=1000) for n, uid in enumerate(("1.2.3.4.1", "1.2.3.4.2"))]
        peer.final(us(fields, 0x0110) or 0, 0x0000, 2)
        seen["proposed"], seen["roles"] = peer.proposed, peer.roles
        Peer.read_pdu(peer.conn)  # A-RELEASE-RQ
        peer.conn.sendall(struct.pack(">BxL", 0x06, 4) + bytes(4))

    peer = serve(script)
    sink = StagingSink(tmp_path / "staging")
    outcome = c_get(_source(peer.port), _query(), [CT, MR], sink)
    assert (outcome.final_status, outcome.completed, outcome.failed) == (0x0000, 2, 0) and not peer.errors
    assert seen["request"].SeriesInstanceUID == "1.2.3.4"  # type: ignore[attr-defined]
    for n, (cid, fields) in enumerate(seen["responses"]):  # type: ignore[arg-type]
        assert us(fields, 0x0100) == C_STORE_RSP and us(fields, 0x0120) == 7 + n and us(fields, 0x0900) == 0
        assert fields[0x1000].rstrip(b"\0").decode() == f"1.2.3.4.{n + 1}"
        assert cid != 1
    proposed = seen["proposed"]
    assert proposed[0][1:] == (STUDY_ROOT_GET, [EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN])  # type: ignore[index]
    assert all(len(syntaxes) == 1 for _cid, _a, syntaxes in proposed[1:])  # type: ignore[index]  # one syntax a context
    assert sorted(seen["roles"]) == [(CT, 0, 1), (MR, 0, 1)]  # type: ignore[arg-type]
    for n in (1, 2):
        got = sink.received[f"1.2.3.4.{n}"]
        ds = pydicom.dcmread(got.path)
        assert ds.SOPInstanceUID == f"1.2.3.4.{n}" and ds.file_meta.TransferSyntaxUID == got.transfer_syntax_uid
        assert ds.file_meta.MediaStorageSOPClassUID == CT and got.sop_class_uid == CT
        assert got.sha256 == hashlib.sha256(got.path.read_bytes()).hexdigest()
    assert not list((tmp_path / "staging").glob("*.part"))


@pytest.mark.parametrize("where", ["appended to the command set", "as a data set"])
def test_the_failed_list_is_read_however_the_peer_sends_it(serve, tmp_path, where):
    def script(peer: GetPeer) -> None:
        peer.accept()
        _cid, fields, _ = peer.read_message()
        peer.store("1.2.3.4.1", 1)
        failed = _failed_list(["1.2.3.4.2", "1.2.3.4.3"])
        if where == "as a data set":
            peer.final(
                us(fields, 0x0110) or 0,
                0xB000,
                1,
                2,
                data=encode(failed, peer.contexts[1][1] != EXPLICIT_VR_LITTLE_ENDIAN),
            )
        else:
            peer.final(us(fields, 0x0110) or 0, 0xB000, 1, 2, appended=encode(failed, implicit=True))

    peer = serve(script)
    outcome = c_get(_source(peer.port), _query(), [CT], StagingSink(tmp_path / "s"))
    assert (outcome.final_status, outcome.completed, outcome.failed) == (0xB000, 1, 2)
    assert outcome.failed_sop_instance_uids == ("1.2.3.4.2", "1.2.3.4.3")


@pytest.mark.parametrize("fault", ["abort", "silence", "close"])
def test_a_peer_lost_mid_instance_is_a_network_error_and_leaves_no_partial_file(serve, tmp_path, fault):
    """The first instance is kept; the second, cut after its first PDV, leaves
    nothing; the call fails within the DIMSE timeout."""

    def script(peer: GetPeer) -> None:
        peer.accept()
        peer.read_message()
        peer.store("1.2.3.4.1", 1)
        cid = peer.context_of(CT)
        command = command_set({0x0002: CT.encode(), 0x0100: C_STORE_RQ, 0x0110: 2, 0x0800: 1, 0x1000: b"1.2.3.4.2"})
        peer.send(cid, command)
        chunk = _instance("1.2.3.4.2")[:1000]
        pdv = struct.pack(">LBB", len(chunk) + 2, cid, 0x00) + chunk
        peer.conn.sendall(struct.pack(">BxL", 0x04, len(pdv)) + pdv)
        if fault == "abort":
            peer.conn.sendall(struct.pack(">BxL", 0x07, 4) + bytes(4))
        elif fault == "silence":
            time.sleep(2)

    peer = serve(script)
    sink = StagingSink(tmp_path / "s")
    started = time.monotonic()
    with pytest.raises(DicomNetworkError):
        c_get(_source(peer.port, dimse_timeout=0.5), _query(), [CT], sink)
    assert time.monotonic() - started < 1.8
    assert list(sink.received) == ["1.2.3.4.1"]
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["00000001.dcm"]


def test_a_store_on_a_context_not_given_for_storage_aborts(serve, tmp_path):
    aborted = threading.Event()

    def script(peer: GetPeer) -> None:
        peer.accept()
        peer.read_message()
        command = command_set({0x0002: CT.encode(), 0x0100: C_STORE_RQ, 0x0110: 1, 0x0800: 1, 0x1000: b"1.2.3.4.1"})
        peer.send(1, command)  # context 1 is the Get model's; refused before its data set is read
        if Peer.read_pdu(peer.conn)[0] == 0x07:
            aborted.set()

    peer = serve(script)
    sink = StagingSink(tmp_path / "s")
    with pytest.raises(DicomNetworkError, match="not accepted for storage"):
        c_get(_source(peer.port), _query(), [CT], sink)
    assert aborted.wait(2) and not sink.received and not list((tmp_path / "s").iterdir())


def test_the_c_get_client_runs_no_thread_of_its_own(serve, tmp_path):
    """pynetdicom ran two reactor threads per association; a C-GET now reads
    its messages where it waits for them."""
    counts: list[int] = []

    def script(peer: GetPeer) -> None:
        peer.accept()
        _cid, fields, _ = peer.read_message()
        counts.append(threading.active_count())
        peer.store("1.2.3.4.1", 1)
        peer.final(us(fields, 0x0110) or 0, 0x0000, 1)

    peer = serve(script)
    before = threading.active_count()
    c_get(_source(peer.port), _query(), [CT], StagingSink(tmp_path / "s"))
    assert counts == [before + 1]  # the peer's own connection thread only
