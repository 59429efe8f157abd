"""HL7 v2 ORU^R01 messages as a legacy RIS exports them, quirks included."""

from __future__ import annotations

import base64

from include.demo.clinical import tiny_pdf

__all__ = ["oru", "tiny_pdf"]

SEP = "\r"


def oru(
    control_id: str,
    patient_id: str,
    accession: str,
    observed: str,
    lines: list[str] | None = None,
    status: str = "F",
    issuer: str = "HOSP",
    charset: str = "",
    reported: str | None = None,
    interpreter: str = "4711&HOUSE&GREGORY",
    pdf: bytes | None = None,
    name: str = "DOE^JANE",
    procedure: str = "CTCHEST^CT chest with contrast",
    segment_end: str = SEP,
) -> str:
    """One ORU^R01; ``lines``: OBX-5 text values (each may hold ``~`` repetitions or ``\\.br\\``)."""
    reported = reported or observed
    msh = ["MSH", "^~\\&", "RIS", "HOSP", "PACSMIG", "HOSP", reported, "", "ORU^R01", control_id, "P", "2.5"]
    msh += [""] * 5 + [charset]  # MSH-13..17, then MSH-18
    segs = [
        "|".join(msh),
        f"PID|1||{patient_id}^^^{issuer}^MR||{name}||19600101|F",
        f"OBR|1|PL{control_id}|{accession}|{procedure}|||{observed}|||||||||||||||{reported}|||{status}"
        f"|||||||{interpreter}",
    ]
    for i, text in enumerate(lines or [], 1):
        segs.append(f"OBX|{i}|TX|GDT^Report text||{text}||||||{status}")
    if pdf is not None:
        data = base64.b64encode(pdf).decode()
        segs.append(f"OBX|{len(segs) - 2}|ED|PDF^Report PDF||^application^pdf^Base64^{data}||||||{status}")
    return segment_end.join(segs) + segment_end
