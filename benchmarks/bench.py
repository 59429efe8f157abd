"""End-to-end throughput of the pipeline's data path against native tools, on
the same peers, in the same run (issue #8). Not part of ``make test``.

Source: Orthanc (MaximumPduLength 131072) holding the synthetic archive of
:mod:`benchmarks.archive`. Target: moto's S3 server, a fresh process for every
measured run.

- reference: DCMTK ``getscu`` (TCP_NODELAY=1, -pdu 131072, one per study, two
  at once) into a folder, a compressed study by C-MOVE to ``storescp +xa`` (it
  takes the syntax Orthanc stores; getscu's offer lets Orthanc transcode it, or
  send nothing where it cannot), then the better of ``s5cmd cp`` and a threaded
  boto3 upload; and the same overlapped by study. T_reference is the better of the two.
- pipeline: the partition tasks' data path (``transfer_partition``: C-GET,
  normalize, write-once upload with checksums), each partition in a fresh
  worker process (CPU seconds and peak RSS are the worker's).

At least five interleaved repeats; medians and spread; R = T_pipeline /
T_reference overall and per size tier; per-stage rates; memory scaling of
one worker at 1x, 2x and 4x partition size. Writes
``benchmarks/results/<date>.json`` and ``benchmarks/results/<date>.md``.

``make bench`` (or ``python -m benchmarks.bench --scale 1 --repeats 5``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import queue
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# The whole machine's and one process's CPU, read as the scheduler benchmark reads them (peers included).
from benchmarks.airflow_overhead import _machine_busy_s, _pid_cpu_s

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(__file__).parent / ".cache"
RESULTS = Path(__file__).parent / "results"
MAX_PDU = 131072
COMPRESSED_MODALITIES = frozenset({"OT"})  # the archive's compressed studies (benchmarks.archive)
MOVE_LISTENERS = 2  # C-MOVE destinations (storescp): as many as the reference retrieves at once
# Orthanc's DICOM port -> the C-MOVE destinations registered with it (AE title, port)
_MOVE_DESTINATIONS: dict[int, queue.Queue[tuple[str, int]]] = {}
KEYS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Moto:
    """moto's S3 server as its own process (it must not share our GIL)."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(folder / f"moto-{self.port}.log", "wb")  # noqa: SIM115 - the server's log, closed in stop()
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        for _ in range(200):  # bounded: 20 s
            try:
                urllib.request.urlopen(self.url, timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("moto_server did not start")

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
            config=Config(max_pool_connections=32, retries={"max_attempts": 2}),
        )

    def cpu_s(self) -> float:
        """The server's CPU-seconds so far (the S3 both sides share: what each side's requests cost it)."""
        return _pid_cpu_s(self.proc.pid)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def children_usage() -> tuple[float, int]:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime, ru.ru_maxrss


# --- reference -----------------------------------------------------------------------------------------------


def getscu(port: int, study: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            "getscu",
            "-aet",
            "PACSMIGRATE",
            "-aec",
            "ORTHANC",
            "-S",
            "+B",
            "-pdu",
            str(MAX_PDU),
            "-od",
            str(out),
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study}",
            "127.0.0.1",
            str(port),
        ],
        check=True,
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        timeout=1800,
    )


