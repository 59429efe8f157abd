"""Issue 22: an instance's PUT and its re-read GET are sent lean (botocore's ~1 ms of
per-request machinery skipped; its credentials, signer and HTTP session kept). The
objects must land exactly as botocore writes them, write-once must hold, the server
must accept the signatures, and anything but a plain answer must go back to botocore
and its retries. Real peers: moto's S3 server, a fault proxy in front of it."""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
from urllib.parse import quote

import boto3
import pytest
import requests
from botocore.config import Config
from botocore.exceptions import ClientError

from include.pacs_migration.config import TargetConfig
from include.pacs_migration.store import ObjectStore, PutOutcome
from include.pacs_migration.store_direct import DirectRequests, put_headers
from tests.s3_faults import S3FaultProxy

KEYS = ["studies/1.2.840/1.2.3/1.2.3.4.dcm", "odd name/with+plus~tilde & (x)/é.dcm"]


def _client(url: str, target: TargetConfig, key_id: str = "testing", secret: str = "testing", **options):
    return boto3.client(
        "s3",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
        **{"config": target.client_config(), **options},
    )


def _store(url: str, bucket: str, **settings) -> tuple[ObjectStore, list[str]]:
    """A store and the operations its client sent through botocore's own pipeline."""
    target = TargetConfig(bucket=bucket, **settings)
    store = ObjectStore(_client(url, target), target)
    store._lean()  # its probe first: a HEAD botocore prepares and never sends
    operations: list[str] = []
    store.client.meta.events.register("before-call.s3", lambda model, **_: operations.append(model.name))
    return store, operations


def _instance(n: int = 700_000) -> tuple[bytes, str]:
    data = os.urandom(n)
    return data, hashlib.sha256(data).hexdigest()


def test_instances_go_lean_and_land_as_botocore_writes_them(s3_server, bucket, tmp_path):
    store, operations = _store(s3_server.endpoint_url, bucket)
    written = {}
    for i, key in enumerate(KEYS):
        data, sha = _instance()
        body = data if i == 0 else tmp_path / "instance.dcm"  # bytes, and a file sent from disk
        if i:
            body.write_bytes(data)
        put = store.put_new(key, body, sha, {"source-sha256": "ab" * 32}, writer="run-1")
        assert put.outcome is PutOutcome.CREATED
        written[key] = (data, sha)
    assert "PutObject" not in operations  # not one instance through botocore's pipeline

    assert sorted(store.list_keys("")) == sorted(KEYS)  # under exactly the keys botocore names
    for key, (data, sha) in written.items():
        head = store.client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        assert head["ContentType"] == "application/dicom"
        assert head["ServerSideEncryption"] == "AES256"
        assert head["Metadata"] == {"sha256": sha, "source-sha256": "ab" * 32, "writer": "run-1"}
        assert head["ChecksumSHA256"] == base64.b64encode(bytes.fromhex(sha)).decode()
        assert store.sha256_of(key) == (sha, len(data))
        assert b"".join(store.iter_chunks(key, 1 << 16)) == data
    assert "GetObject" not in operations
    assert store._lean() is not None


def test_write_once_holds_on_the_lean_path(s3_server, bucket):
    store, operations = _store(s3_server.endpoint_url, bucket)
    data, sha = _instance()
    assert store.put_new(KEYS[0], data, sha).outcome is PutOutcome.CREATED
    assert store.put_new(KEYS[0], data, sha).outcome is PutOutcome.ALREADY_PRESENT  # a 412, then its HEAD
    other, other_sha = _instance()
    assert store.put_new(KEYS[0], other, other_sha).outcome is PutOutcome.CONFLICT
    assert store.sha256_of(KEYS[0]) == (sha, len(data))  # never overwritten
    assert "PutObject" not in operations and store._lean() is not None


def test_a_missing_object_gets_botocores_answer(s3_server, bucket):
    store, operations = _store(s3_server.endpoint_url, bucket)
    assert store.sha256_of("studies/none.dcm") is None
    with pytest.raises(ClientError) as error:
        list(store.iter_chunks("studies/none.dcm"))
    assert error.value.response["Error"]["Code"] == "NoSuchKey"
    assert operations == ["GetObject", "GetObject"]  # botocore's own request, raising its own error
    assert store._lean() is not None  # a 404 is a plain answer: lean requests go on


