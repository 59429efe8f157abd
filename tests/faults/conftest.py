"""Fixtures of the fault suite: a small archive (2019-03-01, the demo's CT
and one truncated CT: 25 instances, one partition) served by its own simulated PACS, moto
behind a fault proxy, and a staging folder."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from include.pacs_migration.config import MigrationConfig
from include.pacs_migration.store import ObjectStore
from peers.pacs import SimulatedPACS
from tests.conftest import ROOT
from tests.faults.harness import RunOutcome, etags, migration_config, object_store, run_date
from tests.s3_faults import S3FaultProxy


@dataclass
class Rig:
    root: Path  # the PACS's files
    pacs: SimulatedPACS
    proxy: S3FaultProxy
    s3_server: object
    bucket: str
    staging: Path

    def config(self, **target: float) -> MigrationConfig:
        return migration_config(self.pacs.port, self.bucket, self.staging, **target)

    def run(self, run_id: str, **target: float) -> RunOutcome:
        cfg = self.config(**target)
        return run_date(cfg, object_store(cfg, self.proxy.endpoint_url), run_id)

    @property
    def direct(self) -> ObjectStore:
        """S3 without the proxy, for the checks."""
        cfg = self.config()
        return object_store(cfg, self.s3_server.endpoint_url)

    def etags(self) -> dict[str, str]:
        return etags(self.direct.client, self.bucket)

    def kill_run_when(self, run_id: str, ready: Callable[[], bool], limit_s: float = 120, **target: float) -> None:
        """Start a run in a process of its own; SIGKILL it (and its children) once ``ready()``."""
        args = {
            "pacs_port": self.pacs.port,
            "bucket": self.bucket,
            "staging": str(self.staging),
            "endpoint": self.proxy.endpoint_url,
            "run_id": run_id,
            "target": target,
        }
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        log = open(self.staging.parent / f"worker-{run_id}.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.worker", json.dumps(args)],
            env=env,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=log,
        )
        deadline = time.monotonic() + limit_s
        try:
            while not ready():
                assert proc.poll() is None, f"the run ended before the fault point: {proc.stdout.read()!r}"
                assert time.monotonic() < deadline, f"the fault point was not reached in time; see {log.name}"
                time.sleep(0.01)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            proc.stdout.close()
            log.close()


@pytest.fixture(scope="session")
def fault_archive(archive, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fault-archive")
    for folder in (archive.root / "20190301").iterdir():
        if folder.name.startswith("CT"):
            shutil.copytree(folder, root / folder.name)
    # and one broken instance: a CT cut short, quarantined TRUNCATED
    ds = pydicom.dcmread(next((root / "CT00" / "s1").glob("*.dcm")))
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["fault-suite", "truncated"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    broken = root / "CT00" / "s1" / "9999.dcm"
    ds.save_as(broken, enforce_file_format=True)
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) * 2 // 3])
    return root


@pytest.fixture
def rig(fault_archive, s3_server, bucket, tmp_path):
    root = tmp_path / "pacs"
    shutil.copytree(fault_archive, root)
    pacs = SimulatedPACS(root)
    proxy = S3FaultProxy(s3_server.endpoint_url)
    rig = Rig(root, pacs, proxy, s3_server, bucket, tmp_path / "staging")
    yield rig
    proxy.release.set()
    proxy.stop()
    with contextlib.suppress(ValueError):  # a scenario may have killed it already
        rig.pacs.stop()