def move_to_storescp(port: int, study: str, out: Path) -> None:
    """A study by C-MOVE to a ``storescp +xa`` (every syntax it supports): each
    instance arrives in the syntax Orthanc stores, as the pipeline's C-GET
    receives it. (movescu's own listener polls for the store association once a
    second: ~1 s a study that is not the PACS's.)"""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TCP_NODELAY": "1"}
    slots = _MOVE_DESTINATIONS[port]
    ae, listen = slots.get(timeout=600)
    receiver = subprocess.Popen(
        ["storescp", "-aet", ae, "+xa", "+B", "-pdu", str(MAX_PDU), "-od", str(out), str(listen)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(500):  # bounded: 5 s for storescp to listen
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", listen), timeout=1):
                break
            time.sleep(0.01)
        subprocess.run(
            ["movescu", "-aet", "PACSMIGRATE", "-aec", "ORTHANC", "-aem", ae, "-S", "-k",
             "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(port)],
            check=True, env=env, capture_output=True, timeout=1800,
        )  # fmt: skip
    finally:
        receiver.terminate()  # every store was answered before the C-MOVE's final response
        receiver.wait(timeout=30)
        slots.put((ae, listen))


def retrieve_native(port: int, study: str, out: Path, compressed: bool) -> None:
    """The reference's retrieval of one study: getscu, or a C-MOVE for a compressed one."""
    (move_to_storescp if compressed else getscu)(port, study, out)


def s5cmd_upload(folder: Path, moto: Moto, bucket: str, prefix: str) -> None:
    if not any(p.is_file() for p in folder.rglob("*")):
        return  # getscu stored nothing for this study (see summarize: the reference's instances)
    s5 = shutil.which("s5cmd") or str(Path(sys.executable).parent / "s5cmd")
    proc = subprocess.run(
        [s5, "--endpoint-url", moto.url, "--numworkers", "16", "cp", f"{folder}/*", f"s3://{bucket}/{prefix}"],
        env={**os.environ, **KEYS},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"s5cmd cp {folder}: {proc.stdout[-800:]} {proc.stderr[-800:]}")


def boto3_upload(folder: Path, moto: Moto, bucket: str, prefix: str) -> None:
    client = moto.client()
    files = [p for p in folder.rglob("*") if p.is_file()]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(
            pool.map(
                lambda p: client.put_object(Bucket=bucket, Key=f"{prefix}{p.relative_to(folder)}", Body=p.read_bytes()),
                files,
            )
        )


def run_reference(
    port: int, studies: list[str], work: Path, uploader: str, overlapped: bool, compressed: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """One measured reference run; the studies of ``compressed`` are moved (:func:`move_to_storescp`)."""
    moto = Moto(work)
    try:
        moto.client().create_bucket(Bucket="ref")
        upload = s5cmd_upload if uploader == "s5cmd" else boto3_upload
        cpu0, _ = children_usage()
        moto_cpu0, machine0 = moto.cpu_s(), _machine_busy_s()
        t0 = time.perf_counter()
        if overlapped:

            def one(study: str) -> None:
                folder = work / "ref" / study
                retrieve_native(port, study, folder, study in compressed)
                upload(folder, moto, "ref", f"{study}/")

            with ThreadPoolExecutor(max_workers=2) as pool:
                list(pool.map(one, studies))
            retrieve = None
        else:
            with ThreadPoolExecutor(max_workers=2) as pool:
                list(pool.map(lambda s: retrieve_native(port, s, work / "ref" / s, s in compressed), studies))
            retrieve = time.perf_counter() - t0
            upload(work / "ref", moto, "ref", "")
        seconds = time.perf_counter() - t0
        machine = _machine_busy_s() - machine0
        cpu1, rss = children_usage()
        moto_cpu = moto.cpu_s() - moto_cpu0
        files = sum(1 for p in (work / "ref").rglob("*") if p.is_file())
        listed = sum(
            len(page.get("Contents", []))
            for page in moto.client().get_paginator("list_objects_v2").paginate(Bucket="ref")
        )
        if files != listed:
            raise RuntimeError(f"reference: {files} files retrieved, {listed} objects stored")
        return {
            "seconds": seconds,
            "retrieve_s": retrieve,
            "instances": files,
            "uploader": uploader,
            "overlapped": overlapped,
            "cpu_s_children": cpu1 - cpu0,
            "moto_cpu_s": moto_cpu,
            "machine_busy_s": machine,
            "max_rss_kb_children": rss,
        }
    finally:
        moto.stop()
        shutil.rmtree(work / "ref", ignore_errors=True)


# --- pipeline -------------------------------------------------------------------------------------------------


def run_pipeline(
    port: int, work: Path, studies: int | None = None, modalities: set[str] | None = None, verify: bool = False
) -> dict[str, Any]:
    """One measured pipeline run: a fresh moto, each partition in a fresh worker process."""
    moto = Moto(work)
    try:
        moto.client().create_bucket(Bucket="pipeline")
        moto_cpu0 = moto.cpu_s()
        t0 = time.perf_counter()
        args = [
            sys.executable,
            "-m",
            "benchmarks.bench",
            "worker",
            "--port",
            str(port),
            "--endpoint",
            moto.url,
            "--staging",
            str(work / "staging"),
        ]
        if studies:
            args += ["--studies", str(studies)]
        if modalities:
            args += ["--modalities", ",".join(sorted(modalities))]
        proc = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=3600,
            env={**os.environ, **KEYS, "PYTHONPATH": str(ROOT)},
        )
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:  # its stderr's tail: how it ended (a signal, an exception) is what to look into
            raise RuntimeError(f"pipeline worker ended with {proc.returncode}: {proc.stderr[-2000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["seconds_with_process_start"] = seconds
        result["moto_cpu_s"] = moto.cpu_s() - moto_cpu0
        if verify:
            result["verified"] = verify_bucket(moto, result["objects"])
        return result
    finally:
        moto.stop()


def verify_bucket(moto: Moto, objects: dict[str, str]) -> dict[str, int]:
    """Every object the manifests name is in S3 with the recorded SHA-256."""
    client = moto.client()
    bad = 0
    for key, sha in objects.items():
        body = client.get_object(Bucket="pipeline", Key=key)["Body"].read()
        bad += hashlib.sha256(body).hexdigest() != sha
    listed = sum(
        len(page.get("Contents", []))
        for page in client.get_paginator("list_objects_v2").paginate(Bucket="pipeline", Prefix="studies/")
    )
    return {"objects": len(objects), "listed": listed, "checksum_failures": bad}


def worker(ns: argparse.Namespace) -> int:
    """The partition tasks' data path, as the DAG runs it, for every partition of the date."""
    import boto3
    from botocore.config import Config

    from benchmarks.archive import STUDY_DATE
    from include.pacs_migration.census import take_census
    from include.pacs_migration.config import SourceConfig, TargetConfig, load_config, read_yaml
    from include.pacs_migration.counts import StageTimes
    from include.pacs_migration.dimse import FindSession, c_get
    from include.pacs_migration.manifest import read_transfer, write_census
    from include.pacs_migration.normalize_processes import normalize_processes, peak_rss_kb
    from include.pacs_migration.privacy import PatientKeyer
    from include.pacs_migration.store import ObjectStore
    from include.pacs_migration.transfer import transfer_partition

    source = SourceConfig(
        host="127.0.0.1",
        port=ns.port,
        called_ae_title="ORTHANC",
        calling_ae_title="PACSMIGRATE",
        max_pdu=MAX_PDU,
        acse_timeout=10,
        dimse_timeout=300,
        network_timeout=300,
        max_associations=ns.associations,
    )
    target = TargetConfig(bucket="pipeline", upload_threads=ns.upload_threads)
    # The rule set and normalize processes the DAG runs with (include/config/migration.yaml).
    config_path = ROOT / "include" / "config" / "migration.yaml"
    data = read_yaml(config_path)
    data["source"] = {**data["source"], "host": "127.0.0.1", "port": ns.port}  # Airflow's connection gives these
    configured = load_config(data, config_path.parent)
    ruleset = configured.ruleset
    processes = configured.normalize_processes if ns.normalize_processes is None else ns.normalize_processes
    client = boto3.client(
        "s3",
        endpoint_url=ns.endpoint,
        region_name="us-east-1",
        config=Config(max_pool_connections=32, retries={"max_attempts": 3}),
    )
    store = ObjectStore(client, target)
    with FindSession(source) as session:
        census = take_census(session.find, dt.datetime.strptime(STUDY_DATE, "%Y%m%d").date())
    wanted = set(ns.modalities.split(",")) if ns.modalities else None
    partitions = [p for p in census.partitions() if not wanted or p.modality in wanted]
    cpu0, children0 = time.process_time(), children_usage()[0]
    times = StageTimes()
    out: dict[str, Any] = {"partitions": {}, "objects": {}}
    machine0 = _machine_busy_s()
    t0 = time.perf_counter()
    for p in partitions:
        series = census.for_partition(p)
        if ns.studies:
            keep = sorted({s.study_instance_uid for s in series})[: ns.studies]
            series = [s for s in series if s.study_instance_uid in keep]
        write_census(store, p, series)
        started = time.perf_counter()
        n = sum(len(s.instances) for s in series)
        with_processes = processes if n >= configured.normalize_processes_from else 0
        normalizer = normalize_processes(with_processes, ruleset, source.called_ae_title)  # per partition, as a task
        try:
            counts = transfer_partition(
                lambda q, c, s: c_get(source, q, c, s),
                store,
                p,
                series,
                Path(ns.staging),
                "bench",
                3,
                ns.associations,
                ns.upload_threads,
                ruleset=ruleset,
                source_ae=source.called_ae_title,
                times=times,
                normalizer=normalizer,
                keyer=PatientKeyer.from_secret(secrets.token_hex(32)),
            )
        finally:
            if normalizer is not None:
                # Read from the process itself: a rusage figure would count the worker's pages at fork.
                out["max_rss_kb_normalize_process"] = max(
                    out.get("max_rss_kb_normalize_process", 0), normalizer.peak_rss_kb()
                )
                normalizer.close()
        out["partitions"][p.key] = {"seconds": time.perf_counter() - started, **counts.to_json()}
        df = read_transfer(store, p)
        migrated = df[df.state == "migrated"]
        out["objects"].update(zip(migrated.object_key, migrated.object_sha256, strict=True))
        # What normalize did: received transfer syntax -> rewritten or passed through.
        for ts_in, changed in zip(df.transfer_syntax_in, df.changes, strict=True):
            what = f"{ts_in} {'rewritten' if isinstance(changed, str) and changed else 'passed through'}"
            out.setdefault("normalized", {})[what] = out.setdefault("normalized", {}).get(what, 0) + 1
    out["seconds"] = time.perf_counter() - t0
    out["machine_busy_s"] = _machine_busy_s() - machine0
    # The normalize processes are children of the worker: their CPU counts too.
    children1, _ = children_usage()
    out["cpu_s_worker"] = time.process_time() - cpu0
    out["cpu_s_normalize_processes"] = children1 - children0
    out["cpu_s"] = out["cpu_s_worker"] + out["cpu_s_normalize_processes"]
    out["max_rss_kb"] = peak_rss_kb() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out.setdefault("max_rss_kb_normalize_process", 0)
    out["stages"] = {k: v for k, v in vars(times).items() if not k.startswith("_")}
    out["instances"] = sum(v["expected"] for v in out["partitions"].values())
    out["migrated"] = sum(v["migrated"] for v in out["partitions"].values())
    print(json.dumps(out))
    return 0


# --- setup, report ------------------------------------------------------------------------------------------


def orthanc_with(archive: Path, info: dict, scale: float):
    """An Orthanc on cached storage holding the archive (uploaded once per scale)."""
    sys.path.insert(0, str(ROOT))
    from tests.peers import Orthanc

    folder = CACHE / f"orthanc-{scale:g}"
    destinations = {f"REFMOVE{n}": free_port() for n in range(MOVE_LISTENERS)}
    orthanc = Orthanc(
        folder,
        {"PACSMIGRATE": 11112, **destinations},
        tcp_nodelay=True,  # a PACS that answers promptly (DCMTK's switch): not 40 ms a small write
        MaximumPduLength=MAX_PDU,
        StorageCompression=False,
        MaximumStorageSize=0,
        DicomThreadsCount=4,
    )
    slots: queue.Queue[tuple[str, int]] = queue.Queue()
    for slot in destinations.items():
        slots.put(slot)
    _MOVE_DESTINATIONS[orthanc.dicom_port] = slots
    stats = json.loads(urllib.request.urlopen(f"{orthanc.url}/statistics", timeout=30).read())
    if int(stats["CountInstances"]) != info["instances"]:
        n = orthanc.upload_folder(archive)
        if n != info["instances"]:
            raise RuntimeError(f"Orthanc accepted {n} of {info['instances']} instances")
    return orthanc


def study_modalities(port: int) -> dict[str, str]:
    """Study Instance UID -> its modality (one per study in this archive)."""
    from benchmarks.archive import STUDY_DATE
    from include.pacs_migration.census import take_census
    from include.pacs_migration.config import SourceConfig
    from include.pacs_migration.dimse import FindSession

    source = SourceConfig(host="127.0.0.1", port=port, called_ae_title="ORTHANC", calling_ae_title="PACSMIGRATE")
    with FindSession(source) as session:
        census = take_census(session.find, dt.datetime.strptime(STUDY_DATE, "%Y%m%d").date())
    return {s.study_instance_uid: s.modality for s in census.series}


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="pipeline vs native tools")
    sub = parser.add_subparsers(dest="cmd")
    w = sub.add_parser("worker")
    w.add_argument("--port", type=int, required=True)
    w.add_argument("--endpoint", required=True)
    w.add_argument("--staging", required=True)
    w.add_argument("--studies", type=int)
    w.add_argument("--modalities")
    w.add_argument("--associations", type=int, default=2)
    w.add_argument("--upload-threads", type=int, default=4)
    w.add_argument("--normalize-processes", type=int, help="default: as include/config/migration.yaml")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--label", default="")
    parser.add_argument(
        "--airflow-scale", type=float, default=0.1, help="archive scale of the Airflow-overhead runs; 0: skip"
    )
    parser.add_argument("--airflow-repeats", type=int, default=3)
    parser.add_argument("--memory-only", action="store_true", help="only the memory-scaling runs")
    parser.add_argument(
        "--scheduler-only", action="store_true", help="only Airflow's overhead through the scheduler and executors"
    )
    parser.add_argument("--executors", default="local,celery", help="of the scheduler runs: local, celery")
    ns = parser.parse_args(argv)
    if ns.cmd == "worker":
        return worker(ns)
    if ns.scheduler_only:
        return scheduler_only(ns)

    from benchmarks.archive import build

    CACHE.mkdir(exist_ok=True)
    archive = CACHE / f"archive-{ns.scale:g}"
    info = build(archive, ns.scale)
    orthanc = orthanc_with(archive, info, ns.scale)
    try:
        port = orthanc.dicom_port
        modality_of = study_modalities(port)
        studies = sorted(modality_of)
        with tempfile.TemporaryDirectory(prefix="bench-", dir=CACHE) as tmp:
            work = Path(tmp)
            if ns.memory_only:
                return memory_only(info, memory_scaling(port, work), ns)
            # Pick the better uploader once, on the same files.
            moved = frozenset(s for s in studies if modality_of[s] in COMPRESSED_MODALITIES)
            picks = {u: run_reference(port, studies, work, u, False, moved) for u in ("s5cmd", "boto3")}
            uploader = min(picks, key=lambda u: picks[u]["seconds"])
            runs: dict[str, list[dict]] = {"reference_sequential": [], "reference_overlapped": [], "pipeline": []}
            for r in range(ns.repeats):  # interleaved: drift on a shared machine hits all three alike
                order = ["pipeline", "reference_sequential", "reference_overlapped"]
                for name in order[r % 3 :] + order[: r % 3]:
                    if name == "pipeline":
                        runs[name].append(run_pipeline(port, work, verify=(r == ns.repeats - 1)))
                    else:
                        overlapped = name.endswith("overlapped")
                        runs[name].append(run_reference(port, studies, work, uploader, overlapped, moved))
                    print(f"repeat {r + 1}: {name} {runs[name][-1]['seconds']:.1f} s", file=sys.stderr)
            # Per size tier: each tier alone, reference and pipeline, interleaved, each `tier_repeats` times.
            per_tier: dict[str, dict[str, list[float]]] = {}
            for tier_name, mods in tier_modalities(info).items():
                tier_studies = [s for s in studies if modality_of[s] in mods]
                slot = per_tier.setdefault(tier_name, {"reference": [], "pipeline": []})
                for _ in range(max(1, ns.repeats // 2)):
                    ref_s = run_reference(port, tier_studies, work, uploader, False, moved)["seconds"]
                    ref_o = run_reference(port, tier_studies, work, uploader, True, moved)["seconds"]
                    slot["reference"].append(min(ref_s, ref_o))
                    slot["pipeline"].append(run_pipeline(port, work, modalities=mods)["seconds"])
            memory = memory_scaling(port, work)
    finally:
        orthanc.stop()
    airflow = None
    if ns.airflow_scale > 0:
        airflow = measure_airflow(ns.airflow_scale, ns.airflow_repeats)
    report = summarize(info, runs, picks, uploader, per_tier, memory, ns, airflow)
    RESULTS.mkdir(exist_ok=True)
    stem = dt.date.today().isoformat() + (f"-{ns.label}" if ns.label else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
    (RESULTS / f"{stem}.md").write_text(report["markdown"])
    print(report["markdown"])
    return 0


def memory_scaling(port: int, work: Path, repeats: int = 2) -> dict[str, Any]:
    """Peak RSS of one CT worker (and its normalize process) over 1, 2 and 4
    studies of 300 instances; the larger of ``repeats`` runs each."""
    memory = {}
    for k in (1, 2, 4):
        runs = [run_pipeline(port, work, studies=k, modalities={"CT"}) for _ in range(repeats)]
        memory[f"{k}x"] = {
            "instances": runs[0]["instances"],
            "max_rss_kb": max(r["max_rss_kb"] for r in runs),
            "max_rss_kb_normalize_process": max(r["max_rss_kb_normalize_process"] for r in runs),
            "seconds": statistics.median(r["seconds"] for r in runs),
        }
    return memory


def _memory_rows(memory: dict[str, Any]) -> tuple[list[str], float, float | None]:
    rows = ["| CT partition | instances | worker peak RSS MB | normalize process peak RSS MB |", "|---|---|---|---|"]
    for k, m in memory.items():
        rows.append(
            f"| {k} | {m['instances']} | {m['max_rss_kb'] / 1024:.0f} | "
            f"{m['max_rss_kb_normalize_process'] / 1024:.0f} |"
        )
    growth = memory["4x"]["max_rss_kb"] / memory["1x"]["max_rss_kb"] - 1
    np_1x = memory["1x"]["max_rss_kb_normalize_process"]
    growth_np = memory["4x"]["max_rss_kb_normalize_process"] / np_1x - 1 if np_1x else None
    rows.append(
        f"\nPeak RSS growth 1x→4x: worker {growth * 100:+.1f}%"
        + (f", normalize process {growth_np * 100:+.1f}%" if growth_np is not None else "")
        + "."
    )
    return rows, growth, growth_np


def memory_only(info: dict, memory: dict[str, Any], ns) -> int:
    rows, growth, growth_np = _memory_rows(memory)
    report = {
        "date": dt.date.today().isoformat(),
        "archive": {k: v for k, v in info.items() if k != "files"},
        "memory_scaling": memory,
        "memory_growth_1x_to_4x": growth,
        "memory_growth_1x_to_4x_normalize_process": growth_np,
        "markdown": "\n".join([f"# Memory scaling — {dt.date.today().isoformat()}", "", *rows]) + "\n",
    }
    stem = dt.date.today().isoformat() + "-memory" + (f"-{ns.label}" if ns.label else "")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
    (RESULTS / f"{stem}.md").write_text(report["markdown"])
    print(report["markdown"])
    return 0


@contextlib.contextmanager
def _work_dir(prefix: str) -> Iterator[str]:
    """A scratch folder under the cache, removed after; kept (and named on stderr)
    with BENCH_KEEP_WORK=1, to read the task logs of a run."""
    if os.environ.get("BENCH_KEEP_WORK") == "1":
        path = tempfile.mkdtemp(prefix=prefix, dir=CACHE)
        print(f"work folder kept: {path}", file=sys.stderr)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix=prefix, dir=CACHE) as tmp:
        yield tmp


def scheduler_only(ns: Any) -> int:
    """Airflow's overhead through the scheduler and each executor (issue 22, point 5), on the
    ``--airflow-scale`` archive; results ``<date>-scheduler.{json,md}``."""
    from benchmarks import airflow_overhead
    from benchmarks.archive import build

    CACHE.mkdir(exist_ok=True)
    archive = CACHE / f"archive-{ns.airflow_scale:g}"
    info = build(archive, ns.airflow_scale)
    orthanc = orthanc_with(archive, info, ns.airflow_scale)
    date = dt.datetime.strptime(info["study_date"], "%Y%m%d").date().isoformat()
    try:
        results = {}
        for executor in ns.executors.split(","):
            with _work_dir("bench-scheduler-") as tmp:
                results[executor] = airflow_overhead.measure_scheduler(
                    orthanc.dicom_port,
                    date,
                    Path(tmp),
                    ns.airflow_repeats,
                    Moto,
                    executor,
                    len(info["modalities"]),
                    pacs_pid=orthanc.proc.pid,
                )
    finally:
        orthanc.stop()
    rows = [row for e, r in results.items() for row in [*airflow_overhead.markdown_scheduler(r, info, e), ""]]
    today = dt.date.today().isoformat()
    report = {
        "date": today,
        "archive": {k: v for k, v in info.items() if k != "files"},
        "executors": {e: {k: v for k, v in r.items() if k != "runs"} for e, r in results.items()},
        "runs": {e: r["runs"] for e, r in results.items()},
        "markdown": "\n".join([f"# Airflow through the scheduler — {today}", "", *rows]),
    }
    stem = f"{today}-scheduler" + (f"-{ns.label}" if ns.label else "")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
    (RESULTS / f"{stem}.md").write_text(report["markdown"])
    print(report["markdown"])
    return 0


def measure_airflow(scale: float, repeats: int) -> dict[str, Any]:
    """Airflow's own overhead on a smaller archive of the same shape (its own Orthanc)."""
    from benchmarks import airflow_overhead
    from benchmarks.archive import build

    archive = CACHE / f"archive-{scale:g}"
    info = build(archive, scale)
    orthanc = orthanc_with(archive, info, scale)
    date = dt.datetime.strptime(info["study_date"], "%Y%m%d").date().isoformat()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-airflow-", dir=CACHE) as tmp:
            result = airflow_overhead.measure(orthanc.dicom_port, date, Path(tmp), repeats, Moto)
    finally:
        orthanc.stop()
    result["archive"] = {k: v for k, v in info.items() if k != "files"}
    result["markdown"] = airflow_overhead.markdown(result, info)
    return result


def _run_summaries(runs: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Each run's figures without its per-object and per-partition maps
    (object key -> SHA-256: megabytes per run, and no use once verified)."""
    return {
        name: [{k: (len(v) if isinstance(v, dict) else v) for k, v in r.items()} for r in rs]
        for name, rs in runs.items()
    }


def summarize(
    info: dict, runs: dict, picks: dict, uploader: str, per_tier: dict, memory: dict, ns, airflow: dict | None = None
) -> dict:
    seq = [r["seconds"] for r in runs["reference_sequential"]]
    ovl = [r["seconds"] for r in runs["reference_overlapped"]]
    pipe = [r["seconds"] for r in runs["pipeline"]]
    t_ref = min(statistics.median(seq), statistics.median(ovl))
    t_pipe = statistics.median(pipe)
    mb = info["bytes"] / 1e6
    n = info["instances"]
    last = runs["pipeline"][-1]
    st = last["stages"]
    stage_rates = {
        "retrieve": {
            "seconds": st["retrieve_s"],
            "instances_per_s": n / st["retrieve_s"],
            "mb_per_s": st["bytes_received"] / 1e6 / st["retrieve_s"],
        },
        "normalize (seconds summed over instances)": {
            "seconds": st["normalize_s"],
            "instances_per_s": n / st["normalize_s"],
            "mb_per_s": st["bytes_received"] / 1e6 / st["normalize_s"],
        },
        "upload (thread-seconds)": {
            "seconds": st["upload_s"],
            "instances_per_s": n / st["upload_s"],
            "mb_per_s": st["bytes_stored"] / 1e6 / st["upload_s"],
        },
    }
    tiers = {}
    for tier_name, slot in per_tier.items():
        p_secs, r_secs = statistics.median(slot["pipeline"]), statistics.median(slot["reference"])
        tiers[tier_name] = {
            "pipeline_s": p_secs,
            "reference_s": r_secs,
            "R": p_secs / r_secs,
            "pipeline_runs": slot["pipeline"],
            "reference_runs": slot["reference"],
        }
    report = {
        "date": dt.date.today().isoformat(),
        "label": ns.label,
        "archive": info,
        "repeats": ns.repeats,
        "uploader": uploader,
        "uploader_trial": {k: v["seconds"] for k, v in picks.items()},
        "reference_sequential": spread(seq),
        "reference_overlapped": spread(ovl),
        "pipeline": spread(pipe),
        "R": t_pipe / t_ref,
        "tiers": tiers,
        "stages": stage_rates,
        "pipeline_cpu_s": statistics.median(r["cpu_s"] for r in runs["pipeline"]),
        "pipeline_cpu_s_normalize_processes": statistics.median(
            r.get("cpu_s_normalize_processes", 0.0) for r in runs["pipeline"]
        ),
        "normalize_process_max_rss_mb": max(r.get("max_rss_kb_normalize_process", 0) for r in runs["pipeline"]) / 1024,
        "normalized": last.get("normalized"),
        "airflow": airflow,
        "pipeline_max_rss_mb": max(r["max_rss_kb"] for r in runs["pipeline"]) / 1024,
        "reference_cpu_s": statistics.median(r["cpu_s_children"] for r in runs["reference_sequential"]),
        "moto_cpu_s": {
            name: statistics.median(r.get("moto_cpu_s", 0.0) for r in runs[name])
            for name in ("pipeline", "reference_sequential", "reference_overlapped")
        },
        # The machine's busy CPU-seconds a run over its cores' seconds: 1.0 is every core busy throughout.
        "machine_busy_share": {
            name: statistics.median(r.get("machine_busy_s", 0.0) / r["seconds"] / os.cpu_count() for r in runs[name])
            for name in ("pipeline", "reference_sequential", "reference_overlapped")
        },
        "memory_scaling": memory,
        "memory_growth_1x_to_4x": _memory_rows(memory)[1],
        "memory_growth_1x_to_4x_normalize_process": _memory_rows(memory)[2],
        "verified": last.get("verified"),
        "runs": _run_summaries(runs),
        "reference_instances": min(r["instances"] for r in runs["reference_sequential"]),
    }
    rows = [
        f"# Pipeline vs native tools — {report['date']} {ns.label}".rstrip(),
        "",
        f"Archive: {n} instances, {mb:,.0f} MB (scale {ns.scale:g}); Orthanc on loopback, PDU {MAX_PDU}; "
        f"moto S3 server; {ns.repeats} interleaved repeats; uploader for the reference: {uploader} "
        f"(trial: "
        + ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in picks.items())
        + ")."
        + (
            f" The reference retrieved {report['reference_instances']} of {n} instances: its work is not"
            " all the pipeline's."
            if report["reference_instances"] < n
            else f" The reference retrieved all {n} instances (compressed studies by C-MOVE to storescp +xa,"
            " in the syntax Orthanc stores)."
        ),
        "",
        "| run | median s | min–max s | instances/s | MB/s |",
        "|---|---|---|---|---|",
    ]
    for name, values in (
        ("reference, sequential (getscu then upload)", seq),
        ("reference, overlapped by study", ovl),
        ("pipeline (transfer_partition)", pipe),
    ):
        med = statistics.median(values)
        rows.append(f"| {name} | {med:.1f} | {min(values):.1f}–{max(values):.1f} | {n / med:.0f} | {mb / med:.1f} |")
    rows += [
        "",
        f"**R = T_pipeline / T_reference = {report['R']:.2f}** (T_reference = the better median)",
        "",
        "| size tier (alone) | instances | MB | pipeline s | reference s | R |",
        "|---|---|---|---|---|---|",
    ]
    for tier_name, t in tiers.items():
        ti = info["tiers"][tier_name]
        rows.append(
            f"| {tier_name} | {ti['instances']} | {ti['bytes'] / 1e6:,.0f} | {t['pipeline_s']:.1f} | "
            f"{t['reference_s']:.1f} | {t['R']:.2f} |"
        )
    rows += ["", "| stage (last pipeline run) | seconds | instances/s | MB/s |", "|---|---|---|---|"]
    for name, s in stage_rates.items():
        rows.append(f"| {name} | {s['seconds']:.1f} | {s['instances_per_s']:.0f} | {s['mb_per_s']:.1f} |")
    rows += [
        "",
        f"CPU seconds: pipeline {report['pipeline_cpu_s']:.1f} (of which normalize processes "
        f"{report['pipeline_cpu_s_normalize_processes']:.1f}), reference tools {report['reference_cpu_s']:.1f} "
        f"(getscu, s5cmd; a boto3 upload runs in the benchmark's own process). moto's CPU seconds: pipeline "
        f"{report['moto_cpu_s']['pipeline']:.1f}, reference {report['moto_cpu_s']['reference_sequential']:.1f} "
        f"(sequential) / {report['moto_cpu_s']['reference_overlapped']:.1f} (overlapped). The machine's cores busy: "
        + ", ".join(f"{k} {v:.0%}" for k, v in report["machine_busy_share"].items())
        + ". Peak RSS of the pipeline worker: "
        f"{report['pipeline_max_rss_mb']:.0f} MB, of a normalize process: "
        f"{report['normalize_process_max_rss_mb']:.0f} MB. What normalize did (last run): "
        + ", ".join(f"{k}: {v}" for k, v in (report["normalized"] or {}).items())
        + ".",
        "",
    ]
    memory_rows, _, _ = _memory_rows(memory)
    rows += [*memory_rows, f"Verified (last pipeline run): {report['verified']}."]
    if airflow is not None:
        rows += ["", *airflow["markdown"]]
    report["markdown"] = "\n".join(rows) + "\n"
    return report


def tier_modalities(info: dict) -> dict[str, set[str]]:
    from benchmarks.archive import TIERS

    out = {t: {m.modality for m in TIERS if m.size_tier == t} for t in ("small", "large")}
    out["compressed"] = set(COMPRESSED_MODALITIES)
    return {k: v for k, v in out.items() if k in info["tiers"]}


if __name__ == "__main__":
    # Run as the imported module, not as __main__: airflow_overhead imports this one,
    # and the C-MOVE destinations orthanc_with registers must be the ones it sees.
    from benchmarks import bench

    raise SystemExit(bench.main())
