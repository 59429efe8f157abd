"""The benchmark's synthetic archive: seeded, about 3 GB and 4,600 instances at
scale 1 (CT 10 studies x 300 x 0.5 MB, MR 10 x 150 x 0.13 MB, CR and DX
20 x 2 x 10.5 MB, MG 5 x 4 x 27 MB, multi-frame US, and a JPEG-LS / JPEG 2000
subset), all on one StudyDate, written once and cached."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

STUDY_DATE = "20210315"


@dataclass(frozen=True)
class Tier:
    modality: str
    sop_class: str
    studies: int
    per_study: int
    rows: int
    columns: int
    frames: int = 1
    samples: int = 1
    size_tier: str = "small"  # small (< 1 MB), large, compressed


TIERS = (
    Tier("CT", "1.2.840.10008.5.1.4.1.1.2", 10, 300, 512, 512),
    Tier("MR", "1.2.840.10008.5.1.4.1.1.4", 10, 150, 256, 256),
    Tier("CR", "1.2.840.10008.5.1.4.1.1.1", 10, 2, 2290, 2290, size_tier="large"),
    Tier("DX", "1.2.840.10008.5.1.4.1.1.1.1", 10, 2, 2290, 2290, size_tier="large"),
    Tier("MG", "1.2.840.10008.5.1.4.1.1.1.2", 5, 4, 3328, 4096, size_tier="large"),
    Tier("US", "1.2.840.10008.5.1.4.1.1.3.1", 3, 2, 480, 640, frames=30, samples=3, size_tier="large"),
)
# Compressed instances as real codecs wrote them (pydicom's test files), replicated with new UIDs.
COMPRESSED = (("MR_small_jpeg_ls_lossless.dcm", 20), ("MR_small_jp2klossless.dcm", 20), ("JPEG2000.dcm", 10))


def scaled(n: int, scale: float) -> int:
    return max(1, round(n * scale))


def build(root: Path, scale: float = 1.0, seed: int = 3) -> dict:
    """Write the archive under ``root`` unless it is there already; returns its
    description (instances and bytes per modality and size tier)."""
    marker = root / "archive.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("scale") == scale and info.get("seed") == seed:
            return info
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    template = get_testdata_file("CT_small.dcm", read=True)
    info: dict = {"scale": scale, "seed": seed, "study_date": STUDY_DATE, "modalities": {}, "tiers": {}}
    study_no = 0
    for tier in TIERS:
        studies = scaled(tier.studies, scale) if tier.size_tier == "large" else tier.studies
        per_study = tier.per_study if tier.size_tier == "large" else scaled(tier.per_study, scale)
        count = size = 0
        for s in range(studies):
            study_no += 1
            study, series = generate_uid(entropy_srcs=[str(seed), tier.modality, str(s)]), generate_uid()
            for i in range(per_study):
                ds = template.copy()
                ds.file_meta = template.file_meta.copy()
                ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
                ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = tier.sop_class
                ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                ds.Modality, ds.StudyDate = tier.modality, STUDY_DATE
                ds.StudyTime = f"{(study_no * 7) % 24:02d}{study_no % 60:02d}00"
                ds.PatientName, ds.PatientID = f"BENCH^{study_no}", f"BENCH{study_no:04d}"
                ds.InstanceNumber = i + 1
                ds.Rows, ds.Columns, ds.SamplesPerPixel = tier.rows, tier.columns, tier.samples
                n = tier.rows * tier.columns * tier.frames * tier.samples
                if tier.samples == 3:
                    ds.PhotometricInterpretation, ds.PlanarConfiguration = "RGB", 0
                    ds.BitsAllocated = ds.BitsStored = 8
                    ds.HighBit, ds.PixelRepresentation = 7, 0
                    ds.PixelData = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
                else:
                    ds.PhotometricInterpretation = "MONOCHROME2"
                    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
                    ds.PixelData = rng.integers(0, 4096, n, dtype=np.uint16).tobytes()
                if tier.frames > 1:
                    ds.NumberOfFrames = tier.frames
                path = root / f"{tier.modality}-{s:02d}-{i:04d}.dcm"
                ds.save_as(path, enforce_file_format=True)
                count += 1
                size += path.stat().st_size
        _account(info, tier.modality, tier.size_tier, count, size)
    for name, n in COMPRESSED:
        source = get_testdata_file(name, read=True)
        study = generate_uid(entropy_srcs=[str(seed), name])
        series = generate_uid()
        for i in range(scaled(n, scale)):
            ds = source.copy()
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.StudyDate, ds.StudyTime = STUDY_DATE, "120000"
            ds.Modality = "OT"  # one partition for the compressed subset
            ds.PatientName, ds.PatientID = "BENCH^COMPRESSED", "BENCHC"
            path = root / f"Z-{name[:-4]}-{i:03d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            _account(info, "OT", "compressed", 1, path.stat().st_size)
    info["instances"] = sum(t["instances"] for t in info["tiers"].values())
    info["bytes"] = sum(t["bytes"] for t in info["tiers"].values())
    marker.write_text(json.dumps(info, indent=1))
    return info


def _account(info: dict, modality: str, tier: str, count: int, size: int) -> None:
    for group, key in ((info["modalities"], modality), (info["tiers"], tier)):
        slot = group.setdefault(key, {"instances": 0, "bytes": 0})
        slot["instances"] += count
        slot["bytes"] += size
