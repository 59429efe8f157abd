"""One writer per study date: a lease object in the bucket,
``_leases/date=YYYY-MM-DD.json``, taken with ``If-None-Match`` (atomic on S3),
renewed with ``If-Match`` while its holder works, and free once it expires
(its worker died) or is released. A DAG run holds it from its census to its
gate; a second run of the same date waits within a bound, then fails naming
the holder. Its tasks take it again as the same holder (a retry, the next task)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

log = logging.getLogger(__name__)

PREFIX = "_leases/"


class LeaseHeld(RuntimeError):
    """Another run holds the date; the message names it (run ids carry no patient data)."""

    def __init__(self, study_date: dt.date, holder: str, expires_at: float) -> None:
        until = dt.datetime.fromtimestamp(expires_at, dt.UTC).isoformat(timespec="seconds")
        super().__init__(f"study date {study_date} is being written by {holder} (lease until {until} unless renewed)")
        self.holder = holder


@dataclass(frozen=True)
class _Current:
    holder: str
    expires_at: float
    etag: str


def _precondition_failed(exc: ClientError) -> bool:
    err = exc.response.get("Error", {})
    return err.get("Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict") or exc.response.get(
        "ResponseMetadata", {}
    ).get("HTTPStatusCode") in (409, 412)


class DateLease:
    """The lease of one study date for one holder (``<dag_id>/<run_id>``)."""

    def __init__(
        self, store: Any, study_date: dt.date, holder: str, ttl_s: float = 600, clock: Callable[[], float] = time.time
    ) -> None:
        self.store, self.study_date, self.holder, self.ttl_s, self.clock = store, study_date, holder, ttl_s, clock
        self.key = store.target.key(f"{PREFIX}date={study_date.isoformat()}.json")
        self._etag: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self.lost = False

    def _body(self) -> bytes:
        return json.dumps({"holder": self.holder, "expires_at": self.clock() + self.ttl_s}).encode()

    def _put(self, **condition: str) -> bool:
        try:
            rsp = self.store.client.put_object(
                Bucket=self.store.bucket, Key=self.key, Body=self._body(), ContentType="application/json", **condition
            )
        except ClientError as exc:
            if _precondition_failed(exc):
                return False
            raise
        self._etag = rsp.get("ETag")
        return True

    def _current(self) -> _Current | None:
        try:
            rsp = self.store.client.get_object(Bucket=self.store.bucket, Key=self.key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        value = json.loads(rsp["Body"].read())
        return _Current(str(value.get("holder")), float(value.get("expires_at", 0)), rsp["ETag"])

    def _try(self) -> _Current | None:
        """Take or renew the lease; None on success, else who holds it."""
        if self._put(IfNoneMatch="*"):
            return None
        current = self._current()
        if current is None:
            return self._try()  # released meanwhile
        if current.holder == self.holder or current.expires_at < self.clock():
            if self._put(IfMatch=current.etag):
                if current.holder != self.holder:
                    log.warning("study date %s: took over the lease %s let expire", self.study_date, current.holder)
                return None
            return self._try()  # changed meanwhile: look again
        return current

    def acquire(self, wait_s: float = 0, poll_s: float = 5.0) -> DateLease:
        """Take the lease (waiting up to ``wait_s`` for its holder) and keep it renewed."""
        deadline = self.clock() + wait_s
        while (held := self._try()) is not None:
            if self.clock() >= deadline:
                raise LeaseHeld(self.study_date, held.holder, held.expires_at)
            time.sleep(min(poll_s, max(0.0, deadline - self.clock())))
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew, name="lease", daemon=True)
        self._renewer.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not (self._etag and self._put(IfMatch=self._etag)):
                    self.lost = True
                    log.error("study date %s: the lease was taken by another run", self.study_date)
                    return
            except Exception as exc:  # S3 unreachable: the lease may lapse; the next put says so
                log.warning("study date %s: lease renewal failed (%s)", self.study_date, type(exc).__name__)

    def stop_renewing(self) -> None:
        """Keep the lease (the run's next task takes it again) but stop renewing it."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)

    def release(self) -> None:
        """Stop renewing and give the date back, if it is still ours."""
        self.stop_renewing()
        current = self._current()
        if current is not None and current.holder == self.holder:
            self.store.client.delete_object(Bucket=self.store.bucket, Key=self.key)

    def __enter__(self) -> DateLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_renewing()
