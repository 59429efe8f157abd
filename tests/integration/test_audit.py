"""Issue 16, point 4: DICOM audit messages, schema-valid; the bucket's
hash-chained log and `audit verify` (tampering detected); delivery to a real
rsyslog over TLS (RFC 5425); `audit find` and the trace lookup record."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from include.pacs_migration.audit import AuditTrail, EventType, chain
from include.pacs_migration.audit.messages import Participant
from include.pacs_migration.config import AuditConfig, SyslogConfig, TargetConfig
from include.pacs_migration.store import ObjectStore
from peers.ports import free_port
from tests.conftest import TEST_KEYER
from tests.peers import loopback_source, require_binary
from tests.tls_certs import TestCA

STUDY = "1.2.826.0.1.3680043.8.498.1"
KEY = TEST_KEYER.key_of("4711006")


def _every_event(trail: AuditTrail) -> None:
    """One message of each event the pipeline records."""
    from pydicom import Dataset

    trail.application(start=True)
    q = Dataset()
    q.QueryRetrieveLevel, q.StudyDate, q.ModalitiesInStudy = "STUDY", "20190301", "CT"
    trail.auditing_find(lambda identifier: [])(q)
    rows = [
        {
            "study_instance_uid": STUDY,
            "state": "migrated",
            "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
            "patient_key": KEY,
        },
        {"study_instance_uid": STUDY, "state": "quarantined", "reason": "UNSOLICITED", "patient_key": KEY},
    ]
    trail.transfer(rows, dt.datetime.now(dt.UTC))
    trail.router_alert({"calling_ae": "ROGUE", "address": "127.0.0.1", "why": "association refused"})
    trail.accessed("alice", "a clinician cannot find the study", [STUDY], [KEY])
    trail.application(start=False)


def _trail(s3_server, bucket, **audit) -> tuple[AuditTrail, ObjectStore]:
    store = ObjectStore(s3_server.client(), TargetConfig(bucket=bucket))
    return AuditTrail(store, AuditConfig(**audit), loopback_source(104), "airflow:pacs_migration/test-run"), store


def test_every_message_is_schema_valid_and_the_validator_can_fail(s3_server, bucket):
    trail, store = _trail(s3_server, bucket)
    _every_event(trail)
    validate = chain.schema_validator()
    ids = [m.split(b'csd-code="', 2)[1][:6].decode() for m in trail.pending]
    assert ids == ["110100", "110112", "110102", "110104", "110113", "110113", "110103", "110100"]
    assert [validate(m) for m in trail.pending] == [None] * 8
    assert validate(trail.pending[0].replace(b'EventOutcomeIndicator="0"', b'EventOutcomeIndicator="3"'))
    assert validate(
        trail.pending[0]
        .replace(b"<ActiveParticipant", b"<Participant")
        .replace(b"</ActiveParticipant", b"</Participant")
    )
    assert b"4711006" not in b"".join(trail.pending)  # the patient is named by key only
    assert trail.flush() == 8


def test_the_chain_proves_itself_and_catches_tampering(s3_server, bucket):
    trail, store = _trail(s3_server, bucket)
    for _ in range(4):
        _every_event(trail)
        trail.flush()
    result = chain.verify(store, chain.schema_validator())
    assert result.ok and (result.links, result.messages) == (4, 32)

    c = s3_server.client()
    second = chain.link_key(store, 2)
    original = store.get(second)
    store.put(second, original.replace(b"alice", b"mallory"), "application/json")  # altered
    assert any("does not chain" in p for p in chain.verify(store).problems)
    store.put(second, original, "application/json")
    assert chain.verify(store).ok
    c.delete_object(Bucket=bucket, Key=chain.link_key(store, 3))  # removed from the middle
    problems = chain.verify(store).problems
    assert any("link 4 where link 3 belongs" in p for p in problems)
    assert any("does not chain" in p for p in problems)
    store.put(chain.link_key(store, 3), b"{}", "application/json")
    c.delete_object(Bucket=bucket, Key=chain.link_key(store, 4))  # the tail removed
    assert any("head marker names link 4" in p for p in chain.verify(store).problems)


def test_find_answers_who_touched_a_study_or_a_patient(s3_server, bucket, capsys, monkeypatch):
    from include.cli import main

    trail, store = _trail(s3_server, bucket)
    _every_event(trail)
    trail.flush()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("PACS_PATIENT_KEY_SECRET", "test-patient-key-secret-0123456789")
    common = ["--bucket", bucket, "--endpoint-url", s3_server.endpoint_url, "--region", "us-east-1"]
    assert main(["audit", "find", "--patient-id", "4711006", "--json", *common]) == 0
    events = json.loads(capsys.readouterr().out)
    assert [e["event"] for e in events] == [
        "Begin Transferring DICOM Instances",
        "DICOM Instances Transferred",
        "DICOM Instances Accessed",
    ]
    assert any("alice" in p for p in events[2]["participants"])
    assert events[2]["description"] == "purpose of use: a clinician cannot find the study"
    assert main(["audit", "find", "--study", STUDY, *common]) == 0
    text = capsys.readouterr().out
    assert "Security Alert" in text and "LEGACYPACS" in text and "airflow:pacs_migration/test-run" in text
    assert main(["audit", "verify", "--user", "ines", *common]) == 0
    assert "chain intact" in capsys.readouterr().out
    # who watches the watchers: each reading of the trail is in the trail (110101), with who read it
    used = [e for e in chain.find(store, {f"s3://{bucket}/_audit/"}) if e["event"] == "Audit Log Used"]
    assert len(used) == 3 and any("ines" in p for p in used[-1]["participants"])
    assert used[-1]["description"].startswith("audit verify:") and chain.verify(store, chain.schema_validator()).ok
    monkeypatch.delenv("PACS_PATIENT_KEY_SECRET")
    assert main(["audit", "find", "--patient-id", "4711006", *common]) == 2


class Rsyslog:
    """rsyslogd receiving RFC 5425 (syslog over TLS) on loopback into a file."""

    def __init__(self, folder: Path, ca: TestCA) -> None:
        binary = require_binary("rsyslogd", "rsyslog")
        if not list(Path("/usr/lib").glob("*/rsyslog/lmnsd_gtls.so")):
            if os.environ.get("CI") == "true":
                pytest.fail("rsyslog-gnutls is required in CI; .ci/run installs it")
            pytest.skip("rsyslog-gnutls not installed")
        folder.mkdir(parents=True)
        server = ca.issue("collector", "localhost", server=True)
        self.port, self.out = free_port(), folder / "audit.log"
        conf = folder / "rsyslog.conf"
        conf.write_text(
            f'global(workDirectory="{folder}" DefaultNetstreamDriver="gtls"\n'
            f'  DefaultNetstreamDriverCAFile="{ca.files.cert}"\n'
            f'  DefaultNetstreamDriverCertFile="{server.cert}" DefaultNetstreamDriverKeyFile="{server.key}")\n'
            'module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="anon")\n'
            f'input(type="imtcp" port="{self.port}" address="127.0.0.1")\n'
            'template(name="audit" type="string" string="%app-name%|%msgid%|%syslogfacility-text%|%msg%\\n")\n'
            f'*.* action(type="omfile" file="{self.out}" template="audit")\n'
        )
        self.proc = subprocess.Popen(
            [binary, "-n", "-f", str(conf), "-i", str(folder / "rsyslog.pid")],
            stdout=subprocess.DEVNULL,
            stderr=open(folder / "rsyslogd.err", "wb"),  # noqa: SIM115
        )
        deadline = time.monotonic() + 15
        while not _listening(self.port) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _listening(self.port), (folder / "rsyslogd.err").read_text()

    def lines(self, n: int, seconds: float = 15) -> list[str]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            lines = self.out.read_text(encoding="utf-8").splitlines() if self.out.exists() else []
            if len(lines) >= n:
                return lines
            time.sleep(0.1)
        return lines

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_messages_reach_rsyslog_over_tls(tmp_path, s3_server, bucket):
    ca = TestCA(tmp_path / "ca", "audit-ca")
    collector = Rsyslog(tmp_path / "rsyslog", ca)
    try:
        syslog = SyslogConfig(host="127.0.0.1", port=collector.port, ca_file=ca.files.cert, server_name="localhost")
        trail, store = _trail(s3_server, bucket, syslog=syslog)
        _every_event(trail)
        sent = list(trail.pending)
        trail.flush()
        lines = collector.lines(len(sent))
    finally:
        collector.stop()
    assert len(lines) == len(sent)
    validate = chain.schema_validator()
    for line, message in zip(lines, sent, strict=True):
        app, msgid, facility, body = line.split("|", 3)
        assert (app, msgid, facility) == ("pacs-migration", "IHE+RFC-3881", "authpriv")
        body = body.lstrip("\ufeff")
        assert body == message.decode() and validate(body.encode()) is None
    assert chain.verify(store).messages == len(sent)  # the bucket holds them too


def test_an_unreachable_collector_loses_nothing_from_the_bucket(s3_server, bucket, tmp_path, caplog):
    ca = TestCA(tmp_path / "ca", "audit-ca")
    syslog = SyslogConfig(host="127.0.0.1", port=free_port(), ca_file=ca.files.cert)
    trail, store = _trail(s3_server, bucket, syslog=syslog)
    trail.alert(EventType.NODE_AUTHENTICATION, Participant("ROGUE", True), "association refused")
    assert trail.flush() == 1
    assert chain.verify(store).messages == 1
    assert "not delivered to syslog" in caplog.text


def test_a_failed_step_is_recorded_and_its_own_error_is_the_one_raised(s3_server, bucket):
    trail, store = _trail(s3_server, bucket)
    with pytest.raises(ValueError, match="the step's own"), trail.session():
        trail.transfer([{"study_instance_uid": STUDY, "state": "unresolved"}], dt.datetime.now(dt.UTC), failed=True)
        raise ValueError("the step's own failure")
    (link,) = [chain.Link.parse(d) for _k, d in chain.links(store)]
    assert [m.split('EventOutcomeIndicator="', 1)[1][:1] for m in link.messages] == ["0", "8"]  # begun; failed

    broken = AuditTrail(
        ObjectStore(s3_server.client(), TargetConfig(bucket="no-such-bucket")), AuditConfig(), None, "x"
    )
    with pytest.raises(ValueError, match="the step's own"), broken.session():
        broken.application(start=True)
        raise ValueError("the step's own failure")  # not NoSuchBucket from the audit write
