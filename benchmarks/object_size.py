"""Peak memory against object size (issue 22, point 3): one instance of 50 MB,
500 MB and 2 GB (a multi-frame CT stored implicit VR, so normalize rewrites it:
the costlier path), retrieved by C-GET from the simulated PACS, normalized,
uploaded (multipart) to moto's S3 server, by the partition tasks' data path in
a fresh worker process (``bench.py worker``). Reported: the worker's and the
normalize process's peak RSS (VmHWM), seconds, and MB/s.

``--before <tree>`` runs the same worker from another checkout (e.g. a git
worktree of the commit before a change) in the same session, for the ratio.

    PYTHONPATH=. python -m benchmarks.object_size [--before /tmp/before] [--sizes 50,500,2048]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import ImplicitVRLittleEndian, generate_uid

from benchmarks.archive import STUDY_DATE
from benchmarks.bench import CACHE, KEYS, RESULTS, ROOT, Moto

FRAME = (1024, 1024)  # 2 MiB per 16-bit frame


def write_instance(path: Path, size_mb: int) -> int:
    """One multi-frame CT of about ``size_mb`` MiB, implicit VR little endian,
    its pixel data written in frames (never whole in this process)."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.PixelData
    frames = max(1, (size_mb << 20) // (FRAME[0] * FRAME[1] * 2))
    ds.Rows, ds.Columns, ds.NumberOfFrames = FRAME[0], FRAME[1], frames
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.StudyDate = ds.SeriesDate = STUDY_DATE
    pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True, force_encoding=True)
    rng = np.random.default_rng(0)
    with open(path, "ab") as fh:
        fh.write(struct.pack("<HHL", 0x7FE0, 0x0010, frames * FRAME[0] * FRAME[1] * 2))
        for _ in range(frames):
            fh.write(rng.integers(0, 4096, FRAME, dtype=np.uint16).tobytes())
    return path.stat().st_size


def run_worker(tree: Path, port: int, work: Path) -> dict[str, Any]:
    moto = Moto(work)
    try:
        moto.client().create_bucket(Bucket="pipeline")
        args = [sys.executable, "-m", "benchmarks.bench", "worker", "--port", str(port), "--endpoint", moto.url]
        proc = subprocess.run(
            [*args, "--staging", str(work / "staging")],
            cwd=tree,
            check=True,
            capture_output=True,
            text=True,
            timeout=3600,
            env={**os.environ, **KEYS, "PYTHONPATH": str(tree)},
        )
        return json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        moto.stop()
        shutil.rmtree(work / "staging", ignore_errors=True)


def measure(sizes: list[int], trees: dict[str, Path], repeats: int) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from peers.pacs import SimulatedPACS

    out: dict[str, Any] = {}
    CACHE.mkdir(exist_ok=True)
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix="objsize-", dir=CACHE) as tmp:
            archive = Path(tmp) / "archive"
            archive.mkdir()
            nbytes = write_instance(archive / "big.dcm", size)
            pacs = SimulatedPACS(archive, ae_title="ORTHANC")
            try:
                for label, tree in trees.items():
                    runs = [run_worker(tree, pacs.port, Path(tmp)) for _ in range(repeats)]
                    assert all(r["migrated"] == 1 for r in runs), runs
                    seconds = sorted(r["seconds"] for r in runs)[len(runs) // 2]
                    out.setdefault(label, {})[f"{size}"] = {
                        "bytes": nbytes,
                        "max_rss_mb": max(r["max_rss_kb"] for r in runs) / 1024,
                        "max_rss_mb_normalize_process": max(r["max_rss_kb_normalize_process"] for r in runs) / 1024,
                        "seconds": seconds,
                        "mb_per_s": nbytes / (1 << 20) / seconds,
                    }
            finally:
                pacs.stop()
    return out


def markdown(result: dict[str, Any], sizes: list[int]) -> str:
    rows = [
        f"# Peak memory against object size — {dt.date.today().isoformat()}",
        "",
        "One instance (multi-frame CT, implicit VR: normalize rewrites it) retrieved, normalized and uploaded",
        "by the partition tasks' data path in a fresh worker process; peak RSS (VmHWM), the larger of the repeats.",
        "",
        "| code | instance | worker peak RSS MB | seconds | MB/s |",
        "|---|---|---|---|---|",
    ]
    for label, by_size in result.items():
        for size in sizes:
            m = by_size[f"{size}"]
            rows.append(
                f"| {label} | {m['bytes'] / (1 << 20):.0f} MB | {m['max_rss_mb']:.0f} | "
                f"{m['seconds']:.1f} | {m['mb_per_s']:.0f} |"
            )
    for label, by_size in result.items():
        small, large = by_size[f"{sizes[0]}"], by_size[f"{sizes[-1]}"]
        growth = large["max_rss_mb"] / small["max_rss_mb"] - 1
        rows.append(f"\n{label}: peak RSS at {sizes[-1]} MB vs {sizes[0]} MB: {growth * 100:+.1f}%.")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="50,500,2048", help="MB, comma-separated")
    parser.add_argument("--before", type=Path, help="another checkout to measure in the same session")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--label", default="")
    ns = parser.parse_args(argv)
    sizes = [int(s) for s in ns.sizes.split(",")]
    trees = {"this": ROOT, **({"before": ns.before.resolve()} if ns.before else {})}
    result = measure(sizes, trees, ns.repeats)
    report = {"date": dt.date.today().isoformat(), "sizes_mb": sizes, "runs": result}
    text = markdown(result, sizes)
    stem = dt.date.today().isoformat() + "-object-size" + (f"-{ns.label}" if ns.label else "")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (RESULTS / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