@pytest.mark.parametrize("fault", ["503", "500", "reset", "reset_after"])
def test_a_fault_hands_the_request_back_to_botocore(s3_server, bucket, fault, tmp_path):
    """The first instance PUT meets the fault; botocore sends it again (its retries), the
    object is written once and counted written, and the store's later requests go through
    botocore (its adaptive rate limiter sees every request of a bucket in trouble)."""
    faults = iter([fault])
    proxy = S3FaultProxy(s3_server.endpoint_url, fault=lambda m, p: next(faults, None) if m == "PUT" else None)
    try:
        store, operations = _store(proxy.endpoint_url, bucket)
        data, sha = _instance()
        body = tmp_path / "instance.dcm"  # a file cut mid-way is sent again from its start
        body.write_bytes(data)
        assert store.put_new(KEYS[0], body, sha, writer="run-1").outcome is PutOutcome.CREATED
        assert proxy.injected == {fault: 1}
        assert operations[:1] == ["PutObject"]
        assert store._lean() is None
        more, more_sha = _instance()
        assert store.put_new(KEYS[1], more, more_sha).outcome is PutOutcome.CREATED
        assert operations.count("PutObject") == 2
    finally:
        proxy.stop()
    assert store.sha256_of(KEYS[0]) == (sha, len(data))


def test_lean_requests_can_be_turned_off(s3_server, bucket):
    store, operations = _store(s3_server.endpoint_url, bucket, lean_requests=False)
    data, sha = _instance()
    assert store.put_new(KEYS[0], data, sha).outcome is PutOutcome.CREATED
    assert store.sha256_of(KEYS[0]) == (sha, len(data))
    assert operations == ["PutObject", "GetObject"] and store._lean() is None


@pytest.fixture
def signatures_checked(s3_server):
    """moto checks every request's SigV4 signature (and IAM policy) from here on: a user
    allowed S3, and its access key; the server goes back to trusting all afterwards."""
    iam = boto3.client(
        "iam",
        endpoint_url=s3_server.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    user = f"migrator-{os.urandom(4).hex()}"
    iam.create_user(UserName=user)
    policy = '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:*","Resource":"*"}]}'
    iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=policy)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    reset = f"{s3_server.endpoint_url}/moto-api/reset-auth"
    previous = requests.post(reset, data=b"0", timeout=10).json()["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"]
    try:
        yield key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        requests.post(reset, data=str(previous).encode(), timeout=10)


def test_the_server_accepts_the_lean_signatures(s3_server, bucket, signatures_checked):
    key_id, secret = signatures_checked
    target = TargetConfig(bucket=bucket)
    store = ObjectStore(_client(s3_server.endpoint_url, target, key_id, secret), target)
    for key in KEYS:
        data, sha = _instance(50_000)
        assert store.put_new(key, data, sha).outcome is PutOutcome.CREATED
        assert store.sha256_of(key) == (sha, len(data))
    assert store._lean() is not None  # every lean request answered plainly: none refused

    forged = ObjectStore(_client(s3_server.endpoint_url, target, key_id, "not-the-secret"), target)
    data, sha = _instance(50_000)
    with pytest.raises(ClientError) as error:  # the control: this server does check signatures
        forged.put_new("studies/forged.dcm", data, sha)
    assert error.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    assert forged._lean() is None


def test_only_a_plain_sigv4_client_goes_lean(s3_server, bucket):
    from botocore import UNSIGNED
    from botocore.config import Config

    anonymous = boto3.client("s3", endpoint_url=s3_server.endpoint_url, config=Config(signature_version=UNSIGNED))
    assert DirectRequests.for_client(anonymous, bucket) is None
    assert DirectRequests.for_client(object(), bucket) is None  # a test's stand-in client
    assert DirectRequests.for_client(s3_server.client(), "dir-bucket--use1-az4--x-s3") is None


def test_headers_botocore_would_treat_specially_stay_with_botocore():
    assert put_headers("x", "application/dicom", {"sha256": "ab"}, {"IfNoneMatch": "*"}, {}) is not None
    assert put_headers("x", "application/dicom", {"name": "Müller"}, {}, {}) is None  # not ASCII
    assert put_headers("x", "application/dicom", {}, {"IfMatch": '"e"'}, {}) is None  # a condition not mapped


class _CutShort:
    """A response body that ends before its Content-Length."""

    closed = released = False

    def stream(self, *_, **__):
        yield b"abc"

    def close(self) -> None:
        self.closed = True

    def release_conn(self) -> None:
        self.released = True


def test_a_body_cut_short_raises_botocores_error_and_drops_the_connection():
    from botocore.exceptions import IncompleteReadError

    raw = _CutShort()
    with pytest.raises(IncompleteReadError):
        list(DirectRequests._body(raw, 5, 1 << 20))
    assert raw.closed and raw.released  # not returned to the pool half-read


def test_a_probe_that_fails_leaves_every_request_to_botocore(s3_server, bucket, monkeypatch):
    from include.pacs_migration import store_direct

    def broken(*_):
        raise RuntimeError("no endpoint")

    monkeypatch.setattr(store_direct, "_scope", broken)
    store, operations = _store(s3_server.endpoint_url, bucket)
    data, sha = _instance(10_000)
    assert store.put_new(KEYS[0], data, sha).outcome is PutOutcome.CREATED
    assert operations == ["PutObject"] and store._lean() is None


