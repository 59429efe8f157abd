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


SHARED_PATIENT = ("SHARED-7", "CANARY^SHARED")
ALTERED_PATIENT = ("ALT-3", "CANARY^ALTERED")
SPLIT_PATIENT = ("SPL-9", "CANARY^SPLIT")
# (site, study, series number, instances, date, modality, (PatientID, PatientName), pixel fills), written in this
# order; a series' UID derives from its study's name and number, so both sites' copies of a series share it.
SERIES: tuple[tuple[str, str, int, int, dt.date, str, tuple[str, str], dict[int, int] | None], ...] = (
    ("south", "shared", 1, 6, D1, "CT", SHARED_PATIENT, None),  # the same bytes at both sites
    ("south", "shared", 2, 4, D1, "CT", SHARED_PATIENT, None),
    ("north", "shared", 1, 6, D1, "CT", SHARED_PATIENT, None),
    ("north", "shared", 2, 4, D1, "CT", SHARED_PATIENT, None),
    ("south", "altered", 1, 3, D1, "CT", ALTERED_PATIENT, None),
    ("north", "altered", 1, 3, D1, "CT", ALTERED_PATIENT, {1: 0x7F}),  # north's second instance differs
    ("south", "split", 1, 2, D1, "MR", SPLIT_PATIENT, None),
    ("north", "split", 2, 2, D1, "MR", SPLIT_PATIENT, None),
    ("south", "collide-s", 1, 2, D1, "CT", (COLLIDING_ID, "CANARY^ALPHA"), None),
    ("north", "collide-n", 1, 2, D1, "CT", (COLLIDING_ID, "CANARY^BRAVO"), None),
    ("south", "south-only", 1, 2, D2, "MR", ("SO-1", "CANARY^SOUTHONLY"), None),
    ("north", "north-only", 1, 1, D2, "MR", ("NO-1", "CANARY^NORTHONLY"), None),
    ("south", "night-s", 1, 2, D3, "CT", ("NS-1", "CANARY^NIGHTSOUTH"), None),
    ("north", "night-n", 1, 2, D3, "CT", ("NN-1", "CANARY^NIGHTNORTH"), None),
)


def build(root: Path) -> Consolidation:
    sites = {name: SiteFiles(root / name) for name in ("south", "north")}
    for site in sites.values():
        site.root.mkdir(parents=True, exist_ok=True)
    studies = {name: _uid("study", name) for name in dict.fromkeys(row[1] for row in SERIES)}
    for site, study, number, n, day, modality, patient, fill in SERIES:
        _write(
            sites[site],
            studies[study],
            _uid(study, number),
            n,
            day=day,
            modality=modality,
            patient=patient,
            series_number=number,
            fill=fill,
        )
    return Consolidation(sites["south"], sites["north"], studies, _uid(_uid("altered", 1), 1))


CANARIES = ("CANARY^SHARED", "CANARY^ALTERED", "CANARY^SPLIT", "CANARY^ALPHA", "CANARY^BRAVO", "SHARED-7")
