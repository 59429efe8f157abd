"""The clinical-continuity rig: a legacy PACS (the simulated one) holding three
study dates, an archive in moto's S3 server where the first two were migrated
(one study of the second then rolled back), and the DICOMweb service on a free
loopback port in front of both, as ``python -m include.dicomweb_serve`` runs it."""

from __future__ import annotations

import contextlib
import datetime as dt
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from include.pacs_migration.audit import AuditTrail
from include.pacs_migration.config import DicomWebConfig, MigrationConfig
from include.pacs_migration.dicomweb.legacy import LegacyArchive
from include.pacs_migration.dicomweb.service import AccessLog, Parts, create_app
from include.pacs_migration.manifest import PartitionManifests
from include.pacs_migration.partition import Partition
from include.pacs_migration.rollback import Selection
from include.pacs_migration.steps import Services, roll_back
from include.pacs_migration.store import ObjectStore
from peers.ports import free_port
from tests.conftest import PATIENT_SECRET, TEST_KEYER
from tests.faults.harness import migration_config, object_store, run_date

DAY1, DAY2, DAY3 = dt.date(2019, 3, 1), dt.date(2019, 3, 2), dt.date(2019, 3, 3)


@dataclass
class Archive:
    cfg: MigrationConfig
    store: ObjectStore
    legacy_root: Path
    migrated_ct: str  # a CT study migrated and verified (day 1)
    partly: str  # a CT study with a quarantined (truncated) instance (day 2)
    rolled_back: str  # an MR study rolled back (day 2)
    legacy_only: str  # a CT study of day 3, never migrated
    quarantined_reason: str
    quarantined: str = ""  # a one-instance US study of day 2 whose only file the legacy PACS holds truncated


def break_one_study(legacy_root: Path) -> Path:
    """Truncate day 2's first US study (one instance): the whole study ends quarantined.
    Call before the legacy PACS starts."""
    path = legacy_root / DAY2.strftime("%Y%m%d") / "US00" / "s1" / "0001.dcm"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def migrate(pacs, s3_server, bucket: str, tmp_path: Path, legacy_root: Path) -> Archive:
    cfg = migration_config(pacs.port, bucket, tmp_path / "staging")
    store = object_store(cfg, s3_server.endpoint_url)
    for day in (DAY1, DAY2):
        run_date(cfg, store, f"run-{day.isoformat()}", day)
    ct1 = PartitionManifests(store, Partition(DAY1, "CT")).transfer()
    ct2 = PartitionManifests(store, Partition(DAY2, "CT")).transfer()
    mr2 = PartitionManifests(store, Partition(DAY2, "MR")).transfer()
    partly = ct2[ct2["state"] == "quarantined"].iloc[0]
    rolled = sorted(set(mr2["study_instance_uid"]))[0]
    services = Services(cfg, store, 1, patient_secret=PATIENT_SECRET, actor="test")
    roll_back(services, Selection.parse(study_uids=[rolled]), "wrong patient", "alice", "rb-dw-1", dry_run=False)
    day3 = _legacy_studies(legacy_root / DAY3.strftime("%Y%m%d"))
    us2 = PartitionManifests(store, Partition(DAY2, "US")).transfer()
    broken = us2[us2["state"] == "quarantined"]
    return Archive(
        cfg,
        store,
        legacy_root,
        migrated_ct=sorted(set(ct1["study_instance_uid"]))[0],
        partly=str(partly["study_instance_uid"]),
        rolled_back=rolled,
        legacy_only=day3["CT00"],
        quarantined_reason=str(partly["reason"]),
        quarantined=str(broken.iloc[0]["study_instance_uid"]) if len(broken) else "",
    )


def _legacy_studies(day_dir: Path) -> dict[str, str]:
    import pydicom

    out = {}
    for folder in sorted(day_dir.iterdir()):
        first = sorted(folder.rglob("*.dcm"))[0]
        out[folder.name] = str(pydicom.dcmread(first, stop_before_pixels=True, force=True).StudyInstanceUID)
    return out


@dataclass
class Service:
    url: str  # the DICOMweb root
    origin: str
    token: str
    server: uvicorn.Server
    audit: AccessLog
    legacy: LegacyArchive | None
    app: Any = None  # the FastAPI app (its state.service: caches a benchmark empties)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@contextlib.contextmanager
def serve(
    archive: Archive, legacy_port: int | None, viewer: Path | None = None, **settings
) -> contextlib.AbstractContextManager[Service]:
    """The service on a free loopback port, in this process (uvicorn in a thread)."""
    config = DicomWebConfig(refresh_seconds=0, audit_flush_seconds=0.5, **settings)
    legacy = None
    if legacy_port is not None:
        source = archive.cfg.source.model_copy(update={"port": legacy_port})
        legacy = LegacyArchive(source, config.legacy_associations, cache_bytes=64 << 20)
    token = secrets.token_hex(16)
    audit = AccessLog(AuditTrail(archive.store, archive.cfg.audit, archive.cfg.source, "dicomweb"), TEST_KEYER, 0.5)
    app = create_app(Parts(archive.store, config, {token: "dr.house"}, legacy, audit, viewer))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the DICOMweb service did not start")
        time.sleep(0.05)
    origin = f"http://127.0.0.1:{port}"
    try:
        yield Service(f"{origin}/dicomweb", origin, token, server, audit, legacy, app)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        audit.flush()
