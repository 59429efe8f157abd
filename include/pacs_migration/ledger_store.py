"""The nightly ledger in the bucket (``_plan/ledger.json``; a further source
archive's: ``_plan/source=<name>/ledger.json``), changed only over
the version read: the nightly ``progress`` task and a rollback reopening units
may write it at the same moment, and neither may lose the other's change."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

from .plan import LEDGER_KEY, Ledger
from .store import ObjectStore

T = TypeVar("T")


class LedgerContention(RuntimeError):
    """The ledger kept changing under this update."""


def ledger_key(store: ObjectStore, source: str = "") -> str:
    """One ledger per source archive: each has its own plan, window and budget."""
    return store.target.key(LEDGER_KEY.replace("_plan/", f"_plan/source={source}/") if source else LEDGER_KEY)


def read_ledger(store: ObjectStore, source: str = "") -> Ledger:
    return Ledger.from_bytes(store.get_or_none(ledger_key(store, source)))


def update_ledger(
    store: ObjectStore, change: Callable[[Ledger], T], attempts: int = 8, source: str = ""
) -> tuple[Ledger, T]:
    """Read the ledger, apply ``change`` (pure: it may run again on a fresh read), write it back only over
    the version read; returns the ledger written and what ``change`` returned."""
    key = ledger_key(store, source)
    for attempt in range(attempts):
        data, etag = store.get_versioned(key)
        ledger = Ledger.from_bytes(data)
        result = change(ledger)
        if store.put_if_unchanged(key, ledger.to_bytes(), "application/json", etag, {}):
            return ledger, result
        time.sleep(random.uniform(0.05, 0.2) * (attempt + 1))
    raise LedgerContention(f"{key}: still changing after {attempts} attempts")
