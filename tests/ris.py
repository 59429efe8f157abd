"""HL7 v2 ORU^R01 messages as a legacy RIS exports them, the demo's clinical
archive for one date, and dciodvfy on a DICOM object."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

from include.demo.archive import ArchiveSummary, build_archive
from include.demo.clinical import Clinical, add_clinical, ris_export, tiny_pdf
from include.demo.clinical import oru_message as oru
from include.pacs_migration.config import MigrationConfig
from tests.peers import require_binary

__all__ = ["clinical_day", "dciodvfy", "oru", "tiny_pdf", "with_export"]


def clinical_day(
    tmp_path: Path, day: dt.date, dangling: bool
) -> tuple[ArchiveSummary, Clinical, dict[str, tuple[str, bytes]]]:
    """The demo archive (two dates, under ``tmp_path / "legacy"``) with its GSPS, KOS and
    reused accession number on ``day``, and the RIS's export of that day under ``tmp_path / "ris"``."""
    summary = build_archive(tmp_path / "legacy", days=2)
    added = add_clinical(summary.root, day.strftime("%Y%m%d"), dangling=dangling)
    return summary, added, ris_export(summary.root, tmp_path / "ris", [day.strftime("%Y%m%d")])


def with_export(cfg: MigrationConfig, folder: Path) -> MigrationConfig:
    """``cfg`` reading the RIS's export ``folder``."""
    return cfg.model_copy(update={"reports": cfg.reports.model_copy(update={"export_dir": folder})})


def dciodvfy(data: bytes, tmp_path: Path) -> str:
    """What dicom3tools' dciodvfy says of ``data`` (required under CI=true)."""
    exe = require_binary("dciodvfy", "dicom3tools")
    path = tmp_path / "check.dcm"
    path.write_bytes(data)
    try:
        out = subprocess.run([exe, "-new", str(path)], capture_output=True, text=True, timeout=60)
    finally:
        path.unlink()
    return out.stdout + out.stderr