@pytest.fixture
def tls_s3(s3_server, tmp_path):
    """moto's S3 (the same in-memory buckets) behind TLS with a certificate of a test CA;
    the CA's file, and a second CA's that did not sign it."""
    import ssl
    import threading

    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    from tests.tls_certs import TestCA

    ca, other = TestCA(tmp_path / "ca", "s3-ca"), TestCA(tmp_path / "other", "other-ca")
    issued = ca.issue("s3", "localhost", server=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(issued.cert, issued.key)
    app = DomainDispatcherApplication(create_backend_app)
    server = make_server("127.0.0.1", 0, app, True, request_handler=MotoRequestHandler, ssl_context=context)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"https://127.0.0.1:{server.server_port}", ca.files.cert, other.files.cert
    finally:
        server.shutdown()


def _tls_store(url: str, bucket: str, ca_file) -> tuple[ObjectStore, list[str]]:
    target = TargetConfig(bucket=bucket)
    once = target.client_config().merge(Config(retries={"mode": "standard", "max_attempts": 1}))
    client = _client(url, target, config=once, verify=str(ca_file))
    store = ObjectStore(client, target)
    store._lean()
    operations: list[str] = []
    client.meta.events.register("before-call.s3", lambda model, **_: operations.append(model.name))
    return store, operations


def test_the_lean_path_verifies_the_servers_certificate(tls_s3, bucket):
    """Over TLS the lean requests go out (signed for the payload by its checksum, as
    botocore over TLS) and check the server's certificate as the client is told to: a
    server its CA did not sign is refused on the lean path too (botocore, sent again,
    refuses it as well)."""
    from botocore.exceptions import SSLError

    url, ca_file, other_ca = tls_s3
    store, operations = _tls_store(url, bucket, ca_file)
    data, sha = _instance(100_000)
    assert store.put_new(KEYS[0], data, sha).outcome is PutOutcome.CREATED
    assert store.sha256_of(KEYS[0]) == (sha, len(data))
    assert operations == [] and store._lean() is not None  # both over TLS, lean

    untrusting, operations = _tls_store(url, bucket, other_ca)
    with pytest.raises(SSLError):
        untrusting.put_new(KEYS[1], data, sha)
    assert operations == ["PutObject"] and untrusting._lean() is None  # the lean attempt was refused first
    assert store.sha256_of(KEYS[1]) is None


SIGNED_AT = datetime.datetime(2026, 12, 7, 23, 59, 58)


@pytest.mark.parametrize(
    "base",
    [
        "http://127.0.0.1:5000/bucket",  # path style, a port
        "https://bucket.s3.eu-central-1.amazonaws.com",  # virtual host, the default port
        "https://[::1]:8443/bucket",  # IPv6
        "http://s3.example.org:80/a-bucket",  # the scheme's port, left out of Host
    ],
)
@pytest.mark.parametrize("token", [None, "session/token+=="])
def test_the_lean_signature_is_botocores(base, token, monkeypatch):
    """Every header the lean signer adds is what botocore's S3SigV4Auth adds to the same
    request at the same instant: the PUT (body unsigned, its checksum header signed) and
    the GET (the empty body's hash), with or without a session token; the signing key,
    derived once, serves the next day's request only once derived again."""
    from botocore import auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    from include.pacs_migration import store_direct

    now = [SIGNED_AT]
    monkeypatch.setattr(auth, "get_current_datetime", lambda: now[0])
    monkeypatch.setattr(store_direct, "get_current_datetime", lambda: now[0])
    credentials = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    region = "eu-central-1" if "eu-central-1" in base else "us-east-1"
    signer = store_direct._Signer(store_direct._Scope(base, region, "s3"))
    put = put_headers(
        "q1Z0+5aA4TZg3b2yXnkVbRm3MBpWkqGd0yW2ZV4BHl0=",
        "application/dicom",
        {"sha256": "ab" * 32, "writer": "run  1 "},  # inner and trailing spaces: trimmed when signed
        {"IfNoneMatch": "*"},
        {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "arn:aws:kms:eu-central-1:1:key/k"},
    )
    assert put is not None
    for day in (0, 1):
        now[0] = SIGNED_AT + datetime.timedelta(days=day)
        for method, key, headers in (
            ("PUT", KEYS[1], {**put, "Content-Length": "700000"}),
            ("GET", KEYS[0], {}),
        ):
            quoted = quote(key, safe="/~")
            ours = {**headers, "User-Agent": "ua"}
            signer.sign(method, quoted, ours, credentials.get_frozen_credentials())
            theirs = AWSRequest(
                method, f"{base}/{quoted}", {**headers, "User-Agent": "ua"}, b"x" if method == "PUT" else None
            )
            if method == "PUT":
                theirs.context["client_config"] = Config(s3={"payload_signing_enabled": False})
            auth.S3SigV4Auth(credentials.get_frozen_credentials(), "s3", region).add_auth(theirs)
            assert ours == dict(theirs.headers.items())
            assert ours["X-Amz-Date"] == now[0].strftime("%Y%m%dT%H%M%SZ")
