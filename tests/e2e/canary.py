"""Canary patient data, and a scanner for it.

An archive whose every patient-bearing field holds a canary value (names,
IDs, birth dates, accession numbers, free text, values invalid for their VR),
and :func:`scan`, which reads what a run leaves behind the way a security
reviewer would: every file as bytes, Parquet decoded, zip archives opened,
e-mails walked part by part with each part decoded."""

from __future__ import annotations

import email
import io
import re
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

# Every planted value holds the marker, or is the valid-DA canary. Six letters
# and a bounded date: base64 or numbers in a 10 MB scan do not match by chance.
MARKER = "CNRYQX"
BIRTH_DATE = "19070707"  # valid DA: no marker possible
PATTERN = re.compile(rb"CNRYQX|cnryqx|Cnryqx|(?<![0-9A-Za-z+/.])19070707(?![0-9A-Za-z+/])|1907-07-07")

# (keyword, value): valid values in every instance
PLANTED = {
    "PatientName": "CNRYQXfamily^Zelda",
    "PatientID": "CNRYQXID4711",
    "IssuerOfPatientID": "CNRYQXISSUER",
    "OtherPatientIDs": "CNRYQXOTHER",
    "PatientBirthDate": BIRTH_DATE,
    "AccessionNumber": "CNRYQXACC01",
    "ReferringPhysicianName": "CNRYQXdoc^Hans",
    "StudyDescription": "CNRYQX free text: chest pain since Monday",
    "SeriesDescription": "CNRYQX series note",
    "ImageComments": "CNRYQX image comment, patient anxious",
    "InstitutionName": "CNRYQX Hospital",
    "PatientAddress": "CNRYQX Street 1",
}
# values invalid for their VR, planted in MR instances only (pydicom's WARN mode would quote them)
INVALID = {
    "PatientAge": "CNRYQX93",  # AS: nnnD
    "PatientSex": "CNRYQXUNKNOWN",  # CS: 16 max, upper case
    "PatientBirthTime": "CNRYQX12",  # TM
    "StudyID": "CNRYQX-STUDY-ID-TOO-LONG",  # SH: 16 max
}


def plant(root: Path) -> int:
    """Overwrite the archive's patient fields with canaries; returns files changed."""
    n = 0
    for path in sorted(root.rglob("*.dcm")):
        try:
            ds = pydicom.dcmread(path, force=True)
            for keyword, value in PLANTED.items():
                setattr(ds, keyword, value)
            if str(ds.get("Modality", "")) == "MR":
                for keyword, value in INVALID.items():
                    setattr(ds, keyword, value)
            ds.save_as(path, enforce_file_format="file_meta" in ds.__dict__ and bool(ds.file_meta))
            n += 1
        except Exception:  # the archive's truncated instance: left as it is (quarantined TRUNCATED)
            continue
    return n


@dataclass
class Scan:
    files: int = 0
    bytes: int = 0
    hits: list[str] = field(default_factory=list)
    scope: dict[str, int] = field(default_factory=dict)  # channel -> files read

    def read(self, channel: str, where: str, data: bytes) -> None:
        self.files += 1
        self.bytes += len(data)
        self.scope[channel] = self.scope.get(channel, 0) + 1
        for m in PATTERN.finditer(data):
            context = data[max(0, m.start() - 30) : m.end() + 30].decode("utf-8", "replace")
            self.hits.append(f"{channel}: {where}: ...{context}...")
            break  # one hit per file is enough to name it


def expand(name: str, data: bytes) -> Iterable[tuple[str, bytes]]:
    """The readable forms of a file: itself, Parquet as CSV text, zip members,
    e-mail parts decoded (an e-mail's raw base64 is read decoded, not as is)."""
    if not name.endswith(".eml"):
        yield name, data
    if name.endswith(".parquet"):
        import pandas as pd

        frame = pd.read_parquet(io.BytesIO(data))
        yield f"{name} (decoded)", frame.to_csv(index=False).encode()
    elif data[:2] == b"PK":
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for member in zf.namelist():
                yield from expand(f"{name}!{member}", zf.read(member))
    elif name.endswith(".eml"):
        msg = email.message_from_bytes(data)
        for i, part in enumerate(msg.walk()):
            headers = "\n".join(f"{k}: {v}" for k, v in part.items())
            yield f"{name}#part{i} (headers)", headers.encode()
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                yield from expand(f"{name}#part{i}:{part.get_filename() or part.get_content_type()}", payload)


def scan_files(scan: Scan, channel: str, paths: Iterable[Path]) -> None:
    for path in paths:
        if path.is_file() and not path.is_symlink():
            for name, data in expand(path.name, path.read_bytes()):
                scan.read(channel, f"{path} {name}", data)


# Where patient data belongs: the instances, quarantine (instances too), and the study index
# (issue 19: the attributes a DICOMweb search matches on, under its own prefix and IAM policy).
PHI_PREFIXES = ("studies/", "quarantine/", "_index/studies/", "_reports/inbox/")


def scan_bucket(scan: Scan, client, bucket: str, skip: tuple[str, ...] = PHI_PREFIXES) -> None:
    """Every object but those of :data:`PHI_PREFIXES`."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            if obj["Key"].startswith(skip):
                continue
            data = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            for name, part in expand(obj["Key"], data):
                scan.read("bucket", name, part)
