"""Normalize in worker processes: pure Python, so in a load thread it holds
the GIL that retrieval and uploads need."""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import select
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .logs import configure_logging
from .normalize import NormalizeResult
from .normalize_file import STREAM_FROM_BYTES, normalize_file
from .reasons import ReasonCode, reason
from .rules import RuleSet
from .uids import InstanceUIDs


def peak_rss_kb(pid: int | str = "self") -> int:
    """Peak resident set of a process as Linux records it for that process
    (VmHWM; 0 where unknown). Not ru_maxrss: a child started by (v)fork + exec
    inherits its parent's high-water mark there."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def normalize_staged(
    path: str, expected: InstanceUIDs, ruleset: RuleSet, source_ae: str | None, stream_from: int = STREAM_FROM_BYTES
) -> tuple[NormalizeResult, bool, float]:
    """Normalize a staged file in a normalize process. Rewritten bytes go to
    ``<path>.out`` beside it, not through the pipe; returns the result without
    its data, whether it was rewritten, and the seconds it took. Files of
    ``stream_from`` bytes or more are never held whole (:mod:`normalize_file`)."""
    started = time.perf_counter()
    result, rewritten = normalize_file(Path(path), expected, Path(path + ".out"), ruleset, source_ae, None, stream_from)
    return result, rewritten, time.perf_counter() - started


def _send(stream: Any, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _receive(stream: Any) -> Any:
    head = stream.read(8)
    if len(head) < 8:
        raise EOFError("normalize process closed its pipe")
    size = struct.unpack("<Q", head)[0]
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("normalize process closed its pipe")
    return pickle.loads(data)


def serve_normalize() -> None:
    """A normalize process's loop (``python -m include.pacs_migration.normalize_processes``):
    the rule set once, then (path, expected) requests until the pipe closes.
    Replies on the original stdout; anything printed goes to stderr."""
    configure_logging()
    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr
    ruleset, source_ae, stream_from = _receive(requests)
    while True:
        try:
            path, expected = _receive(requests)
        except EOFError:
            return
        try:
            reply: Any = ("ok", normalize_staged(path, expected, ruleset, source_ae, stream_from))
        except Exception as exc:  # reported to the task, which fails the instance's future
            reply = ("error", f"{type(exc).__name__}: {exc}")
        _send(replies, reply)


class NormalizeProcesses:
    """Worker processes for normalize: pure Python, so in a thread it holds
    the GIL that retrieval and uploads need; in a process it uses another
    core. Plain subprocesses over pipes, not multiprocessing: Airflow's Celery
    and local executors run tasks in daemonic processes, which multiprocessing
    forbids to have children. The rule set is sent once per process (a
    crosswalk can be large), not with each instance."""

    def __init__(
        self,
        processes: int,
        ruleset: RuleSet,
        source_ae: str | None,
        time_limit_s: float = 60.0,
        stream_from: int = STREAM_FROM_BYTES,
    ) -> None:
        self.ruleset = ruleset
        self.source_ae = source_ae
        self.stream_from = stream_from  # bytes: larger instances are normalized from their file, never held whole
        self.time_limit_s = time_limit_s  # per instance: past it, quarantined NORMALIZE_TIME_LIMIT
        self._procs: list[subprocess.Popen[bytes]] = []
        self._idle: queue.Queue[subprocess.Popen[bytes]] = queue.Queue()
        try:
            for _ in range(processes):
                self._idle.put(self._start())
        except BaseException:
            self.close()
            raise

    def _start(self) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        proc = subprocess.Popen(
            [sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        self._procs.append(proc)
        _send(proc.stdin, (self.ruleset, self.source_ae, self.stream_from))
        return proc

    def _replace(self, proc: subprocess.Popen[bytes]) -> None:
        """Kill a process stuck on an instance; a fresh one takes its place."""
        proc.kill()
        proc.wait(timeout=30)
        for stream in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):
                stream and stream.close()
        self._procs.remove(proc)
        self._idle.put(self._start())

    def normalize(self, path: Path, expected: InstanceUIDs) -> tuple[NormalizeResult, bool, float]:
        proc = self._idle.get(timeout=3600)  # bounded: one instance never takes an hour
        try:
            _send(proc.stdin, (str(path), expected))
            assert proc.stdout is not None
            if not select.select([proc.stdout], [], [], self.time_limit_s)[0]:
                self._replace(proc)
                limit = reason(ReasonCode.NORMALIZE_TIME_LIMIT)
                return NormalizeResult(reason=limit), False, self.time_limit_s
            status, value = _receive(proc.stdout)
        except (EOFError, OSError) as exc:
            self._idle.put(proc)  # back, dead: whoever takes it next fails at once instead of waiting
            raise RuntimeError(f"normalize process {proc.pid} ended (exit {proc.poll()})") from exc
        self._idle.put(proc)
        if status != "ok":
            raise RuntimeError(f"normalize failed: {value}")
        return value

    @property
    def count(self) -> int:
        return len(self._procs)

    def peak_rss_kb(self) -> int:
        """The largest peak resident set of the normalize processes (Linux
        VmHWM; 0 where unknown), for benchmarks and monitoring."""
        return max((peak_rss_kb(proc.pid) for proc in self._procs), default=0)

    def close(self) -> None:
        for proc in self._procs:
            if proc.stdin and not proc.stdin.closed:
                with contextlib.suppress(OSError):
                    proc.stdin.close()  # end of requests: the process returns
        for proc in self._procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
            if proc.stdout:
                proc.stdout.close()
        self._procs = []

    def __enter__(self) -> NormalizeProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def normalize_processes(
    processes: int,
    ruleset: RuleSet,
    source_ae: str | None,
    time_limit_s: float = 60.0,
    stream_from: int = STREAM_FROM_BYTES,
) -> NormalizeProcesses | None:
    """``processes`` normalize processes, or None (0) to normalize in the load threads."""
    return NormalizeProcesses(processes, ruleset, source_ae, time_limit_s, stream_from) if processes > 0 else None


if __name__ == "__main__":
    serve_normalize()
