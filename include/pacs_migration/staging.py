"""The worker's staging area: where a partition's instances wait between the
association and S3. Keyed by partition, one folder per attempt, each with an
owner marker; anything a dead attempt left (killed task, lost worker) is swept
by the next attempt on the worker, whatever its run. C-GET streams each
instance straight into its attempt's folder, and the C-MOVE router keeps its
temporaries under the staging root, so nothing with patient data is left in
the system temp dir."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

OWNER = ".owner"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(folder: Path, max_age_s: float) -> bool:
    """Left by an attempt that is gone: its process is dead (same host), it has
    no owner marker, or (another host sharing the disk) it is older than ``max_age_s``."""
    try:
        owner = json.loads((folder / OWNER).read_text())
    except (OSError, ValueError):
        return time.time() - folder.stat().st_mtime > 60  # a marker is written first: give a new folder a minute
    if owner.get("host") == socket.gethostname():
        return not _alive(int(owner.get("pid", 0)))
    return time.time() - float(owner.get("started", 0)) > max_age_s


def sweep(root: Path, max_age_s: float = 24 * 3600) -> int:
    """Remove every stale attempt folder under ``root``; returns how many."""
    removed = 0
    if not root.is_dir():
        return 0
    for marker_dir in {p.parent for p in root.rglob(OWNER)} | _unmarked(root):
        if marker_dir.is_dir() and _stale(marker_dir, max_age_s):
            shutil.rmtree(marker_dir, ignore_errors=True)
            removed += 1
    if removed:
        log.info("staging: removed %d folder(s) left by attempts that are gone", removed)
    return removed


def _unmarked(root: Path) -> set[Path]:
    """Attempt folders (``<root>/[source=…/]date=…/modality=…/<attempt>``) without a marker."""
    found = [*root.glob("date=*/modality=*/*"), *root.glob("source=*/date=*/modality=*/*")]
    return {p for p in found if p.is_dir() and not (p / OWNER).exists()}


class StagingNotPrivate(Exception):
    """The staging root is not this worker user's private folder."""


def private_root(root: Path) -> Path:
    """``root``, created 0700 if absent; refused when another user owns it
    (a folder planted in a shared temp dir) or it is a symlink; our own
    folder with wider modes is narrowed to 0700."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = root.lstat()
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise StagingNotPrivate(f"staging_dir {root}: not a folder (a symlink?); refusing to stage patient data there")
    if st.st_uid != os.getuid():
        raise StagingNotPrivate(
            f"staging_dir {root} is owned by uid {st.st_uid}, not this worker's user (uid {os.getuid()}); "
            "refusing to stage patient data there"
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        root.chmod(0o700)
    return root


def _owner() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})


@contextlib.contextmanager
def attempt_folder(root: Path, hive_path: str, attempt: str) -> Iterator[Path]:
    """The folder of this attempt at a partition, swept before and removed after."""
    private_root(root)
    sweep(root)
    folder = root / hive_path / attempt
    shutil.rmtree(folder, ignore_errors=True)  # a retry of the same attempt starts clean
    folder.mkdir(parents=True)
    (folder / OWNER).write_text(_owner())
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
