"""Airflow services as local processes, for the demo and the distributed test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def start_airflow(name: str, args: list[str], env: dict[str, str], logs: Path) -> subprocess.Popen:
    """`python -m airflow <args>` in its own session, output to ``logs/<name>.log``."""
    logs.mkdir(parents=True, exist_ok=True)
    fh = open(logs / f"{name}.log", "wb")
    return subprocess.Popen([sys.executable, "-m", "airflow", *args], env=env, stdout=fh,
                            stderr=subprocess.STDOUT, start_new_session=True)


def stop_all(procs: list[subprocess.Popen], timeout: float = 60) -> None:
    """SIGTERM every process group, then SIGKILL what is still there after ``timeout``."""
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
