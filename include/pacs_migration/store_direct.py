"""The two requests every instance costs, its PUT and its re-read GET, sent lean.

botocore spends ~1 ms of CPU (with the GIL held) on each request before and after the
bytes move: its API model, a dozen events, the endpoint rules, header and XML parsing.
Here the same request is built directly, signed as botocore's ``S3SigV4Auth`` signs it
(the signing key derived once a day, not on each request), and sent with botocore's own
parts: its credentials (refreshed as they expire) and its HTTP session (TLS verification,
proxies, timeouts, the connection pool). The URL and the signing scope are botocore's too,
read once off a request it prepares for the bucket and never sends.

Only the plain outcomes are taken here: an object written, an object refused as existing
(412), an object's bytes. Anything else (an error status, a connection failure) is handed
back: the caller sends the request again through the botocore client, with its retries,
its rate limiter and its errors, and the store stops sending lean requests (a bucket that
throttles or fails is left to botocore's adaptive retries).
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from hashlib import sha256
from typing import Any
from urllib.parse import quote, urlsplit

import botocore
import botocore.client
from botocore.auth import EMPTY_SHA256_HASH, SIGNED_HEADERS_BLACKLIST, SIGV4_TIMESTAMP, UNSIGNED_PAYLOAD
from botocore.awsrequest import AWSRequest, AWSResponse
from botocore.compat import get_current_datetime
from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError
from urllib3.exceptions import ProtocolError as URLLib3ProtocolError
from urllib3.exceptions import ReadTimeoutError as URLLib3ReadTimeout

log = logging.getLogger(__name__)

_PROBE = "pacs-migration-probe"  # the key of the HEAD botocore prepares (never sent) to tell the bucket's URL
_NOT_SIGNED = frozenset(SIGNED_HEADERS_BLACKLIST)
_USER_AGENT = f"pacs-migration Botocore/{botocore.__version__}"
_HEADER_OF = {  # PutObject's arguments the lean PUT takes, and their headers
    "IfNoneMatch": "If-None-Match",
    "ServerSideEncryption": "x-amz-server-side-encryption",
    "SSEKMSKeyId": "x-amz-server-side-encryption-aws-kms-key-id",
}


class HandedBack(Exception):
    """The lean request did not end plainly; send it through the botocore client."""


@dataclass(frozen=True)
class _Scope:
    base: str  # scheme://host[:port][/bucket]: an object's URL is base + "/" + its quoted key
    region: str  # what botocore signs this bucket's requests for
    service: str


class _NoBody:
    def stream(self, *_: Any, **__: Any) -> Iterator[bytes]:
        return iter(())


def _scope(client: Any, bucket: str) -> _Scope | None:
    """Where botocore sends an object request of ``bucket`` and how it signs it (addressing
    style, FIPS, dual-stack, the signing region: as configured), taken from a HEAD it
    prepares and signs but never sends; None when it does not sign with plain SigV4
    (anonymous, SigV4a, an S3 Express directory bucket's session)."""
    seen: dict[str, Any] = {}

    def capture(request: Any, **_: Any) -> Any:
        if not urlsplit(request.url).path.endswith("/" + _PROBE):
            return None  # another thread's request on the same client: sent as usual
        seen.update(url=request.url, headers=dict(request.headers.items()))
        return AWSResponse(request.url, 200, {}, _NoBody())

    client.meta.events.register_first("before-send.s3.HeadObject", capture)
    try:
        client.head_object(Bucket=bucket, Key=_PROBE)
    finally:
        client.meta.events.unregister("before-send.s3.HeadObject", capture)
    headers = {k.lower(): v for k, v in seen.get("headers", {}).items()}
    auth = headers.get("authorization", "")
    if isinstance(auth, bytes):
        auth = auth.decode()
    if not auth.startswith("AWS4-HMAC-SHA256 Credential=") or "x-amz-s3session-token" in headers:
        return None
    scope = auth.split("Credential=", 1)[1].split(",", 1)[0].split("/")  # id/date/region/service/aws4_request
    url = seen["url"].split("?", 1)[0]
    if len(scope) != 5 or not url.endswith("/" + _PROBE):
        return None
    return _Scope(url[: -len(_PROBE) - 1], scope[2], scope[3])


class _Signer:
    """SigV4 as botocore's ``S3SigV4Auth`` signs a lean request (its one shape: no query
    string, the path as sent, the headers given; the body unsigned for a PUT, whose
    ``x-amz-checksum-sha256`` header is signed instead, the empty body's hash for a GET),
    with the signing key derived once a day and secret rather than on every request
    (4 HMACs). ``test_store_direct`` holds its headers equal to botocore's."""

    def __init__(self, scope: _Scope) -> None:
        parts = urlsplit(scope.base)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"  # IPv6, as botocore writes it
        if parts.port is not None and parts.port != {"http": 80, "https": 443}.get(parts.scheme):
            host = f"{host}:{parts.port}"
        self._host, self._path = host, parts.path
        self._region, self._service = scope.region, scope.service
        self._key: tuple[str, str, bytes] = ("", "", b"")  # secret, day, signing key

    def sign(self, method: str, quoted_key: str, headers: dict[str, str], credentials: Any) -> None:
        """Add X-Amz-Date, the session token, X-Amz-Content-SHA256 and Authorization to ``headers``."""
        stamp = get_current_datetime().strftime(SIGV4_TIMESTAMP)
        payload = UNSIGNED_PAYLOAD if method == "PUT" else EMPTY_SHA256_HASH
        headers["X-Amz-Date"] = stamp
        if credentials.token:
            headers["X-Amz-Security-Token"] = credentials.token
        headers["X-Amz-Content-SHA256"] = payload
        signed = {k.lower(): " ".join(v.split()) for k, v in headers.items() if k.lower() not in _NOT_SIGNED}
        signed.setdefault("host", self._host)
        names = sorted(signed)
        lines = [method, f"{self._path}/{quoted_key}", "", *(f"{n}:{signed[n]}" for n in names), ""]
        canonical = "\n".join([*lines, ";".join(names), payload])
        scope = f"{stamp[:8]}/{self._region}/{self._service}/aws4_request"
        to_sign = f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{sha256(canonical.encode()).hexdigest()}"
        signature = hmac.new(self._signing_key(credentials.secret_key, stamp[:8]), to_sign.encode(), sha256)
        headers["Authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={credentials.access_key}/{scope}, "
            f"SignedHeaders={';'.join(names)}, Signature={signature.hexdigest()}"
        )

    def _signing_key(self, secret: str, day: str) -> bytes:
        held = self._key  # one read: another thread may replace it
        if held[0] == secret and held[1] == day:
            return held[2]
        key = f"AWS4{secret}".encode()
        for part in (day, self._region, self._service, "aws4_request"):
            key = hmac.new(key, part.encode(), sha256).digest()
        self._key = (secret, day, key)
        return key


class DirectRequests:
    """Lean instance PUTs and GETs for one botocore S3 client and bucket; see the module."""

    def __init__(self, client: Any, scope: _Scope) -> None:
        self._credentials = client._request_signer._credentials  # botocore's, refreshed by it
        self._http = client._endpoint.http_session
        self._scope = scope
        self._signer = _Signer(scope)
        self._stopped = threading.Event()

    @classmethod
    def for_client(cls, client: Any, bucket: str) -> DirectRequests | None:
        """None for a stand-in client, anonymous credentials, or anything but plain SigV4."""
        if not isinstance(client, botocore.client.BaseClient) or bucket.endswith("--x-s3"):
            return None
        signer = getattr(client, "_request_signer", None)
        if getattr(signer, "_credentials", None) is None or getattr(client, "_endpoint", None) is None:
            return None
        scope = _scope(client, bucket)
        return cls(client, scope) if scope else None

    @property
    def active(self) -> bool:
        return not self._stopped.is_set()

    def _send(self, method: str, key: str, headers: dict[str, str], body: Any, stream: bool) -> Any:
        if self._stopped.is_set():
            raise HandedBack("lean requests stopped")
        quoted = quote(key, safe="/~")
        headers = {**headers, "User-Agent": _USER_AGENT}
        self._signer.sign(method, quoted, headers, self._credentials.get_frozen_credentials())
        prepared = AWSRequest(method, f"{self._scope.base}/{quoted}", headers, body).prepare()
        prepared.stream_output = stream
        try:
            return self._http.send(prepared)
        except Exception as exc:  # noqa: BLE001 - whatever failed, botocore sends it again
            self._stop(f"{method} failed to send ({type(exc).__name__})")
            raise HandedBack(type(exc).__name__) from exc

    def _stop(self, why: str) -> None:
        if not self._stopped.is_set():
            self._stopped.set()
            log.info("S3: lean requests stopped (%s); botocore sends the rest", why)

    def put(self, key: str, body: Any, size: int, headers: dict[str, str]) -> bool:
        """PUT ``body`` (bytes, or a file at its start) of ``size`` bytes: True when written,
        False when refused by a precondition (412); else :class:`HandedBack`."""
        response = self._send("PUT", key, {**headers, "Content-Length": str(size)}, body, stream=False)
        if response.status_code in (200, 412):
            return response.status_code == 200
        self._stop(f"PUT answered {response.status_code}")
        raise HandedBack(str(response.status_code))

    def get(self, key: str, chunk: int) -> Iterator[bytes]:
        """An object's bytes in chunks, checked against its Content-Length (botocore's errors
        when cut short); :class:`HandedBack` before the first chunk when the GET does not
        answer 200 (a missing key's 404 included: botocore raises its error)."""
        response = self._send("GET", key, {}, None, stream=True)
        raw = response.raw
        if response.status_code != 200:
            raw.drain_conn()  # an error document: read, so the connection can be reused
            raw.release_conn()
            if response.status_code != 404:
                self._stop(f"GET answered {response.status_code}")
            raise HandedBack(str(response.status_code))
        return self._body(raw, int(response.headers.get("Content-Length", -1)), chunk)

    @staticmethod
    def _body(raw: Any, expected: int, chunk: int) -> Iterator[bytes]:
        got = 0
        try:
            for data in raw.stream(chunk, decode_content=False):
                got += len(data)
                yield data
        except URLLib3ReadTimeout as exc:  # as botocore's streaming body raises them
            raise ReadTimeoutError(endpoint_url=exc.url, error=exc) from exc
        except URLLib3ProtocolError as exc:
            raise ResponseStreamingError(error=exc) from exc
        finally:
            if got != expected:
                raw.close()  # left unread (or cut short): the connection is not reused
            raw.release_conn()
        if expected >= 0 and got != expected:
            raise IncompleteReadError(actual_bytes=got, expected_bytes=expected)


def put_headers(
    sha256_b64: str, content_type: str, meta: dict[str, str], condition: dict[str, str], sse: dict[str, str]
) -> dict[str, str] | None:
    """The headers botocore would send for such a PutObject, or None when a value is not
    plain ASCII (botocore's rules for those are left to botocore)."""
    headers = {
        "Content-Type": content_type,
        "x-amz-checksum-sha256": sha256_b64,
        "x-amz-sdk-checksum-algorithm": "SHA256",  # S3's documented header: the algorithm of the one above
        **{f"x-amz-meta-{k}": v for k, v in meta.items()},
    }
    for arg, value in {**condition, **sse}.items():
        if arg not in _HEADER_OF:
            return None
        headers[_HEADER_OF[arg]] = value
    if not all(k.isascii() and v.isascii() and v.isprintable() for k, v in headers.items()):
        return None
    return headers
