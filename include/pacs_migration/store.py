"""Object store: the S3 bucket behind a small client.

Instance objects are write-once: ``If-None-Match: *`` makes S3 refuse to
overwrite, so a re-run or a concurrent duplicate task never replaces anything;
every object carries its SHA-256 (the S3 checksum, and in metadata so a re-read
can be compared even where the server does not verify checksums).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import io
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import botocore.loaders
import botocore.session
from botocore.config import Config
from botocore.exceptions import ClientError

from .config import TargetConfig
from .store_direct import DirectRequests, HandedBack, put_headers

log = logging.getLogger(__name__)

Body = bytes | Path  # an object's bytes, or the file that holds them (read in parts, never whole)
_CHUNK = 1 << 20


# botocore's data (S3's API model, its endpoint rules, the partitions: ~1 MB of JSON) in one
# loader for every client this process makes: parsed once, not once per client's session
# (each task's client from the Connection is a new session).
_MODELS = botocore.loaders.create_loader(os.environ.get("AWS_DATA_PATH"))


def share_models(session: botocore.session.Session) -> None:
    """Let ``session``'s clients take botocore's data from the process's one loader
    (before it makes a client; as botocore itself shares it between a session's clients).
    Where the session's own loader looks (boto3's data, ``AWS_DATA_PATH``), the shared one looks too."""
    own = session.get_component("data_loader")
    _MODELS.search_paths.extend(p for p in own.search_paths if p not in _MODELS.search_paths)
    session.register_component("data_loader", _MODELS)


def warm_up() -> None:
    """Parse S3's models into the shared loader (no request is sent). In a process that
    forks tasks, every task's S3 client then finds them parsed."""
    session = botocore.session.get_session()
    share_models(session)
    session.create_client(
        "s3",
        region_name="us-east-1",
        endpoint_url="http://127.0.0.1:9",  # never contacted: making a client sends nothing
        aws_access_key_id="warm-up",
        aws_secret_access_key="warm-up",
    )


@functools.lru_cache(maxsize=8)
def _payload_unsigned(config: Config) -> Config:
    return config.merge(Config(s3={**(config.s3 or {}), "payload_signing_enabled": False}))


def _checksum_covers_payload(request: Any, **_: Any) -> None:
    """A request carrying its body's SHA-256 (``x-amz-checksum-sha256``, a header the
    signature covers and S3 checks the body against) is not hashed again for the
    signature: ``UNSIGNED-PAYLOAD``, as botocore signs such a body over TLS. Without
    TLS (moto, a MinIO on plain HTTP) botocore would read and hash every byte once more."""
    config = request.context.get("client_config")
    if config is not None and "x-amz-checksum-sha256" in request.headers:
        request.context["client_config"] = _payload_unsigned(config)


def body_size(body: Body) -> int:
    return body.stat().st_size if isinstance(body, Path) else len(body)


