"""One writer per study date (issue 15.1): a lease object in the bucket, taken
atomically, renewed, lapsing when its holder stops renewing, released at the
end. Against moto's S3 server (which, unlike S3, checks If-None-Match then
puts: the test drives the holders one after another)."""

from __future__ import annotations

import datetime as dt
import threading
import time

import pytest

from include.pacs_migration.config import TargetConfig
from include.pacs_migration.lease import DateLease, LeaseHeld
from include.pacs_migration.store import ObjectStore

DAY = dt.date(2019, 3, 1)


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _store(s3_server, bucket) -> ObjectStore:
    return ObjectStore(s3_server.client(), TargetConfig(bucket=bucket))


def test_a_second_run_of_the_date_fails_naming_the_holder(s3_server, bucket):
    store = _store(s3_server, bucket)
    with DateLease(store, DAY, "pacs_migration/manual__1").acquire():
        with pytest.raises(LeaseHeld, match="being written by pacs_migration/manual__1"):
            DateLease(store, DAY, "pacs_nightly/scheduled__2").acquire(wait_s=0)
        DateLease(store, DAY + dt.timedelta(days=1), "pacs_nightly/scheduled__2").acquire().release()  # another date
        DateLease(store, DAY, "pacs_migration/manual__1").acquire().stop_renewing()  # the run's next task: same holder


def test_the_second_run_waits_for_the_release(s3_server, bucket):
    store = _store(s3_server, bucket)
    first = DateLease(store, DAY, "run-1").acquire()
    threading.Timer(0.5, first.release).start()
    started = time.monotonic()
    second = DateLease(store, DAY, "run-2").acquire(wait_s=10, poll_s=0.1)
    assert 0.4 < time.monotonic() - started < 5
    second.release()
    assert store.get_or_none(second.key) is None


def test_a_lease_its_holder_stopped_renewing_lapses(s3_server, bucket):
    """A dead worker's lease is taken over once it expires; the old holder then
    knows it lost it (its renewal is refused) and cannot release the new one."""
    store, clock = _store(s3_server, bucket), Clock()
    dead = DateLease(store, DAY, "run-dead", ttl_s=60, clock=clock).acquire()
    dead.stop_renewing()  # the worker died
    with pytest.raises(LeaseHeld):
        DateLease(store, DAY, "run-next", ttl_s=60, clock=clock).acquire()
    clock.now += 61
    alive = DateLease(store, DAY, "run-next", ttl_s=60, clock=clock).acquire()
    assert not dead._put(IfMatch=dead._etag)  # the old holder's renewal is refused
    dead.release()  # not its lease any more: a no-op
    assert b"run-next" in store.get(alive.key)
    alive.release()
