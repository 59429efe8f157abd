"""Issue 15, point 6: one C-MOVE destination per worker, shared by every
transfer task on it. Two partitions of one study (a CT and an MR series)
moved at the same moment by two tasks through one Storage SCP (the router),
from Orthanc: every store reaches the task whose C-MOVE asked for it."""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from include.pacs_migration.census import take_census
from include.pacs_migration.config import TargetConfig
from include.pacs_migration.dimse import FindSession, RouterClient, StagingSink, retriever
from include.pacs_migration.dimse.router import control_address, temp_folder
from include.pacs_migration.manifest import PartitionManifests
from include.pacs_migration.store import ObjectStore
from include.pacs_migration.transfer import transfer_partition
from peers.ports import free_port
from tests.conftest import TEST_KEYER
from tests.peers import Orthanc, loopback_source, series_study

DATE = dt.date(2019, 3, 1)


def _two_modality_study(root: Path) -> dict[str, int]:
    """One study: 3 CT series and 3 MR series of 15 instances each."""
    series_study(root / "ct", 3, [15] * 3, modality="CT", tag="routed-ct")
    series_study(root / "mr", 3, [15] * 3, modality="MR", tag="routed-mr")
    study = generate_uid(entropy_srcs=["routed-study"])
    for path in root.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study
        ds.save_as(path)
    return {"2019-03-01/CT": 45, "2019-03-01/MR": 45}


def _move_source(pacs_port: int, called: str, move_port: int):
    return loopback_source(pacs_port, called).model_copy(
        update={"retrieve_method": "C-MOVE", "move_listen_host": "127.0.0.1", "move_listen_port": move_port}
    )


def test_two_tasks_share_one_storage_scp_against_orthanc(tmp_path, s3_server, bucket, caplog):
    expected = _two_modality_study(tmp_path / "archive")
    move_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", calling_aes={"PACSMIGRATE": move_port})
    store = ObjectStore(s3_server.client(), TargetConfig(bucket=bucket))
    staging = tmp_path / "staging"
    results: dict[str, object] = {}
    try:
        assert orthanc.upload_folder(tmp_path / "archive") == 90
        source = _move_source(orthanc.dicom_port, orthanc.ae_title, move_port)
        with FindSession(source) as session:
            census = take_census(session.find, DATE)
        assert {p.key for p in census.partitions()} == set(expected)
        start = threading.Barrier(len(expected))

        def task(partition) -> None:
            manifests = PartitionManifests(store, partition)
            manifests.write_census(census.for_partition(partition), [])
            with retriever(source, staging) as get:
                start.wait(timeout=30)  # both registered: the C-MOVEs overlap
                results[partition.key] = transfer_partition(
                    get,
                    store,
                    partition,
                    manifests.census(),
                    staging,
                    f"run-{partition.modality}",
                    3,
                    1,
                    2,
                    keyer=TEST_KEYER,
                )

        caplog.set_level("INFO", logger="include.pacs_migration.dimse.move")
        threads = [threading.Thread(target=task, args=(p,)) for p in census.partitions()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    finally:
        orthanc.stop()
    for key, n in expected.items():
        counts = results[key]
        assert (counts.expected, counts.migrated, counts.unsolicited, counts.unresolved) == (n, n, 0, 0), key
    assert s3_server.count(bucket, "studies/") == 90
    # Orthanc copies the Move Originator Message ID onto its sub-operations: routed by it, not by study.
    routed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("C-MOVE router:")]
    assert len(routed) == 2 and all("by message ID, 0 by study, 0 unrouted" in m for m in routed), routed
    assert sum(int(m.split(" store(s)")[0].rsplit(" ", 1)[1]) for m in routed) == 90
    assert not list(staging.rglob("*.dcm"))


def _send(port: int, ds: pydicom.Dataset) -> int:
    ae = AE(ae_title="LEGACYPACS")  # the source: only it may deliver
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSMIGRATE")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def test_unrouted_stores_and_the_routers_lifetime(tmp_path):
    """A store nobody asked for goes to the oldest task (which quarantines it
    UNSOLICITED); with no task registered it is refused; the router leaves
    nothing behind when it stops after its idle time."""
    root = tmp_path / "a"
    series_study(root, 1, [2], tag="stray")
    first, second = (pydicom.dcmread(p) for p in sorted(root.glob("*.dcm")))
    move_port = free_port()
    source = _move_source(1, "LEGACYPACS", move_port)
    staging = tmp_path / "staging"
    client = RouterClient(source, staging, idle_seconds=1.0)
    try:
        sink = StagingSink(staging / "attempt")
        client.expect(sink, ["1.2.3.4"])
        assert _send(move_port, first) == 0x0000
        client.settle(sink, 1, 10)
        assert [i.sop_instance_uid for i in sink.received.values()] == [first.SOPInstanceUID]
        assert client.routed == {"unrouted": 1}
    finally:
        client.close()
    time.sleep(0.5)
    assert _send(move_port, second) == 0xA700  # nothing is waiting: refused
    deadline = time.monotonic() + 15
    while _router_running(move_port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _router_running(move_port)
    assert not temp_folder(staging, move_port).exists()


def _router_running(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(control_address("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_a_port_held_by_another_program_is_named(tmp_path):
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        with pytest.raises(Exception, match=f"C-MOVE destination 127.0.0.1:{port} could not start: error: OSError"):
            RouterClient(_move_source(1, "LEGACYPACS", port), tmp_path / "staging")


def test_a_router_gone_as_we_send_is_started_again(tmp_path, monkeypatch):
    """A router that stops at its idle time just as a task connects: the task's first
    request meets a closed connection (a broken pipe, as a slow CI host showed), and the
    task starts another router instead of failing."""
    import socket

    from include.pacs_migration.dimse import move

    real, calls = move._connect_or_start, []

    def stopping_first(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            return real(*args, **kwargs)
        ours, theirs = socket.socketpair()
        theirs.close()  # the router went away after accepting us
        return ours

    monkeypatch.setattr(move, "_connect_or_start", stopping_first)
    move_port = free_port()
    client = RouterClient(_move_source(1, "LEGACYPACS", move_port), tmp_path / "staging", idle_seconds=1.0)
    try:
        assert len(calls) == 2 and client.msg_id > 0
    finally:
        client.close()


def test_a_task_connected_but_not_yet_registered_keeps_the_router(tmp_path):
    """A task that has connected is busy even before its first request: the router
    does not stop at its idle time under it (on a slow host the register comes late)."""
    import json

    from include.pacs_migration.dimse import move

    move_port = free_port()
    sock = move._connect_or_start(_move_source(1, "LEGACYPACS", move_port), tmp_path / "staging", 20.0, 0.5)
    try:
        time.sleep(2.0)  # four idle times with no registration
        sock.settimeout(10)
        sock.sendall(b'{"op": "register"}\n')
        reply = sock.makefile("r", encoding="utf-8").readline()
        assert json.loads(reply)["reply"] == "registered"
    finally:
        sock.close()
    deadline = time.monotonic() + 15
    while _router_running(move_port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _router_running(move_port)  # and it still stops once the task has gone