def file_sha256(path: Path) -> str:
    """A file's SHA-256, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class _FileRange(io.RawIOBase):
    """Bytes ``start`` .. ``start + size`` of a file, as a file of their own:
    botocore sends it in chunks and seeks back to retry, so a part is never
    held in memory."""

    def __init__(self, path: Path, start: int, size: int) -> None:
        super().__init__()
        self._fh = open(path, "rb")  # noqa: SIM115 - closed with this object
        self._start, self._size, self._pos = start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, min(self._size, base + offset))
        return self._pos

    def read(self, n: int | None = -1) -> bytes:
        left = self._size - self._pos
        n = left if n is None or n < 0 else min(n, left)
        self._fh.seek(self._start + self._pos)
        data = self._fh.read(n)
        self._pos += len(data)
        return data

    def close(self) -> None:
        self._fh.close()
        super().close()


def _part(body: Body, start: int, size: int) -> tuple[Any, str]:
    """A part to send (bytes, or a range of the file) and its SHA-256, base64 (read in chunks)."""
    if not isinstance(body, Path):
        chunk = body[start : start + size]
        return chunk, base64.b64encode(hashlib.sha256(chunk).digest()).decode()
    size = min(size, body.stat().st_size - start)
    part = _FileRange(body, start, size)
    digest = hashlib.sha256()
    while chunk := part.read(_CHUNK):
        digest.update(chunk)
    part.seek(0)
    return part, base64.b64encode(digest.digest()).decode()


class PutOutcome(str, Enum):
    CREATED = "created"
    ALREADY_PRESENT = "already_present"  # same bytes were there: idempotent re-run
    CONFLICT = "conflict"  # different bytes under the same key
    REPAIRED = "repaired"  # a quarantine object whose bytes no longer matched its hash, rewritten


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    sha256: str | None
    metadata: dict[str, str] | None = None


@dataclass(frozen=True)
class PutResult:
    outcome: PutOutcome
    sha256: str  # of the object now under the key
    size: int
    metadata: dict[str, str] | None = None  # of the object that was already there (not CREATED)


class ObjectStore:
    """S3 operations the pipeline needs, on a boto3 S3 client.

    Parameters
    ----------
    client : botocore S3 client
        Made by the caller (in Airflow: ``S3Hook(aws_conn_id).get_conn()``),
        with its endpoint, credentials and retry policy.
    target : TargetConfig
        Bucket, prefix and server-side encryption settings.
    """

    def __init__(self, client: Any, target: TargetConfig) -> None:
        self.client = client
        self.target = target
        events = getattr(getattr(client, "meta", None), "events", None)  # None: a test's stand-in client
        if events is not None:
            events.register("before-sign.s3", _checksum_covers_payload, unique_id="pacs-checksum-payload")
        self._direct: DirectRequests | None = None
        self._direct_lock = threading.Lock()
        self._direct_tried = not target.lean_requests

    def _lean(self) -> DirectRequests | None:
        """The lean path for instance PUTs and GETs (made on first use: botocore prepares a HEAD),
        None when off (``target.lean_requests``), not possible for this client, or stopped."""
        if not self._direct_tried:
            with self._direct_lock:
                if not self._direct_tried:
                    try:
                        self._direct = DirectRequests.for_client(self.client, self.bucket)
                    except Exception as exc:  # noqa: BLE001 - botocore sends all, and says what is wrong
                        log.info("S3: no lean requests (%s)", type(exc).__name__)
                    self._direct_tried = True
        return self._direct if self._direct is not None and self._direct.active else None

    @property
    def bucket(self) -> str:
        return self.target.bucket

    def _sse(self) -> dict[str, str]:
        if self.target.sse == "none":
            return {}
        args: dict[str, str] = {"ServerSideEncryption": self.target.sse}
        if self.target.sse == "aws:kms" and self.target.kms_key_id:
            args["SSEKMSKeyId"] = self.target.kms_key_id
        return args

    def put_new(
        self,
        key: str,
        data: Body,
        sha256_hex: str,
        metadata: dict[str, str] | None = None,
        same_if: tuple[str, ...] = (),
        writer: str | None = None,
        content_type: str = "application/dicom",
    ) -> PutResult:
        """Write once; never overwrite.

        When the key exists, the object counts as the same (``ALREADY_PRESENT``)
        if its SHA-256 is equal, or if every metadata entry named in
        ``same_if`` is equal (e.g. the source bytes' hash and the rule set: a
        normalized object carries its modification time, so a re-run's bytes
        differ while its meaning does not). Anything else is a ``CONFLICT``.
        ``writer`` (a tag of the run) is stored with the object: a put whose
        first response was lost and whose retry finds the object it wrote
        itself is still ``CREATED``. ``data``: bytes, or a file (read in parts
        above the multipart threshold: memory flat in the object's size).
        """
        meta = {"sha256": sha256_hex, **(metadata or {}), **({"writer": writer} if writer else {})}
        try:
            self._write(key, data, sha256_hex, content_type, meta, {"IfNoneMatch": "*"})
            return PutResult(PutOutcome.CREATED, sha256_hex, body_size(data))
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code not in ("PreconditionFailed", "412") and status != 412:
                raise
        existing = self.head(key)
        if existing is None:
            raise RuntimeError(f"{key}: write refused as existing, but the object cannot be read")
        theirs = existing.metadata or {}
        same = existing.sha256 == sha256_hex or (
            bool(same_if) and all(theirs.get(k) is not None and theirs.get(k) == meta.get(k) for k in same_if)
        )
        outcome = PutOutcome.ALREADY_PRESENT if same else PutOutcome.CONFLICT
        if same and writer and theirs.get("writer") == writer:
            outcome = PutOutcome.CREATED  # ours: the first response was lost, not the write
        return PutResult(outcome, existing.sha256 or "", existing.size, theirs)

    def _write(
        self, key: str, data: Body, sha256_hex: str, content_type: str, meta: dict[str, str], condition: dict[str, str]
    ) -> None:
        """One PUT, or a multipart upload above the threshold; ``condition``: If-None-Match or none."""
        size = body_size(data)
        if size > self.target.multipart_threshold_mb << 20:
            self._put_parts(key, data, content_type, meta, condition)
            return
        checksum = base64.b64encode(bytes.fromhex(sha256_hex)).decode()
        with contextlib.ExitStack() as stack:
            # A file goes as an open file: sent in chunks (and sought back to send again).
            body = stack.enter_context(open(data, "rb")) if isinstance(data, Path) else data
            if self._put_lean(key, body, size, put_headers(checksum, content_type, meta, condition, self._sse())):
                return
            self.client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=body,
                ChecksumSHA256=checksum,
                ContentType=content_type,
                Metadata=meta,
                **condition,
                **self._sse(),
            )

    def _put_lean(self, key: str, body: Any, size: int, headers: dict[str, str] | None) -> bool:
        """True when the lean PUT wrote the object; a 412 raises as botocore's would; False:
        botocore is to send it (the file sought back to its start)."""
        lean = self._lean()
        if lean is None or headers is None:
            return False
        try:
            if lean.put(key, body, size, headers):
                return True
        except HandedBack:
            if not isinstance(body, bytes):
                body.seek(0)
            return False
        error = {
            "Code": "PreconditionFailed",
            "Message": "At least one of the pre-conditions you specified did not hold",
        }
        raise ClientError({"Error": error, "ResponseMetadata": {"HTTPStatusCode": 412}}, "PutObject")

    def _put_parts(
        self, key: str, data: Body, content_type: str, meta: dict[str, str], condition: dict[str, str]
    ) -> None:
        """A multipart upload, each part with its SHA-256 (S3 verifies each), completed
        under ``condition`` (``If-None-Match: *``: write-once as a single PUT); aborted
        on any failure, so no part is left behind (a 412 at completion included). A
        file is read one part at a time."""
        part_size = self.target.multipart_part_mb << 20
        upload = self.client.create_multipart_upload(
            Bucket=self.bucket,
            Key=key,
            ContentType=content_type,
            Metadata=meta,
            ChecksumAlgorithm="SHA256",
            **self._sse(),
        )
        upload_id = upload["UploadId"]
        try:
            parts = []
            for number, start in enumerate(range(0, body_size(data), part_size), 1):
                chunk, digest = _part(data, start, part_size)
                try:
                    rsp = self.client.upload_part(
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=chunk,
                        ChecksumAlgorithm="SHA256",
                        ChecksumSHA256=digest,
                    )
                finally:
                    if isinstance(chunk, _FileRange):
                        chunk.close()
                parts.append({"PartNumber": number, "ETag": rsp["ETag"], "ChecksumSHA256": digest})
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}, **condition
            )
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except ClientError:
                log.warning("a multipart upload could not be aborted; the bucket's lifecycle rule must remove it")
            raise

    def put_verified(
        self,
        key: str,
        data: Body,
        sha256_hex: str,
        metadata: dict[str, str] | None = None,
        writer: str | None = None,
        content_type: str = "application/dicom",
    ) -> PutResult:
        """Write-once for objects keyed by their own SHA-256 (quarantine): an
        existing object is re-read, and rewritten from ``data`` when its bytes
        no longer hash to the key (``REPAIRED``): no other content can
        legitimately live there."""
        put = self.put_new(key, data, sha256_hex, metadata, writer=writer, content_type=content_type)
        if put.outcome is PutOutcome.CREATED:
            return put
        stored = self.sha256_of(key)
        if stored is not None and stored[0] == sha256_hex:
            return PutResult(PutOutcome.ALREADY_PRESENT, sha256_hex, stored[1])
        meta = {"sha256": sha256_hex, **(metadata or {}), **({"writer": writer} if writer else {})}
        self._write(key, data, sha256_hex, content_type, meta, {})
        return PutResult(PutOutcome.REPAIRED, sha256_hex, body_size(data))

    def put(
        self,
        key: str,
        data: bytes,
        content_type: str,
        metadata: dict[str, str] | None = None,
        condition: dict[str, str] | None = None,
    ) -> None:
        """Write or replace a manifest-type object (not an instance);
        ``condition``: IfMatch / IfNoneMatch."""
        digest = hashlib.sha256(data).digest()
        self.client.put_object(
            Bucket=self.bucket,
            Key=key,
            Body=data,
            ContentType=content_type,
            ChecksumSHA256=base64.b64encode(digest).decode(),
            Metadata={"sha256": digest.hex(), **(metadata or {})},
            **(condition or {}),
            **self._sse(),
        )

    def head(self, key: str) -> StoredObject | None:
        try:
            rsp = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return None
            raise
        meta = rsp.get("Metadata", {})
        return StoredObject(key, int(rsp["ContentLength"]), meta.get("sha256"), meta)

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def get_or_none(self, key: str) -> bytes | None:
        return self.get_versioned(key)[0]

    def get_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        """An object's bytes and ETag, or (None, None) when it does not exist."""
        try:
            rsp = self.client.get_object(Bucket=self.bucket, Key=key)
            return rsp["Body"].read(), rsp.get("ETag")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None, None
            raise

    def put_if_unchanged(
        self, key: str, data: bytes, content_type: str, etag: str | None, metadata: dict[str, str]
    ) -> bool:
        """Replace a manifest only if it is still the version read (``etag``;
        None: only if it does not exist). False when another write came in
        between (e.g. a killed run's PUT landing late). A retry that finds our
        own bytes (same sha256 and ``metadata``) there counts as written."""
        try:
            self.put(key, data, content_type, metadata, {"IfMatch": etag} if etag else {"IfNoneMatch": "*"})
            return True
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status not in (409, 412) and exc.response.get("Error", {}).get("Code") != "PreconditionFailed":
                raise
        theirs = self.head(key)
        return (
            theirs is not None
            and theirs.sha256 == hashlib.sha256(data).hexdigest()
            and all((theirs.metadata or {}).get(k) == v for k, v in metadata.items())
        )

    def copy(self, source_key: str, key: str) -> None:
        """Server-side copy (bytes and metadata, under our encryption settings);
        the caller re-reads the copy before it trusts it. An object over the
        multipart threshold is copied in parts (one CopyObject takes at most 5 GB)."""
        head = self.client.head_object(Bucket=self.bucket, Key=source_key)
        if int(head["ContentLength"]) > self.target.multipart_threshold_mb << 20:
            self._copy_parts(source_key, key, head)
            return
        self.client.copy_object(
            Bucket=self.bucket,
            Key=key,
            CopySource={"Bucket": self.bucket, "Key": source_key},
            MetadataDirective="COPY",
            **self._sse(),
        )

    def _copy_parts(self, source_key: str, key: str, head: dict[str, Any]) -> None:
        """UploadPartCopy by ranges of ``multipart_part_mb``; aborted on any failure."""
        upload_id = self.client.create_multipart_upload(
            Bucket=self.bucket,
            Key=key,
            ContentType=head.get("ContentType") or "application/octet-stream",
            Metadata=head.get("Metadata") or {},
            **self._sse(),
        )["UploadId"]
        size, part = int(head["ContentLength"]), self.target.multipart_part_mb << 20
        try:
            parts = []
            for number, start in enumerate(range(0, size, part), 1):
                rsp = self.client.upload_part_copy(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    CopySource={"Bucket": self.bucket, "Key": source_key},
                    CopySourceRange=f"bytes={start}-{min(start + part, size) - 1}",
                )
                parts.append({"PartNumber": number, "ETag": rsp["CopyPartResult"]["ETag"]})
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            with contextlib.suppress(ClientError):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            raise

    def sha256_of(self, key: str) -> tuple[str, int] | None:
        """The SHA-256 and size of an object's bytes as read back now, streamed
        (an object of any size in constant memory); None when it does not exist."""
        digest, size = hashlib.sha256(), 0
        try:
            for chunk in self.iter_chunks(key):
                digest.update(chunk)
                size += len(chunk)
        except ClientError as exc:  # raised before any chunk: by the GET itself
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return digest.hexdigest(), size

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=key)

    def list_keys(self, prefix: str) -> Iterator[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                yield obj["Key"]

    def list_prefixes(self, prefix: str) -> Iterator[str]:
        """The "folders" right under a key prefix (``prefix`` may end in part of a name: ``…/source=``)."""
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix, Delimiter="/"):
            for common in page.get("CommonPrefixes", []):
                yield common["Prefix"]

    def list_objects(self, prefix: str) -> Iterator[tuple[str, str]]:
        """(key, ETag) under ``prefix``: what a reader needs to tell a changed object."""
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                yield obj["Key"], obj["ETag"]

    def get_range(self, key: str, start: int, end: int) -> tuple[bytes, int]:
        """Bytes ``start``..``end`` (inclusive) of an object (a header without its
        pixels), and the object's whole size (from Content-Range)."""
        rsp = self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end}")
        data = rsp["Body"].read()
        total = str(rsp.get("ContentRange") or "").rpartition("/")[2]
        return data, int(total) if total.isdigit() else start + len(data)

    def iter_chunks(self, key: str, chunk: int = 1 << 20) -> Iterator[bytes]:
        """An object's bytes in chunks, never the whole object in memory."""
        lean = self._lean()
        if lean is not None:
            try:
                chunks = lean.get(key, chunk)
            except HandedBack:
                pass  # botocore sends it: its retries, or its error for a missing key
            else:
                yield from chunks
                return
        body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
        try:
            yield from body.iter_chunks(chunk)
        finally:
            body.close()
