"""HL7 v2 ORU^R01 messages as a legacy RIS exports them, quirks included."""

from __future__ import annotations

import base64
import zlib

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


def tiny_pdf(text: str) -> bytes:
    """A one-page PDF showing ``text`` (ASCII), valid enough for any reader."""
    stream = zlib.compress(f"BT /F1 18 Tf 72 720 Td ({text}) Tj ET".encode())
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = b"%PDF-1.4\n"
    offsets = []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return out
