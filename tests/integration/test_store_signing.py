"""Issue 22: an upload's bytes are hashed once. Every object goes up with its
SHA-256 (``x-amz-checksum-sha256``, which S3 checks the body against); on an
endpoint without TLS botocore also hashed the whole body for the request's
signature, a second SHA-256 pass over every byte migrated."""

from __future__ import annotations

import hashlib
import os

import botocore.auth
import pytest

from include.pacs_migration.config import TargetConfig
from include.pacs_migration.store import ObjectStore, PutOutcome


class _Hashed:
    """botocore's signer's SHA-256, counting the bytes it is given."""

    def __init__(self) -> None:
        self.bytes = 0

    def __call__(self, data: bytes = b"") -> _Counted:
        return _Counted(self, data)


class _Counted:
    """One SHA-256 whose input ``hashed`` counts; anything else (digest, copy, sizes: hmac uses it too) as hashlib's."""

    def __init__(self, hashed: _Hashed, data: bytes) -> None:
        self._hashed, self._h = hashed, hashlib.sha256(data)
        hashed.bytes += len(data)

    def update(self, more: bytes) -> None:
        self._hashed.bytes += len(more)
        self._h.update(more)

    def __getattr__(self, name: str):
        return getattr(self._h, name)


def _bytes(value: str | bytes | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


@pytest.fixture
def sent(s3_server, bucket, monkeypatch, request):
    """A store (instance requests lean, or all through botocore) and what its HTTP session sends."""
    lean = getattr(request, "param", True)
    store = ObjectStore(s3_server.client(), TargetConfig(bucket=bucket, sse="none", lean_requests=lean))
    requests: list[tuple[str, bytes, bytes]] = []
    session = store.client._endpoint.http_session  # both paths send through it
    send = session.send

    def record(prepared):
        headers = prepared.headers
        requests.append(
            (prepared.method, _bytes(headers.get("X-Amz-Content-SHA256")), _bytes(headers["Authorization"]))
        )
        return send(prepared)

    monkeypatch.setattr(session, "send", record)
    hashed = _Hashed()
    monkeypatch.setattr(botocore.auth, "sha256", hashed)
    return store, requests, hashed


def _signed_headers(auth: bytes) -> list[str]:
    return auth.decode().split("SignedHeaders=")[1].split(",")[0].split(";")


@pytest.mark.parametrize("sent", [True, False], ids=["lean", "botocore"], indirect=True)
@pytest.mark.parametrize("as_file", [False, True])
def test_an_instance_put_is_signed_without_hashing_its_bytes_again(sent, tmp_path, as_file):
    store, requests, hashed = sent
    data = os.urandom(3 << 20)
    sha = hashlib.sha256(data).hexdigest()
    body = tmp_path / "instance.dcm" if as_file else data
    if as_file:
        body.write_bytes(data)

    assert store.put_new("studies/1/2/3.dcm", body, sha).outcome is PutOutcome.CREATED

    (method, payload, auth) = requests[0]
    assert method == "PUT" and payload == b"UNSIGNED-PAYLOAD"
    assert "x-amz-checksum-sha256" in _signed_headers(auth)  # the body's hash is what the signature covers
    assert hashed.bytes < 10_000, hashed.bytes  # the canonical request only, not the 3 MiB body
    assert store.sha256_of("studies/1/2/3.dcm") == (sha, len(data))


def test_a_put_without_the_bodys_sha256_keeps_its_payload_signed(sent):
    """A request whose body no checksum header vouches for (a lease, say) is signed as botocore signs it."""
    store, requests, _ = sent
    store.client.put_object(Bucket=store.bucket, Key="_leases/x.json", Body=b"{}", ChecksumAlgorithm="CRC32")
    store.client.put_object(Bucket=store.bucket, Key="_leases/y.json", Body=b"{}")
    assert [r[1] for r in requests] == [hashlib.sha256(b"{}").hexdigest().encode()] * 2
