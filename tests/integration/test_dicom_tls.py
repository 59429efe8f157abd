"""DICOM TLS to the source, against Orthanc with DICOM TLS on and a CA made
by the test: a valid client certificate works; plaintext to the TLS port, a
client certificate from another CA and a server the client does not trust are
all refused, promptly, as DicomNetworkError."""

from __future__ import annotations

import datetime as dt
import time

import pytest
from pydicom.data import get_testdata_file

from include.pacs_migration.census import take_census
from include.pacs_migration.config import ConfigError, SourceConfig, TlsConfig, load_config
from include.pacs_migration.dimse import DicomNetworkError, FindSession, StagingSink, c_get
from include.pacs_migration.retrieve import retrieve_partition
from tests.peers import Orthanc, many_studies
from tests.tls_certs import TestCA


@pytest.fixture(scope="module")
def tls_pacs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    ca = TestCA(folder / "ca", "hospital-ca")
    other = TestCA(folder / "other", "rogue-ca")
    server = ca.issue("orthanc", "localhost", server=True)
    orthanc = Orthanc(
        folder / "orthanc",
        DicomTlsEnabled=True,
        DicomTlsCertificate=str(server.cert),
        DicomTlsPrivateKey=str(server.key),
        DicomTlsTrustedCertificates=str(ca.files.cert),
        DicomTlsRemoteCertificateRequired=True,
    )
    uids = many_studies(folder / "studies", 3)
    orthanc.upload_folder(folder / "studies")
    yield {
        "orthanc": orthanc,
        "ca": ca,
        "other": other,
        "client": ca.issue("client", "PACSMIGRATE", server=False),
        "rogue_client": other.issue("rogue", "PACSMIGRATE", server=False),
        "studies": uids,
    }
    orthanc.stop()


def _source(pacs, tls: TlsConfig | None) -> SourceConfig:
    o = pacs["orthanc"]
    return SourceConfig(
        host="127.0.0.1",
        port=o.dicom_port,
        called_ae_title=o.ae_title,
        calling_ae_title="PACSMIGRATE",
        acse_timeout=3,
        dimse_timeout=10,
        network_timeout=10,
        association_attempts=1,
        tls=tls,
    )


def test_valid_certificate_census_and_c_get(tls_pacs, tmp_path):
    source = _source(
        tls_pacs,
        TlsConfig(
            ca_file=tls_pacs["ca"].files.cert, cert_file=tls_pacs["client"].cert, key_file=tls_pacs["client"].key
        ),
    )
    with FindSession(source) as session:
        census = take_census(session.find, dt.date(2019, 3, 1))
    assert sorted({s.study_instance_uid for s in census.series}) == sorted(tls_pacs["studies"])
    sink = StagingSink(tmp_path / "staging")
    results = retrieve_partition(lambda q, c, s: c_get(source, q, c, s), list(census.series), sink, 2, 2)
    assert all(not r.missing for r in results)
    assert len(sink.received) == 3
    template = get_testdata_file("CT_small.dcm", read=True)
    assert all(r.size > len(template.PixelData) for r in sink.received.values())


@pytest.mark.parametrize("case", ["plaintext", "untrusted_client", "untrusted_server", "no_client_cert"])
def test_refused(case, tls_pacs):
    ca, other = tls_pacs["ca"].files.cert, tls_pacs["other"].files.cert
    tls = {
        "plaintext": None,
        "untrusted_client": TlsConfig(
            ca_file=ca, cert_file=tls_pacs["rogue_client"].cert, key_file=tls_pacs["rogue_client"].key
        ),
        "untrusted_server": TlsConfig(
            ca_file=other, cert_file=tls_pacs["client"].cert, key_file=tls_pacs["client"].key
        ),
        "no_client_cert": TlsConfig(ca_file=ca),
    }[case]
    started = time.monotonic()
    with pytest.raises(DicomNetworkError, match="failed|rejected"), FindSession(_source(tls_pacs, tls)) as session:
        take_census(session.find, dt.date(2019, 3, 1))
    assert time.monotonic() - started < 30  # refused, not hung
    # Orthanc's side names the refusal: each case fails for its own reason.
    reason = {
        "plaintext": "wrong version number",
        "untrusted_client": "certificate verify failed",
        "untrusted_server": "tlsv1 alert unknown ca",
        "no_client_cert": "peer did not return a certificate",
    }[case]
    log = tls_pacs["orthanc"].folder / "orthanc.log"
    for _ in range(50):  # bounded: 5 s for the log line
        if f"TLS error: {reason}" in log.read_text(errors="replace"):
            break
        time.sleep(0.1)
    assert f"TLS error: {reason}" in log.read_text(errors="replace")


def test_tls_config_names_the_field(tmp_path):
    base = {
        "source": {"host": "pacs", "port": 104, "called_ae_title": "A", "calling_ae_title": "B"},
        "target": {"bucket": "b-1"},
        "report": {"recipients": ["c@example.org"], "from_address": "m@example.org"},
    }
    with pytest.raises(ConfigError, match=r"source\.tls\.ca_file"):
        load_config({**base, "source": {**base["source"], "tls": {"ca_file": "missing.pem"}}}, tmp_path)
    (tmp_path / "ca.pem").write_text("x")
    (tmp_path / "me.pem").write_text("x")
    with pytest.raises(ConfigError, match=r"source\.tls\.key_file"):
        load_config(
            {**base, "source": {**base["source"], "tls": {"ca_file": "ca.pem", "cert_file": "me.pem"}}}, tmp_path
        )
    cfg = load_config({**base, "source": {**base["source"], "tls": {"ca_file": "ca.pem"}}}, tmp_path)
    assert cfg.source.tls == TlsConfig(ca_file=tmp_path / "ca.pem")
