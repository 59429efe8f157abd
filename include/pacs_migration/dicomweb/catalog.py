"""The study index in memory, for search: every partition's index file loaded
into an in-process DuckDB table, reloaded when a file's ETag changes. Nothing
of it is written to disk (it holds patient data)."""

from __future__ import annotations

import io
import threading
import time
from typing import Any

import duckdb
import pyarrow.parquet as pq

from ..partition import Partition
from ..store import ObjectStore
from ..study_index import COLUMNS, INDEX_PREFIX, INSTANCES, INTEGERS

TABLE = "instances"


class StudyCatalog:
    """``refresh_seconds``: how stale a search may be (0: list the index before every search)."""

    def __init__(self, store: ObjectStore, refresh_seconds: float = 30.0) -> None:
        self.store, self.refresh_seconds = store, refresh_seconds
        self._db = duckdb.connect(":memory:", config={"enable_external_access": False})
        cols = ", ".join(f'"{c}" {_sql_type(c)}' for c in COLUMNS)
        self._db.execute(f"CREATE TABLE {TABLE} ({cols})")
        self._etags: dict[str, str] = {}
        self._lock = threading.Lock()
        self._checked = float("-inf")

    def refresh(self, force: bool = False) -> int:
        """Reload the partitions whose index file changed; returns how many."""
        with self._lock:
            if not force and time.monotonic() - self._checked < self.refresh_seconds:
                return 0
            base = f"{self.store.target.prefix}{INDEX_PREFIX}"
            now = {k: e for k, e in self.store.list_objects(base) if k.endswith("/" + INSTANCES)}
            changed = [k for k, e in now.items() if self._etags.get(k) != e]
            gone = [k for k in self._etags if k not in now]
            for key in gone + changed:
                self._db.execute(f"DELETE FROM {TABLE} WHERE partition = ?", [_partition_of(base, key)])
            for key in changed:
                table = pq.read_table(io.BytesIO(self.store.get(key)), columns=list(COLUMNS))
                self._db.register("incoming", table)
                self._db.execute(f"INSERT INTO {TABLE} SELECT {', '.join(_q(c) for c in COLUMNS)} FROM incoming")
                self._db.unregister("incoming")
            for key in gone:
                self._etags.pop(key, None)
            self._etags.update({k: now[k] for k in changed})
            self._checked = time.monotonic()
            return len(changed) + len(gone)

    def query(self, sql: str, params: list[Any]) -> list[dict[str, Any]]:
        self.refresh()
        with self._lock:
            cur = self._db.execute(sql, params)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _q(column: str) -> str:
    return f'"{column}"'


def _sql_type(column: str) -> str:
    return "BIGINT" if column in INTEGERS else "VARCHAR"


def _partition_of(base: str, key: str) -> str:
    found = Partition.from_hive(key[len(base) : -len(INSTANCES) - 1])
    return found.key if found else key


class IndexSearch:
    """Study-level lookups in the index, for the locator."""

    def __init__(self, catalog: StudyCatalog) -> None:
        self.catalog = catalog

    def studies(self, **match: str) -> list[dict[str, Any]]:
        if unknown := set(match) - set(COLUMNS):
            raise ValueError(f"not columns of the study index: {sorted(unknown)}")
        clauses = " AND ".join(f'"{k}" = ?' for k in match) or "TRUE"
        return self.catalog.query(
            f"SELECT \"StudyInstanceUID\", string_agg(DISTINCT partition, ',') AS partitions, count(*) AS instances "
            f'FROM {TABLE} WHERE {clauses} GROUP BY "StudyInstanceUID"',
            list(match.values()),
        )
