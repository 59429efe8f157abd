"""Progress lines in the task log during long work: every ``every_n`` items or
``every_s`` seconds, whichever comes first: done, rate, what is left, and
how long that should take. Counts only (no UIDs, no patient data)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class ProgressLog:
    def __init__(
        self,
        label: str,
        total: int,
        unit: str = "instances",
        every_n: int = 500,
        every_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        emit: Callable[[str], None] | None = None,
    ) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.every_n, self.every_s, self.clock = every_n, every_s, clock
        self.emit = emit or (lambda line: log.info("%s", line))
        self.done = 0
        self.started = self.last_at = clock()
        self.last_done = 0
        self._lock = threading.Lock()

    def tick(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            now = self.clock()
            if self.done - self.last_done < self.every_n and now - self.last_at < self.every_s:
                return
            self.last_done, self.last_at = self.done, now
            line = self.line(now)
        self.emit(line)

    def line(self, now: float | None = None) -> str:
        elapsed = max((now if now is not None else self.clock()) - self.started, 1e-9)
        rate = self.done / elapsed
        left = max(self.total - self.done, 0)
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        eta = f", ~{left / rate:.0f} s left" if rate > 0 and self.total else ""
        return f"{self.label}: {self.done}/{self.total} {self.unit}{pct}, {rate:.1f}/s, {left} left{eta}"
