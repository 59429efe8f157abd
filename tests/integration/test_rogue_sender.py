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
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

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
    ae.add_requested_context(CTImageStorage)
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
