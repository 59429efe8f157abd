"""Run a function the way a worker runs a task: in a process forked from this one."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any


def in_fork(fn: Callable[[], Any]) -> Any:
    """``fn()``'s JSON-able result, computed in a forked child; fails if the child fails."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        code = 1
        try:
            os.close(r)
            os.write(w, json.dumps(fn()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        got = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0, f"the forked child exited with status {status}"
    return json.loads(got)
