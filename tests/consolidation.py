"""Two legacy archives that overlap, as a merger leaves them (issue 21): the
files each site holds, written with pydicom, and what the tests expect of them.

- ``shared``: one study sent to both sites, identical bytes at each.
- ``altered``: a study both hold, one instance of which differs at north.
- ``split``: one study, some series at south and the others at north.
- ``collide-s`` / ``collide-n``: two people with the same local patient
  ID ``12345``, one at each site; no file carries an Issuer of Patient ID.
- all of these on the first date; a study only south holds and one only north
  holds on the second; on the third one study at each site.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import MRImageStorage, generate_uid

D1, D2, D3 = dt.date(2019, 3, 1), dt.date(2019, 3, 2), dt.date(2019, 3, 3)
COLLIDING_ID = "12345"


def _uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=["consolidation", *map(str, parts)])


@dataclass
class SiteFiles:
    """One site's archive on disk: its files, and SOP UID -> (study, series, date, modality)."""

    root: Path
    paths: list[Path] = field(default_factory=list)
    instances: dict[str, tuple[str, str, dt.date, str]] = field(default_factory=dict)


@dataclass
class Consolidation:
    south: SiteFiles
    north: SiteFiles
    studies: dict[str, str]  # name -> StudyInstanceUID
    altered_sop: str  # the instance whose copies differ

    def expected(self, site: str, day: dt.date | None = None) -> dict[str, tuple[str, str, dt.date, str]]:
        held = (self.south if site == "south" else self.north).instances
        return {k: v for k, v in held.items() if day is None or v[2] == day}


def _write(
    site: SiteFiles,
    study: str,
    series: str,
    n: int,
    *,
    day: dt.date,
    modality: str,
    patient: tuple[str, str],
    series_number: int,
    fill: dict[int, int] | None = None,
) -> None:
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    template.Rows = template.Columns = 8
    template.Modality = modality
    if modality == "MR":  # the SOP class a modality's series carry (C-GET proposes contexts by it)
        template.SOPClassUID = template.file_meta.MediaStorageSOPClassUID = MRImageStorage
    template.StudyInstanceUID, template.SeriesInstanceUID = study, series
    template.StudyDate, template.StudyTime = day.strftime("%Y%m%d"), "101010"
    template.SeriesDate, template.SeriesTime = template.StudyDate, "101010"
    template.PatientID, template.PatientName = patient
    template.AccessionNumber = "A" + hashlib.sha256(study.encode()).hexdigest()[:8]
    for tag in ("OtherPatientIDs", "IssuerOfPatientID"):
        if tag in template:
            delattr(template, tag)
    for i in range(n):
        ds = template.copy()
        ds.SeriesNumber, ds.InstanceNumber = series_number, i + 1
        ds.SOPInstanceUID = _uid(series, i)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PixelData = bytes([(fill or {}).get(i, i) & 0xFF]) * (8 * 8 * 2)
        path = site.root / f"{len(site.paths):04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        site.paths.append(path)
        site.instances[str(ds.SOPInstanceUID)] = (study, series, day, modality)


def build(root: Path) -> Consolidation:
    south, north = SiteFiles(root / "south"), SiteFiles(root / "north")
    for site in (south, north):
        site.root.mkdir(parents=True, exist_ok=True)
    studies = {
        name: _uid("study", name)
        for name in (
            "shared",
            "altered",
            "split",
            "collide-s",
            "collide-n",
            "south-only",
            "north-only",
            "night-s",
            "night-n",
        )
    }
    shared_patient = ("SHARED-7", "CANARY^SHARED")
    for site in (south, north):  # the same bytes at both sites
        _write(
            site,
            studies["shared"],
            _uid("shared", 1),
            6,
            day=D1,
            modality="CT",
            patient=shared_patient,
            series_number=1,
        )
        _write(
            site,
            studies["shared"],
            _uid("shared", 2),
            4,
            day=D1,
            modality="CT",
            patient=shared_patient,
            series_number=2,
        )
    altered = _uid("altered", 1)
    _write(
        south,
        studies["altered"],
        altered,
        3,
        day=D1,
        modality="CT",
        patient=("ALT-3", "CANARY^ALTERED"),
        series_number=1,
    )
    _write(
        north,
        studies["altered"],
        altered,
        3,
        day=D1,
        modality="CT",
        patient=("ALT-3", "CANARY^ALTERED"),
        series_number=1,
        fill={1: 0x7F},
    )  # north's copy of the second instance differs
    _write(
        south,
        studies["split"],
        _uid("split", 1),
        2,
        day=D1,
        modality="MR",
        patient=("SPL-9", "CANARY^SPLIT"),
        series_number=1,
    )
    _write(
        north,
        studies["split"],
        _uid("split", 2),
        2,
        day=D1,
        modality="MR",
        patient=("SPL-9", "CANARY^SPLIT"),
        series_number=2,
    )
    _write(
        south,
        studies["collide-s"],
        _uid("collide-s", 1),
        2,
        day=D1,
        modality="CT",
        patient=(COLLIDING_ID, "CANARY^ALPHA"),
        series_number=1,
    )
    _write(
        north,
        studies["collide-n"],
        _uid("collide-n", 1),
        2,
        day=D1,
        modality="CT",
        patient=(COLLIDING_ID, "CANARY^BRAVO"),
        series_number=1,
    )
    _write(
        south,
        studies["south-only"],
        _uid("south-only", 1),
        2,
        day=D2,
        modality="MR",
        patient=("SO-1", "CANARY^SOUTHONLY"),
        series_number=1,
    )
    _write(
        north,
        studies["north-only"],
        _uid("north-only", 1),
        1,
        day=D2,
        modality="MR",
        patient=("NO-1", "CANARY^NORTHONLY"),
        series_number=1,
    )
    _write(
        south,
        studies["night-s"],
        _uid("night-s", 1),
        2,
        day=D3,
        modality="CT",
        patient=("NS-1", "CANARY^NIGHTSOUTH"),
        series_number=1,
    )
    _write(
        north,
        studies["night-n"],
        _uid("night-n", 1),
        2,
        day=D3,
        modality="CT",
        patient=("NN-1", "CANARY^NIGHTNORTH"),
        series_number=1,
    )
    return Consolidation(south, north, studies, _uid(altered, 1))


CANARIES = ("CANARY^SHARED", "CANARY^ALTERED", "CANARY^SPLIT", "CANARY^ALPHA", "CANARY^BRAVO", "SHARED-7")
