"""Seed an Orthanc with the demo archive over its REST API (docker-compose's
`orthanc-seed` service): `python -m include.demo.seed_orthanc http://orthanc:8042`."""

from __future__ import annotations

import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from include.demo.archive import build_archive


def seed(base_url: str, archive: Path) -> int:
    sent = 0
    for path in sorted(archive.rglob("*.dcm")):
        req = urllib.request.Request(
            f"{base_url}/instances",
            data=path.read_bytes(),
            method="POST",
            headers={"Content-Type": "application/dicom"},
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as rsp:
                sent += rsp.status == 200
        except urllib.error.HTTPError:
            pass  # Orthanc refuses what it cannot parse (the truncated file): a legacy PACS would hold it
    return sent


def main(argv: list[str]) -> int:
    base = argv[0].rstrip("/")
    for _ in range(60):  # bounded wait for Orthanc's REST API
        try:
            urllib.request.urlopen(f"{base}/system", timeout=5).close()
            break
        except OSError:
            time.sleep(2)
    with tempfile.TemporaryDirectory() as tmp:
        summary = build_archive(Path(tmp) / "archive")
        print(f"seeded {seed(base, summary.root)} of {summary.instances} instances into {base}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
