"""Issue 16, point 3: the C-MOVE listener takes only what we asked for.
A rogue sender on loopback: a stranger's AE title, a store moved for someone
else, a peer without a certificate our CA signed. Each is refused and becomes
a security alert for the task's audit trail; the source itself still delivers."""

from __future__ import annotations

import ssl
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE

from include.pacs_migration.config import TlsConfig
from include.pacs_migration.dimse import RouterClient, StagingSink
from peers.ports import free_port
from tests.peers import loopback_source, series_study
from tests.tls_certs import TestCA


def _instances(root: Path, n: int) -> list[pydicom.Dataset]:
    series_study(root, 1, [n], tag=f"rogue-{root.name}")
    return [pydicom.dcmread(p) for p in sorted(root.glob("*.dcm"))]


def _send(port: int, ds: pydicom.Dataset, calling: str, tls: ssl.SSLContext | None = None, **kw) -> int | None:
    """C-STORE ``ds`` as ``calling``; None when the association is refused."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = 5
    ae.add_requested_context(str(ds.SOPClassUID))
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSMIGRATE", tls_args=(tls, "localhost") if tls else None)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(ds, **kw)
        return int(status.Status) if status else None
    finally:
        assoc.release()


def _client(tmp_path: Path, tls: TlsConfig | None = None):
    move_port = free_port()
    source = loopback_source(1, "LEGACYPACS").model_copy(
        update={"retrieve_method": "C-MOVE", "move_listen_port": move_port, "tls": tls}
    )
    alerts: list[dict] = []
    client = RouterClient(source, tmp_path / "staging", idle_seconds=1.0, on_alert=alerts.append)
    sink = StagingSink(tmp_path / "staging" / "attempt")
    client.expect(sink, [])
    return client, sink, alerts, move_port


def _wait(alerts: list, n: int) -> None:
    deadline = time.monotonic() + 10
    while len(alerts) < n and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_stranger_and_a_store_moved_for_someone_else_are_refused(tmp_path):
    real, forged, other = _instances(tmp_path / "a", 3)
    client, sink, alerts, port = _client(tmp_path)
    try:
        assert _send(port, forged, "ROGUE") is None  # association rejected: not the source's AE title
        _wait(alerts, 1)
        status = _send(port, other, "LEGACYPACS", originator_aet="OTHERSCU", originator_id=7)
        assert status == 0x0124  # refused: not authorized, moved for another AE
        _wait(alerts, 2)
        assert _send(port, real, "LEGACYPACS", originator_aet="PACSMIGRATE", originator_id=client.msg_id) == 0
        client.settle(sink, 1, 10)
    finally:
        client.close()
    assert [i.sop_instance_uid for i in sink.received.values()] == [real.SOPInstanceUID]
    assert alerts[0]["calling_ae"] == "ROGUE" and "not the source" in alerts[0]["why"]
    assert alerts[1]["calling_ae"] == "LEGACYPACS" and "OTHERSCU" in alerts[1]["why"]
    assert all(a["address"] == "127.0.0.1" for a in alerts)


def _context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    ctx.check_hostname = False
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


@pytest.mark.parametrize("peer", ["no-certificate", "another-ca", "the-pacs"])
def test_over_tls_only_a_peer_our_ca_signed_may_deliver(tmp_path, peer):
    """source.tls set: the listener serves DICOM TLS with our certificate and
    requires the PACS's, signed by the CA the source config names."""
    ca, rogue_ca = TestCA(tmp_path / "ca", "hospital-ca"), TestCA(tmp_path / "rogue", "rogue-ca")
    ours, pacs = ca.issue("listener", "localhost", server=True), ca.issue("pacs", "LEGACYPACS", server=False)
    impostor = rogue_ca.issue("impostor", "LEGACYPACS", server=False)
    tls = TlsConfig(ca_file=ca.files.cert, cert_file=ours.cert, key_file=ours.key, check_hostname=False)
    (ds,) = _instances(tmp_path / "b", 1)
    client, sink, alerts, port = _client(tmp_path, tls)
    context = {
        "no-certificate": _context(ca.files.cert),
        "another-ca": _context(ca.files.cert, impostor.cert, impostor.key),
        "the-pacs": _context(ca.files.cert, pacs.cert, pacs.key),
    }[peer]
    try:
        assert _send(port, ds, "ROGUE", context) is None  # a wrong AE title is refused over TLS too
        status = _send(port, ds, "LEGACYPACS", context)
        client.settle(sink, 1 if peer == "the-pacs" else 0, 10)
        _wait(alerts, 1)
    finally:
        client.close()
    if peer == "the-pacs":
        assert status == 0 and len(sink.received) == 1
        assert len(alerts) == 1 and alerts[0]["calling_ae"] == "ROGUE"
    else:
        assert status is None and not sink.received
        assert alerts and all("TLS handshake refused" in a["why"] for a in alerts)


