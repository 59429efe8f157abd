"""The one type that carries a partition's figures (XCom, report, lineage,
benchmarks) and the one function that takes them from a transfer manifest."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .reasons import InstanceState
from .store import PutOutcome


@dataclass(frozen=True)
class PartitionCounts:
    expected: int
    migrated: int
    quarantined: int
    unresolved: int
    unsolicited: int
    written: int  # objects created by this run (0 on an idempotent re-run)
    reasons: dict[str, int]
    # migrated instances whose live object is another source archive's copy (a study both archives hold)
    shared: int = 0

    def to_json(self) -> dict[str, Any]:
        out = {
            "expected": self.expected,
            "migrated": self.migrated,
            "quarantined": self.quarantined,
            "unresolved": self.unresolved,
            "unsolicited": self.unsolicited,
            "written": self.written,
            "reasons": dict(self.reasons),
        }
        return {**out, "shared": self.shared} if self.shared else out  # only where several archives meet

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> PartitionCounts:
        return cls(
            **{f: int(value.get(f, 0)) for f in COUNT_FIELDS},
            reasons=dict(value.get("reasons") or {}),
            shared=int(value.get("shared", 0)),
        )

    @property
    def conserved(self) -> bool:
        return self.expected == self.migrated + self.quarantined + self.unresolved

    def summary(self) -> str:
        return " ".join(f"{f}={getattr(self, f)}" for f in COUNT_FIELDS)


COUNT_FIELDS = ("expected", "migrated", "quarantined", "unresolved", "unsolicited", "written")


def counts_from_frame(df: Any) -> PartitionCounts:
    """Figures of a transfer manifest; the report and validation use the same."""
    census = df[df["in_census"]]
    states = Counter(census["state"])
    reasons = Counter(r for r in df["reason"] if isinstance(r, str) and r)
    return PartitionCounts(
        expected=len(census),
        migrated=states.get(InstanceState.MIGRATED.value, 0),
        quarantined=states.get(InstanceState.QUARANTINED.value, 0),
        unresolved=states.get(InstanceState.UNRESOLVED.value, 0),
        # arrivals nobody asked for (not migrated objects the source no longer holds)
        unsolicited=int((~df["in_census"] & (df["state"] != InstanceState.MIGRATED.value)).sum()),
        written=int(
            ((df["load_action"] == PutOutcome.CREATED.value) & (df["state"] == InstanceState.MIGRATED.value)).sum()
        ),
        reasons=dict(sorted(reasons.items())),
        shared=int(
            (census["other_source"].notna() & (census["state"] == InstanceState.MIGRATED.value)).sum()
            if "other_source" in census
            else 0
        ),
    )


@dataclass
class StageTimes:
    """Where a partition's time went: wall seconds of the retrieve phase, and
    seconds summed over worker threads for normalize and upload (benchmarks)."""

    retrieve_s: float = 0.0
    process_s: float = 0.0
    normalize_s: float = 0.0
    upload_s: float = 0.0
    bytes_received: int = 0
    bytes_stored: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, seconds: float, nbytes: int = 0) -> None:
        with self._lock:
            setattr(self, f"{name}_s", getattr(self, f"{name}_s") + seconds)
            if name == "upload":
                self.bytes_stored += nbytes
