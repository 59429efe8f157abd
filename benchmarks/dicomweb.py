"""The DICOMweb service's two costs that a clinician feels, same machine, same run:

- WADO-RS retrieval of a migrated series (multipart, streamed from S3 part by
  part) against plain S3 GETs of the same objects (boto3, one after another as
  the service reads them, and with 8 threads);
- time to first image: series metadata then frame 1, as a viewer asks for
  them, of a migrated series and of one not migrated yet (federated fallback:
  C-FIND + C-GET of the series from the legacy PACS, in memory).

Synthetic CT series of ``--instances`` 512x512 16-bit images (pydicom's CT
tiled), a simulated legacy PACS, moto's S3 server, the service in-process on
loopback (uvicorn). Median of ``--repeats``; the legacy cache is emptied before
each fallback measurement.

``PYTHONPATH=. python -m benchmarks.dicomweb [--instances 120] [--repeats 5]``:
prints a table, writes benchmarks/results/<date>-dicomweb.{json,md}."""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import requests
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from include.pacs_migration.dicomweb.legacy import _Cache
from include.pacs_migration.manifest import PartitionManifests
from include.pacs_migration.partition import Partition
from peers.pacs import SimulatedPACS
from peers.s3 import S3Server
from tests.dicomweb_rig import Archive, serve
from tests.faults.harness import migration_config, object_store, run_date

MIGRATED, LEGACY = dt.date(2019, 3, 1), dt.date(2019, 3, 2)


def write_series(root: Path, date: dt.date, n: int) -> tuple[str, str]:
    """One CT study of one series of ``n`` 512x512 images on ``date``; returns (study, series) UIDs."""
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    pixels = np.tile(template.pixel_array, (4, 4)).astype(template.pixel_array.dtype)
    da = date.strftime("%Y%m%d")
    study, series = generate_uid(entropy_srcs=["bench", da]), generate_uid(entropy_srcs=["bench-s", da])
    folder = root / da / "CT00"
    folder.mkdir(parents=True)
    for i in range(n):
        ds = template.copy()
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelData = pixels.tobytes()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["bench-i", da, str(i)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyDate = ds.SeriesDate = da
        ds.PatientID, ds.PatientName, ds.AccessionNumber = f"BENCH{da}", "BENCH^PATIENT", f"B{da}"
        ds.InstanceNumber = i + 1
        ds.save_as(folder / f"{i:04d}.dcm", enforce_file_format=True)
    return study, series


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _drain(url: str, headers: dict[str, str]) -> int:
    with requests.get(url, headers=headers, stream=True, timeout=300) as rsp:
        rsp.raise_for_status()
        return sum(len(c) for c in rsp.iter_content(1 << 20))


def _first_image(base: str, study: str, series: str, headers: dict[str, str]) -> None:
    meta = requests.get(f"{base}/studies/{study}/series/{series}/metadata", headers=headers, timeout=300)
    meta.raise_for_status()
    sop = sorted(meta.json(), key=lambda m: m["00200013"]["Value"][0])[0]["00080018"]["Value"][0]
    frame = requests.get(
        f"{base}/studies/{study}/series/{series}/instances/{sop}/frames/1", headers=headers, timeout=300
    )
    frame.raise_for_status()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=120)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-dicomweb-"))
    legacy_root = work / "legacy"
    study, series = write_series(legacy_root, MIGRATED, args.instances)
    old_study, old_series = write_series(legacy_root, LEGACY, args.instances)
    pacs, s3 = SimulatedPACS(legacy_root), S3Server()
    try:
        s3.create_bucket("bench-dicomweb")
        cfg = migration_config(pacs.port, "bench-dicomweb", work / "staging")
        store = object_store(cfg, s3.endpoint_url)
        assert run_date(cfg, store, "bench", MIGRATED).verdict.value == "PASSED"
        rows = PartitionManifests(store, Partition(MIGRATED, "CT")).transfer()
        keys = list(rows[rows["state"] == "migrated"]["object_key"])
        size = int(rows["object_size"].sum())
        archive = Archive(cfg, store, legacy_root, study, "", "", old_study, "")
        with serve(archive, pacs.port) as svc:
            url = f"{svc.url}/studies/{study}/series/{series}"
            client = store.client

            def s3_sequential() -> None:
                for k in keys:
                    client.get_object(Bucket=store.bucket, Key=k)["Body"].read()

            def s3_threads() -> None:
                with concurrent.futures.ThreadPoolExecutor(8) as pool:
                    list(pool.map(lambda k: client.get_object(Bucket=store.bucket, Key=k)["Body"].read(), keys))

            def migrated_first() -> None:
                svc.app.state.service._meta.clear()  # cold: every header read from S3 again
                _first_image(svc.url, study, series, svc.headers)

            def legacy_first() -> None:
                svc.legacy._cache = _Cache(64 << 20, 300)  # a cold fallback every time
                _first_image(svc.url, old_study, old_series, svc.headers)

            assert _drain(url, svc.headers) >= size  # warm-up, and every byte is there
            runs: dict[str, list[float]] = {
                "wado_series": [],
                "s3_sequential": [],
                "s3_8_threads": [],
                "first_image_migrated": [],
                "first_image_migrated_again": [],
                "first_image_legacy": [],
            }
            for _ in range(args.repeats):
                runs["wado_series"].append(_timed(lambda: _drain(url, svc.headers)))
                runs["s3_sequential"].append(_timed(s3_sequential))
                runs["s3_8_threads"].append(_timed(s3_threads))
                runs["first_image_migrated"].append(_timed(migrated_first))
                runs["first_image_migrated_again"].append(
                    _timed(lambda: _first_image(svc.url, study, series, svc.headers))
                )
                runs["first_image_legacy"].append(_timed(legacy_first))
    finally:
        pacs.stop()
        s3.stop()
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {
        "date": dt.date.today().isoformat(),
        "instances": len(keys),
        "bytes": size,
        "repeats": args.repeats,
        "median_seconds": {k: round(v, 3) for k, v in med.items()},
        "ratio_wado_vs_s3_sequential": round(med["wado_series"] / med["s3_sequential"], 2),
        "ratio_wado_vs_s3_8_threads": round(med["wado_series"] / med["s3_8_threads"], 2),
        "wado_mb_per_s": round(size / med["wado_series"] / 1e6, 1),
    }
    lines = [
        f"# DICOMweb benchmark, {result['date']}",
        "",
        f"One CT series of {len(keys)} instances, {size / 1e6:.1f} MB; median of {args.repeats} (seconds).",
        "",
        "| measure | seconds |",
        "|---|---|",
        *(f"| {k} | {v:.3f} |" for k, v in result["median_seconds"].items()),
        "",
        f"WADO-RS series / plain S3 GETs one after another: **{result['ratio_wado_vs_s3_sequential']}** "
        f"(vs 8 threads: {result['ratio_wado_vs_s3_8_threads']}); {result['wado_mb_per_s']} MB/s.",
        f"Time to first image, not migrated yet (fallback, cold): **{med['first_image_legacy']:.2f} s**; "
        f"migrated: {med['first_image_migrated']:.2f} s cold, {med['first_image_migrated_again']:.2f} s opened again.",
    ]
    print("\n".join(lines))
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"{result['date']}-dicomweb.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{result['date']}-dicomweb.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
