"""Render an example assessment report (docs/assessment-example.png): a
five-year synthetic archive served by the simulated PACS, assessed by the
core exactly as the ``pacs_assessment`` DAG does, rendered by headless Chromium.

`python -m demo.assessment_example docs/assessment-example.png`
"""

from __future__ import annotations

import datetime as dt
import sys
import tempfile
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from demo.render import render_html_to_png
from include.demo.archive import build_archive
from include.pacs_migration.assessment import assess, render_assessment_html
from include.pacs_migration.config import AssessmentConfig, SourceConfig
from include.pacs_migration.dimse import find
from peers.pacs import SimulatedPACS


def _plant_quirks(root: Path) -> None:
    """What assessments find in real archives: a study filed under a second
    patient ID, and a character set no standard defines."""
    files = [
        p for p in sorted(root.rglob("*.dcm")) if "/CT0" in str(p) and pydicom.dcmread(p, force=True).get("file_meta")
    ]
    ds = pydicom.dcmread(files[0])
    ds.PatientID = "OTHER-ID"
    ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(root / "quirk-second-patient.dcm")
    ds = pydicom.dcmread(files[1])
    ds.SpecificCharacterSet = "ISO-8859-1"  # the IANA name, not the DICOM term ISO_IR 100
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(root / "quirk-charset.dcm")


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "docs/assessment-example.png")
    with tempfile.TemporaryDirectory(prefix="assessment-example-") as tmp:
        root = Path(tmp)
        for year, days in ((2015, 1), (2016, 2), (2017, 3), (2018, 5), (2019, 8)):  # the archive grows
            build_archive(root / str(year), first_date=dt.date(year, 3, 1), days=days, seed=year)
        _plant_quirks(root / "2018")
        pacs = SimulatedPACS(root)
        try:
            source = SourceConfig(
                host="127.0.0.1", port=pacs.port, called_ae_title="LEGACYPACS", calling_ae_title="PACSMIGRATE"
            )
            result = assess(
                lambda q: find(source, q),
                dt.date(2015, 1, 1),
                dt.date(2019, 12, 31),
                AssessmentConfig(throughput_mb_s=2, throughput_instances_s=0.5),
            )
        finally:
            pacs.stop()
    html = render_assessment_html(
        result, "dicom://127.0.0.1 AE LEGACYPACS (simulated)", "s3://pacs-archive/_assessment/2015-01-01_2019-12-31/"
    )
    render_html_to_png(html, out, width=980, height=1420)
    print(f"{out}: {result.summary()['instances']} instances, findings {result.summary()['findings']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