def test_plain_dicom_to_a_tls_listener_is_refused(tmp_path):
    ca = TestCA(tmp_path / "ca", "hospital-ca")
    ours = ca.issue("listener", "localhost", server=True)
    tls = TlsConfig(ca_file=ca.files.cert, cert_file=ours.cert, key_file=ours.key, check_hostname=False)
    (ds,) = _instances(tmp_path / "c", 1)
    client, sink, alerts, port = _client(tmp_path, tls)
    try:
        assert _send(port, ds, "LEGACYPACS") is None
        _wait(alerts, 1)
    finally:
        client.close()
    assert not sink.received and alerts and "TLS handshake refused" in alerts[0]["why"]


def test_a_forged_copy_under_a_census_uid_never_migrates(archive, s3_server, bucket, tmp_path):
    """A stranger who spoofs the source's AE title (no TLS here) pushes a forged
    instance under a SOP Instance UID the census names, while the real PACS is
    still retrieving: both copies are quarantined UID_CONFLICT, none migrates,
    and the manifest says so (never a silent duplicate)."""
    import datetime as dt
    import threading

    from include.pacs_migration.census import take_census
    from include.pacs_migration.config import SourceConfig, TargetConfig
    from include.pacs_migration.dimse import FindSession, retriever
    from include.pacs_migration.manifest import read_census, read_transfer, write_census
    from include.pacs_migration.partition import Partition
    from include.pacs_migration.store import ObjectStore
    from include.pacs_migration.transfer import transfer_partition
    from peers.pacs import Faults, SimulatedPACS
    from tests.conftest import TEST_KEYER

    port = free_port()
    faults = Faults(stall_seconds=4.0, stall_times=1)  # the window in which the stranger strikes
    pacs = SimulatedPACS(archive.root, move_destinations={"PACSMIGRATE": ("127.0.0.1", port)}, faults=faults)
    partition = Partition.parse("2019-03-01/CR")
    store = ObjectStore(s3_server.client(), TargetConfig(bucket=bucket))
    try:
        source = SourceConfig(
            host="127.0.0.1", port=pacs.port, called_ae_title="LEGACYPACS", calling_ae_title="PACSMIGRATE",
            retrieve_method="C-MOVE", move_listen_port=port,
        )  # fmt: skip
        with FindSession(source) as session:
            census = take_census(session.find, dt.date(2019, 3, 1))
        write_census(store, partition, census.for_partition(partition))
        series = read_census(store, partition)
        victim = series[0].instances[0].sop_instance_uid
        real = next(
            ds for p in archive.root.rglob("*.dcm") if (ds := pydicom.dcmread(p, force=True)).SOPInstanceUID == victim
        )
        forged = real.copy()
        forged.PatientName = "FORGED^ROGUE"
        statuses: list = []
        strike = threading.Timer(1.5, lambda: statuses.append(_send(port, forged, "LEGACYPACS")))
        with retriever(source, tmp_path / "staging") as get:
            strike.start()
            counts = transfer_partition(
                get, store, partition, series, tmp_path / "staging", "rogue-run", 3, 1, 2, keyer=TEST_KEYER
            )
        strike.join()
    finally:
        pacs.stop()
    assert statuses == [0]  # the stranger got in (same AE title, no TLS): the content decides
    df = read_transfer(store, partition)
    rows = df[df.sop_instance_uid == victim]
    assert set(rows.state) == {"quarantined"} and set(rows.reason) == {"UID_CONFLICT"}
    assert len(rows) == 2  # both copies recorded
    assert counts.migrated == df.sop_instance_uid.nunique() - 1 and counts.quarantined == 2
    assert not [k for k in store.list_keys("studies/") if victim in k]


def test_a_peer_that_never_handshakes_does_not_hold_the_listener(tmp_path, monkeypatch):
    """The TLS handshake runs in the listener's accept loop: a silent peer is
    dropped after HANDSHAKE_SECONDS, and the PACS behind it still gets in."""
    import socket

    ca = TestCA(tmp_path / "ca", "hospital-ca")
    ours, pacs = ca.issue("listener", "localhost", server=True), ca.issue("pacs", "LEGACYPACS", server=False)
    tls = TlsConfig(ca_file=ca.files.cert, cert_file=ours.cert, key_file=ours.key, check_hostname=False)
    (ds,) = _instances(tmp_path / "d", 1)
    client, sink, alerts, port = _client(tmp_path, tls)
    try:
        with socket.create_connection(("127.0.0.1", port)):  # connects, says nothing
            started = time.monotonic()
            status = _send(port, ds, "LEGACYPACS", _context(ca.files.cert, pacs.cert, pacs.key))
            waited = time.monotonic() - started
        client.settle(sink, 1, 10)
    finally:
        client.close()
    assert status == 0 and len(sink.received) == 1
    assert waited < 20  # the silent peer was dropped (10 s), not waited on for ever
