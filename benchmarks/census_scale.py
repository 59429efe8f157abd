"""The census of a busy day (issue 22, point 4) against DCMTK ``findscu``.

A busy day of a large hospital: 2,000 studies, 10,000 series, 500,000
instances (``--scale`` 0.1: a tenth of it). Orthanc (a real PACS, its index in
SQLite; instances without pixel data, C-FIND answered from the index) holds it.
The pipeline's census (``take_census``: the study level, then the series and
the image level of every study; each worker's queries over one kept
association) is timed against ``findscu`` sending the same queries (the query
files made from the known UIDs: the native tool is spared parsing answers to
find the next query) over as many associations (all of a worker's queries of a
level over one: the native tool's best case); ``--workers`` at once; with
``--before <checkout>``, the census of that checkout too, in a process of its
own, interleaved. Orthanc runs with DCMTK's TCP_NODELAY=1, as a PACS that
answers promptly. Then the assessment of the same day (``assess``),
extrapolated to 15 years.

    PYTHONPATH=. python -m benchmarks.census_scale [--scale 0.1] [--workers 1,4] [--repeats 3] [--before DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from benchmarks.bench import CACHE, RESULTS, ROOT

DAY = dt.date(2024, 5, 14)
SERIES_PER_STUDY = 5
INSTANCES_PER_SERIES = 50
YEARS = 15


def _instance(study: str, series: str, i: int, s: int, n: int) -> bytes:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid(entropy_srcs=[series, str(n)])
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientID, ds.PatientName = f"BUSY{i:06d}", f"BUSY^PATIENT{i:06d}"
    ds.StudyDate = ds.SeriesDate = DAY.strftime("%Y%m%d")
    ds.StudyTime = f"{(i * 86399 // 2000) // 3600:02d}{(i * 86399 // 2000) % 3600 // 60:02d}00"
    ds.AccessionNumber, ds.Modality = f"A{i:08d}", "CT"
    ds.SeriesNumber, ds.InstanceNumber = s + 1, n + 1
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = CTImageStorage, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def busy_day(scale: float) -> list[tuple[str, list[str]]]:
    """(study UID, its series UIDs) of the day, reproducible."""
    studies = max(1, round(2000 * scale))
    out = []
    for i in range(studies):
        study = generate_uid(entropy_srcs=["busy", str(i)])
        out.append((study, [generate_uid(entropy_srcs=["busy", str(i), str(s)]) for s in range(SERIES_PER_STUDY)]))
    return out


def orthanc_with(scale: float, day: list[tuple[str, list[str]]]):
    """Orthanc on cached storage holding the day (uploaded once per scale)."""
    sys.path.insert(0, str(ROOT))
    from tests.peers import Orthanc

    expected = len(day) * SERIES_PER_STUDY * INSTANCES_PER_SERIES
    orthanc = Orthanc(
        CACHE / f"census-orthanc-{scale:g}",
        tcp_nodelay=True,  # a PACS that answers promptly: not 40 ms a small write
        StorageCompression=False,
        MaximumStorageSize=0,
        DicomThreadsCount=8,
        StorageAccessOnFind="Never",
        LimitFindResults=0,
        LimitFindInstances=0,
    )
    stats = json.loads(urllib.request.urlopen(f"{orthanc.url}/statistics", timeout=30).read())
    if int(stats["CountInstances"]) != expected:
        started = time.perf_counter()

        def study(args: tuple[int, tuple[str, list[str]]]) -> None:
            i, (uid, series) = args
            for s, series_uid in enumerate(series):
                for n in range(INSTANCES_PER_SERIES):
                    orthanc.upload(_instance(uid, series_uid, i, s, n))

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(study, enumerate(day)))
        print(f"loaded {expected} instances in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return orthanc


def _query_file(folder: Path, name: str, **keys: str) -> Path:
    ds = Dataset()
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    path = folder / f"{name}.dcm"
    pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=True)
    return path


def query_files(folder: Path, day: list[tuple[str, list[str]]]) -> list[list[Path]]:
    """The census's queries, as findscu query files, by level (study, series, image),
    with the keys the census asks."""
    da = DAY.strftime("%Y%m%d")
    study = [_query_file(folder, "study", QueryRetrieveLevel="STUDY", StudyDate=da, StudyTime="",
                         StudyInstanceUID="", NumberOfStudyRelatedInstances="")]  # fmt: skip
    series, images = [], []
    for i, (uid, series_uids) in enumerate(day):
        series.append(_query_file(folder, f"series-{i}", QueryRetrieveLevel="SERIES", StudyInstanceUID=uid,
                                  SeriesInstanceUID="", Modality="", SeriesTime="",
                                  NumberOfSeriesRelatedInstances=""))  # fmt: skip
        for s, series_uid in enumerate(series_uids):
            images.append(_query_file(folder, f"image-{i}-{s}", QueryRetrieveLevel="IMAGE", StudyInstanceUID=uid,
                                      SeriesInstanceUID=series_uid, SOPInstanceUID="", SOPClassUID=""))  # fmt: skip
    return [study, series, images]


def _findscu(port: int, files: list[Path]) -> None:
    proc = subprocess.run(
        ["findscu", "-S", "-aet", "PACSMIGRATE", "-aec", "ORTHANC", "127.0.0.1", str(port), *map(str, files)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "TCP_NODELAY": "1"},
        timeout=3600,
    )
    if proc.returncode:
        raise RuntimeError(f"findscu failed: {proc.stderr.decode(errors='replace')[-500:]}")


def run_findscu(port: int, levels: list[list[Path]], workers: int) -> float:
    """Each level after the one before (the census needs each level's answers);
    within a level ``workers`` at once, each sending all of its share over one
    association (one findscu): the native tool's best case."""
    started = time.perf_counter()
    for files in levels:
        shares = [files[w::workers] for w in range(workers) if files[w::workers]]

        def send(share: list[Path]) -> None:
            _findscu(port, share)

        with ThreadPoolExecutor(len(shares)) as pool:
            list(pool.map(send, shares))
    return time.perf_counter() - started


def run_census(port: int, workers: int) -> dict[str, Any]:
    from include.pacs_migration.census import take_census
    from include.pacs_migration.config import SourceConfig
    from include.pacs_migration.dimse import FindSession

    source = SourceConfig(host="127.0.0.1", port=port, called_ae_title="ORTHANC", calling_ae_title="PACSMIGRATE")
    queries = 0

    def counted(find):
        def ask(q):
            nonlocal queries
            queries += 1
            return find(q)

        return ask

    cpu0 = time.process_time()
    started = time.perf_counter()
    with FindSession(source) as session:
        census = take_census(counted(session.find), DAY, workers=workers)
    seconds = time.perf_counter() - started
    instances = sum(len(s.instances) for s in census.series)
    return {"seconds": seconds, "cpu_s": time.process_time() - cpu0, "queries": queries, "instances": instances,
            "series": len(census.series), "warnings": len(census.warnings)}  # fmt: skip


def run_census_of(checkout: Path, port: int, workers: int) -> dict[str, Any]:
    """:func:`run_census` of another checkout (the code before), in a process of its own."""
    code = (
        "import json, sys; from benchmarks.census_scale import run_census; "
        "print(json.dumps(run_census(*map(int, sys.argv[1:]))))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(port), str(workers)],
        cwd=checkout, env={**os.environ, "PYTHONPATH": str(checkout)}, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    if proc.returncode:
        raise RuntimeError(f"the census of {checkout} failed: {proc.stderr[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_assessment(port: int) -> float:
    from include.pacs_migration.assessment import assess
    from include.pacs_migration.config import SourceConfig
    from include.pacs_migration.dimse import FindSession

    source = SourceConfig(host="127.0.0.1", port=port, called_ae_title="ORTHANC", calling_ae_title="PACSMIGRATE")
    started = time.perf_counter()
    with FindSession(source) as session:
        assess(session.find, DAY, DAY)
    return time.perf_counter() - started


def measure(scale: float, workers: list[int], repeats: int, before: Path | None = None) -> dict[str, Any]:
    day = busy_day(scale)
    orthanc = orthanc_with(scale, day)
    try:
        port = orthanc.dicom_port
        with tempfile.TemporaryDirectory(prefix="census-", dir=CACHE) as tmp:
            levels = query_files(Path(tmp), day)
            out: dict[str, Any] = {
                "studies": len(day),
                "queries": sum(len(files) for files in levels),
                "by_workers": {},
            }
            for w in workers:
                census, native, old = [], [], []
                for _ in range(repeats):  # interleaved
                    census.append(run_census(port, w))
                    native.append(run_findscu(port, levels, w))
                    if before:
                        old.append(run_census_of(before, port, w))
                t, t_native = statistics.median(c["seconds"] for c in census), statistics.median(native)
                out["by_workers"][str(w)] = {
                    "census_s": t,
                    "findscu_s": t_native,
                    "ratio": t / t_native,
                    "census_queries_per_s": census[0]["queries"] / t,
                    "findscu_queries_per_s": out["queries"] / t_native,
                    "studies_per_s": len(day) / t,
                    "census_cpu_s": statistics.median(c["cpu_s"] for c in census),
                    "census": census[0],
                }
                if old:
                    t_old = statistics.median(c["seconds"] for c in old)
                    out["by_workers"][str(w)].update(
                        before_s=t_old, before_ratio=t_old / t_native,
                        before_cpu_s=statistics.median(c["cpu_s"] for c in old),
                    )  # fmt: skip
            out["assessment_day_s"] = run_assessment(port)  # once: minutes at scale
            out["assessment_15_years_h"] = out["assessment_day_s"] / scale * 365.25 * YEARS / 3600
    finally:
        orthanc.stop()
    return out


def markdown(result: dict[str, Any], scale: float) -> str:
    rows = [
        f"# Census of a busy day vs findscu — {dt.date.today().isoformat()}",
        "",
        f"Scale {scale:g} of a busy day (2,000 studies x 5 series x 50 instances): {result['studies']} studies, "
        f"{result['queries']} C-FIND queries, in Orthanc (index only). Medians of the repeats.",
        "",
        "findscu over as many associations as the census (all of a worker's queries of a level over one: its",
        "best case). CPU: the census's process. Before: the census of "
        + (f"`{result['before']}`, interleaved." if result.get("before") else "(not run)."),
        "",
        "| at once | census s | findscu s | ratio | census queries/s | findscu queries/s | studies/s "
        "| census CPU s | before s | before ratio | before CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for w, m in result["by_workers"].items():
        old = [f"{m[k]:.2f}" if k == "before_ratio" else f"{m[k]:.1f}" for k in ("before_s", "before_ratio",
               "before_cpu_s") if k in m] or ["—"] * 3  # fmt: skip
        rows.append(
            f"| {w} | {m['census_s']:.1f} | {m['findscu_s']:.1f} | **{m['ratio']:.2f}** | "
            f"{m['census_queries_per_s']:.0f} | {m['findscu_queries_per_s']:.0f} | {m['studies_per_s']:.1f} | "
            f"{m['census_cpu_s']:.1f} | " + " | ".join(old) + " |"
        )
    best = min(m["census_s"] for m in result["by_workers"].values())
    rows += [
        "",
        f"Census of a full busy day (x{1 / scale:g}, linear in queries and answers): ~{best / scale / 60:.1f} min.",
        f"Assessment of the day: {result['assessment_day_s']:.1f} s; 15 years of such days "
        f"(x{1 / scale:g} x {YEARS * 365.25:.0f} days): **{result['assessment_15_years_h']:.0f} h** (an upper bound: "
        "real archives have quieter days).",
    ]
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.1)
    parser.add_argument("--workers", default="1,4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--label", default="")
    parser.add_argument("--before", type=Path, help="another checkout whose census to time too, interleaved")
    ns = parser.parse_args(argv)
    if shutil.which("findscu") is None:
        raise SystemExit("findscu (Debian package dcmtk) is required")
    CACHE.mkdir(exist_ok=True)
    result = measure(ns.scale, [int(w) for w in ns.workers.split(",")], ns.repeats, ns.before)
    if ns.before:
        result["before"] = subprocess.run(["git", "-C", str(ns.before), "rev-parse", "--short", "HEAD"],
                                          capture_output=True, text=True).stdout.strip() or str(ns.before)  # fmt: skip
    text = markdown(result, ns.scale)
    stem = dt.date.today().isoformat() + "-census" + (f"-{ns.label}" if ns.label else "")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"date": dt.date.today().isoformat(), "scale": ns.scale,
                                                      **result}, indent=1))  # fmt: skip
    (RESULTS / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
