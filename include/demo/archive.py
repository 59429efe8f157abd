"""Seeded, deterministic synthetic legacy archive built from pydicom's bundled
real files: UIDs, dates and fake patient identities re-stamped, with the quirks
old archives have (no file meta, big endian, implicit VR, private-tag heavy,
truncated)."""

from __future__ import annotations

import datetime as dt
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_files
from pydicom.uid import generate_uid

SURNAMES = ("ALDERWOOD", "BRIGHTWATER", "CASTELLAN", "DUNMORE", "EVERHART", "FAIRCLOUGH", "GALLOWAY", "HOLLOWAY")
GIVEN = ("AMELIA", "BASTIAN", "CORDELIA", "DORIAN", "ELOWEN", "FENWICK", "GWENDOLYN", "HORATIO")


def _template(name: str) -> Path:
    for f in get_testdata_files():
        if f.replace("\\", "/").endswith(name):
            return Path(f)
    raise FileNotFoundError(f"pydicom test file {name} is not available offline")


# modality -> (template files, studies per date, series per study, instances per series)
PLAN: dict[str, tuple[tuple[str, ...], int, int, int]] = {
    "CT": (("CT_small.dcm",), 3, 2, 4),
    "MR": (("MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm"), 3, 1, 4),
    "CR": (("CR1/6154",), 3, 1, 2),
    "US": (("examples_rgb_color.dcm", "ExplVR_BigEnd.dcm"), 3, 1, 1),
}


@dataclass
class ArchiveSummary:
    root: Path
    dates: list[str]
    studies: int = 0
    instances: int = 0
    by_partition: dict[str, int] = field(default_factory=dict)
    quirks: dict[str, str] = field(default_factory=dict)  # quirk -> relative path
    patient_names: list[str] = field(default_factory=list)
    patient_ids: list[str] = field(default_factory=list)
    birth_dates: list[str] = field(default_factory=list)
    accession_numbers: list[str] = field(default_factory=list)


def build_archive(
    root: Path,
    first_date: dt.date = dt.date(2019, 3, 1),
    days: int = 5,
    seed: int = 20190301,
    canary_names: tuple[str, ...] = (),
) -> ArchiveSummary:
    """Write the archive under ``root`` (same seed: byte-identical files)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    summary = ArchiveSummary(root, [(first_date + dt.timedelta(days=d)).isoformat() for d in range(days)])
    templates = {m: [pydicom.dcmread(_template(t), force=True) for t in plan[0]] for m, plan in PLAN.items()}
    names = [f"{s}^{g}" for s in SURNAMES for g in GIVEN]
    rng.shuffle(names)
    names = list(canary_names) + names
    patient_no = 0
    for d in range(days):
        date = first_date + dt.timedelta(days=d)
        da = date.strftime("%Y%m%d")
        for modality, (_tfiles, n_studies, n_series, n_inst) in PLAN.items():
            for st in range(n_studies):
                patient_no += 1
                name = names[(patient_no - 1) % len(names)]
                pid = f"LEG{seed % 1000:03d}{patient_no:05d}"
                summary.patient_names.append(name)
                summary.patient_ids.append(pid)
                study_uid = generate_uid(entropy_srcs=[str(seed), da, modality, str(st)])
                tm = f"{8 + st:02d}{rng.randrange(60):02d}{rng.randrange(60):02d}"
                summary.studies += 1
                accession = None  # one per study, as a RIS assigns it
                for se in range(n_series):
                    series_uid = generate_uid(entropy_srcs=[study_uid, str(se)])
                    for i in range(n_inst):
                        tpl_index = (st + i) % len(templates[modality])
                        ds = templates[modality][tpl_index].copy()
                        sop_uid = generate_uid(entropy_srcs=[series_uid, str(i)])
                        ds.PatientName = name
                        ds.PatientID = pid
                        ds.PatientBirthDate = (
                            f"{rng.randrange(1930, 2010)}{rng.randrange(1, 13):02d}{rng.randrange(1, 29):02d}"
                        )
                        drawn = f"ACC{rng.randrange(10**8):08d}"  # drawn per instance: the seed's other values stay
                        accession = accession or drawn
                        ds.AccessionNumber = accession
                        summary.birth_dates.append(ds.PatientBirthDate)
                        summary.accession_numbers.append(ds.AccessionNumber)
                        ds.StudyInstanceUID = study_uid
                        ds.SeriesInstanceUID = series_uid
                        ds.SOPInstanceUID = sop_uid
                        ds.StudyDate = da
                        ds.SeriesDate = da
                        ds.StudyTime = tm
                        ds.Modality = modality
                        ds.SeriesNumber = se + 1
                        ds.InstanceNumber = i + 1
                        if "file_meta" in ds.__dict__ or getattr(ds, "file_meta", None) is not None:
                            ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
                        rel = Path(da) / f"{modality}{st:02d}" / f"s{se + 1}" / f"{i + 1:04d}.dcm"
                        path = root / rel
                        path.parent.mkdir(parents=True, exist_ok=True)
                        quirk = None
                        if d == 0 and modality == "MR" and st == 0 and i == 0:
                            quirk = "no_file_meta"
                        elif d == 1 and modality == "CT" and st == 0 and se == 0 and i == 3:
                            quirk = "truncated"
                        if quirk == "no_file_meta":
                            # A bare implicit-VR dataset, as some old archives store them.
                            path.write_bytes(_bare_implicit(ds))
                        else:
                            ds.save_as(path, enforce_file_format=True)
                        if quirk == "truncated":
                            data = path.read_bytes()
                            path.write_bytes(data[: len(data) - len(data) // 3])
                        if quirk:
                            summary.quirks[quirk] = str(rel)
                        if tpl_index and modality in ("MR", "US"):
                            summary.quirks.setdefault(f"{modality}:{PLAN[modality][0][tpl_index]}", str(rel))
                        if modality == "CT":
                            summary.quirks.setdefault("private_tags_heavy", str(rel))
                        summary.instances += 1
                        key = f"{date.isoformat()}/{modality}"
                        summary.by_partition[key] = summary.by_partition.get(key, 0) + 1
    manifest = {
        k: v
        for k, v in summary.__dict__.items()
        if k not in ("patient_names", "patient_ids", "birth_dates", "accession_numbers", "root")
    }
    (root / "archive.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return summary


def _bare_implicit(ds: pydicom.Dataset) -> bytes:
    """The dataset alone, implicit VR little endian: no preamble, no group 0002."""
    from pydicom.filebase import DicomBytesIO

    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = True
    body = pydicom.Dataset()
    body.update(ds)
    pydicom.filewriter.write_dataset(fp, body)
    return fp.getvalue()


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Build the demo legacy archive")
    ap.add_argument("root", type=Path)
    ap.add_argument("--seed", type=int, default=20190301)
    args = ap.parse_args()
    s = build_archive(args.root, seed=args.seed)
    print(f"{s.studies} studies, {s.instances} instances over {len(s.dates)} dates in {s.root}")


if __name__ == "__main__":
    main()
