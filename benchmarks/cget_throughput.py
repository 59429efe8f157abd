"""C-GET throughput from Orthanc on loopback: our retrieve stage beside DCMTK
``getscu`` (TCP_NODELAY=1) on the same data, in the same run, interleaved.

400 CT instances of about 0.5 MB (512x512, 16 bit) in 4 studies are loaded
into an Orthanc started for the run. Each repeat fetches all of them:

- ``pipeline``: our ``retrieve_partition`` with C-GET, ``max_associations``
  associations, every instance streamed to staging and hashed on arrival;
- ``getscu``: one ``getscu +B -pdu 131072`` per study, as many at once as our
  associations, writing straight to disk.

Usage: ``make bench-cget`` (or ``python -m benchmarks.cget_throughput``).
Writes ``benchmarks/results/cget-<date>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from include.pacs_migration.census import take_census
from include.pacs_migration.config import SourceConfig
from include.pacs_migration.dimse import FindSession, StagingSink, c_get
from include.pacs_migration.retrieve import retrieve_partition
from tests.peers import Orthanc

STUDY_DATE = "20200102"
MAX_PDU = 131072


def build_ct(folder: Path, studies: int, per_study: int, seed: int = 8) -> tuple[list[str], int]:
    """``studies`` x ``per_study`` CT instances, 512x512 16-bit, seeded noise."""
    rng = np.random.default_rng(seed)
    template = get_testdata_file("CT_small.dcm", read=True)
    folder.mkdir(parents=True, exist_ok=True)
    study_uids, total = [], 0
    for s in range(studies):
        study, series = generate_uid(), generate_uid()
        study_uids.append(study)
        for i in range(per_study):
            ds = template.copy()
            ds.file_meta = template.file_meta.copy()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.StudyDate, ds.StudyTime = STUDY_DATE, f"{8 + s:02d}0000"
            ds.PatientName, ds.PatientID = f"BENCH^{s}", f"BENCH{s}"
            ds.InstanceNumber = i + 1
            ds.Rows = ds.Columns = 512
            ds.PixelData = rng.integers(0, 4096, 512 * 512, dtype=np.uint16).tobytes()
            path = folder / f"{s:02d}-{i:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            total += path.stat().st_size
    return study_uids, total


def run_pipeline(source: SourceConfig, staging: Path, associations: int) -> tuple[float, int, int]:
    with FindSession(source) as session:
        census = take_census(session.find, dt.datetime.strptime(STUDY_DATE, "%Y%m%d").date())
    sink = StagingSink(staging)
    started, cpu = time.perf_counter(), time.process_time()
    results = retrieve_partition(lambda q, c, s: c_get(source, q, c, s), list(census.series), sink, 1, associations)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert all(not r.missing for r in results), "pipeline: instances missing"
    return elapsed, cpu, len(sink.received), sum(r.size for r in sink.received.values())


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_getscu(orthanc: Orthanc, study_uids: list[str], out: Path, associations: int) -> tuple[float, float, int, int]:
    getscu = shutil.which("getscu")
    if getscu is None:
        sys.exit("getscu not found (Debian package dcmtk)")
    env = {**os.environ, "TCP_NODELAY": "1"}

    def one(study: str) -> None:
        folder = out / study
        folder.mkdir(parents=True)
        subprocess.run(
            [
                getscu,
                "-aet",
                "PACSMIGRATE",
                "-aec",
                orthanc.ae_title,
                "-S",
                "+B",
                "-pdu",
                str(MAX_PDU),
                "-od",
                str(folder),
                "-k",
                "QueryRetrieveLevel=STUDY",
                "-k",
                f"StudyInstanceUID={study}",
                "127.0.0.1",
                str(orthanc.dicom_port),
            ],
            check=True,
            env=env,
            capture_output=True,
            timeout=600,
        )

    started, cpu = time.perf_counter(), _children_cpu()  # getscu runs as a waited child: its CPU is counted
    with ThreadPoolExecutor(max_workers=associations) as pool:
        list(pool.map(one, study_uids))
    elapsed, cpu = time.perf_counter() - started, _children_cpu() - cpu
    files = [p for p in out.rglob("*") if p.is_file()]
    return elapsed, cpu, len(files), sum(p.stat().st_size for p in files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=4)
    parser.add_argument("--per-study", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--associations", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--label", default="", help="suffix of the result file's name")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-cget-") as tmp_name:
        tmp = Path(tmp_name)
        study_uids, data_bytes = build_ct(tmp / "data", args.studies, args.per_study)
        n = args.studies * args.per_study
        orthanc = Orthanc(tmp / "orthanc", tcp_nodelay=True, MaximumPduLength=MAX_PDU)
        try:
            orthanc.upload_folder(tmp / "data")
            source = SourceConfig(
                host="127.0.0.1",
                port=orthanc.dicom_port,
                called_ae_title=orthanc.ae_title,
                calling_ae_title="PACSMIGRATE",
                max_pdu=MAX_PDU,
                acse_timeout=10,
                dimse_timeout=120,
                network_timeout=120,
                max_associations=args.associations,
            )
            runs: dict[str, list[dict[str, float]]] = {"pipeline": [], "getscu": []}
            for r in range(args.repeats):  # interleaved, so drift on a shared machine hits both
                order = ("pipeline", "getscu") if r % 2 == 0 else ("getscu", "pipeline")
                for tool in order:
                    out = tmp / f"{tool}-{r}"
                    if tool == "pipeline":
                        seconds, cpu, count, size = run_pipeline(source, out, args.associations)
                    else:
                        seconds, cpu, count, size = run_getscu(orthanc, study_uids, out, args.associations)
                    if count != n:
                        raise SystemExit(f"{tool}: received {count} of {n}")
                    runs[tool].append(
                        {
                            "seconds": seconds,
                            "cpu_seconds": cpu,
                            "instances_per_s": count / seconds,
                            "mb_per_s": size / seconds / 1e6,
                        }
                    )
                    shutil.rmtree(out)
        finally:
            orthanc.stop()

    summary = {
        tool: {k: statistics.median(x[k] for x in rs) for k in rs[0]}
        | {"seconds_min": min(x["seconds"] for x in rs), "seconds_max": max(x["seconds"] for x in rs)}
        for tool, rs in runs.items()
    }
    ratio = summary["pipeline"]["seconds"] / summary["getscu"]["seconds"]
    cpu_ratio = summary["pipeline"]["cpu_seconds"] / summary["getscu"]["cpu_seconds"]
    result = {
        "date": dt.date.today().isoformat(),
        "instances": n,
        "bytes": data_bytes,
        "max_pdu": MAX_PDU,
        "associations": args.associations,
        "repeats": args.repeats,
        "runs": runs,
        "median": summary,
        "ratio_pipeline_to_getscu_time": ratio,
        "ratio_pipeline_to_getscu_cpu": cpu_ratio,
        "label": args.label,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"cget-{result['date']}{'-' + args.label if args.label else ''}.json"
    path.write_text(json.dumps(result, indent=2))
    print(
        f"C-GET from Orthanc, {n} CT instances, {data_bytes / 1e6:.0f} MB, {args.associations} associations, "
        f"median of {args.repeats} interleaved repeats\n"
    )
    print("| tool | seconds (min-max) | CPU-seconds | instances/s | MB/s |\n|---|---|---|---|---|")
    for tool, s in summary.items():
        print(
            f"| {tool} | {s['seconds']:.2f} ({s['seconds_min']:.2f}-{s['seconds_max']:.2f}) | "
            f"{s['cpu_seconds']:.2f} | {s['instances_per_s']:.0f} | {s['mb_per_s']:.1f} |"
        )
    print(f"\nR = T_pipeline / T_getscu = {ratio:.2f}; CPU {cpu_ratio:.2f}   ({path})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
