"""The core's data path against real peers: the simulated PACS over DICOM
(pynetdicom SCP on loopback) and moto's S3 server over HTTP."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
from pathlib import Path

import pandas as pd
import pytest

from include.pacs_migration.census import take_census
from include.pacs_migration.config import load_config
from include.pacs_migration.dimse import c_get, find
from include.pacs_migration.manifest import read_census, read_transfer, write_census
from include.pacs_migration.store import ObjectStore
from include.pacs_migration.transfer import transfer_partition
from include.pacs_migration.validate import validate_partition
from tests.conftest import TEST_KEYER


@pytest.fixture
def setup(pacs, s3_server, bucket, tmp_path):
    cfg = load_config(
        {
            "source": {
                "host": "127.0.0.1",
                "port": pacs.port,
                "called_ae_title": "LEGACYPACS",
                "calling_ae_title": "PACSMIGRATE",
                "dimse_timeout": 20,
                "acse_timeout": 5,
            },
            "target": {"bucket": bucket},
            "report": {"recipients": ["c@example.org"], "from_address": "m@example.org"},
            "staging_dir": str(tmp_path / "staging"),
        }
    )
    return cfg, ObjectStore(s3_server.client(), cfg.target)


def _run(cfg, store, partition, run_id):
    return transfer_partition(
        lambda q, classes, sink, source=cfg.source: c_get(source, q, classes, sink),
        store,
        partition,
        read_census(store, partition),
        cfg.staging_dir,
        run_id,
        cfg.source.retrieve_attempts,
        cfg.source.max_associations,
        4,
        keyer=TEST_KEYER,
    )


def test_census_finds_every_instance(setup, archive):
    cfg, _ = setup
    census = take_census(lambda q: find(cfg.source, q), dt.date(2019, 3, 1))
    found = {p.key: sum(len(s.instances) for s in census.for_partition(p)) for p in census.partitions()}
    assert found == {k: v for k, v in archive.by_partition.items() if k.startswith("2019-03-01")}
    assert not census.warnings


def test_partition_conserves_rereads_and_is_idempotent(setup, s3_server, bucket):
    cfg, store = setup
    census = take_census(lambda q, source=cfg.source: find(source, q), dt.date(2019, 3, 2))
    for p in census.partitions():
        write_census(store, p, census.for_partition(p))
    totals = {"migrated": 0, "quarantined": 0}
    for p in census.partitions():
        first = _run(cfg, store, p, "run-1")
        assert first.expected == first.migrated + first.quarantined + first.unresolved
        assert first.unresolved == 0 and first.written == first.migrated
        df = read_transfer(store, p)
        report = validate_partition(store, p, read_census(store, p), df)
        assert report.success, report.failed
        assert report.reread_objects == first.migrated and report.reread_failures == 0
        for key, sha in zip(
            df[df.state == "migrated"].object_key, df[df.state == "migrated"].object_sha256, strict=True
        ):
            assert hashlib.sha256(store.get(key)).hexdigest() == sha
        totals["migrated"] += first.migrated
        totals["quarantined"] += first.quarantined
    # The archive's truncated CT of 2019-03-02 is quarantined with its original bytes.
    assert totals["quarantined"] == 1
    assert s3_server.count(bucket, "quarantine/") == 1
    before = s3_server.count(bucket, "studies/")
    assert before == totals["migrated"]
    for p in census.partitions():
        again = _run(cfg, store, p, "run-2")
        assert again.written == 0
    assert s3_server.count(bucket, "studies/") == before


def test_unreachable_pacs_ends_unresolved_not_lost(setup, pacs):
    """A source that refuses every association: each instance ends unresolved, named."""
    from peers.ports import free_port

    cfg, store = setup
    census = take_census(lambda q: find(cfg.source, q), dt.date(2019, 3, 1))
    p = census.partitions()[0]
    write_census(store, p, census.for_partition(p))
    dead = cfg.source.model_copy(update={"port": free_port(), "acse_timeout": 1.0})
    counts = transfer_partition(
        lambda q, classes, sink: c_get(dead, q, classes, sink),
        store,
        p,
        read_census(store, p),
        Path(cfg.staging_dir),
        "run-dead",
        2,
        1,
        2,
        keyer=TEST_KEYER,
    )
    assert counts.unresolved == counts.expected > 0 and counts.migrated == 0
    df = read_transfer(store, p)
    assert set(df.reason) == {"NOT_RECEIVED:network"}


def test_dry_run_of_a_partition_from_the_pacs_writes_nothing(pacs, s3_server, bucket):
    import json
    import subprocess
    import sys

    before = s3_server.count(bucket)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "include.cli",
            "dry-run",
            "--rules",
            "include/config/rules/example-site.yaml",
            "--pacs",
            f"127.0.0.1:{pacs.port}",
            "--called-ae",
            "LEGACYPACS",
            "--partition",
            "2019-03-01/MR",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["files"] == 12 and report["would_migrate"] == 12
    assert report["rules"]["mr-station-prefix"] == 12
    assert s3_server.count(bucket) == before


def test_incomplete_census_fails_validation(setup):
    """A census the PACS truncated beyond repair cannot prove a partition."""
    cfg, store = setup
    census = take_census(lambda q: find(cfg.source, q), dt.date(2019, 3, 1))
    p = census.partitions()[0]
    write_census(store, p, census.for_partition(p))
    _run(cfg, store, p, "run-w")
    df = read_transfer(store, p)
    assert validate_partition(store, p, read_census(store, p), df, publish=False).success
    report = validate_partition(store, p, read_census(store, p), df, publish=False, census_warnings=["QUERY_TRUNCATED"])
    assert not report.success
    assert [o.label for o in report.failed] == ["census:expect_table_row_count_to_equal()"]


@pytest.mark.parametrize("processes", [0, 1], ids=["normalize-in-threads", "normalize-in-a-process"])
def test_no_patient_data_in_logs_at_debug(setup, archive, caplog, capfd, processes):
    """Canary patient names and IDs of the archive never reach a log line, even
    with every logger (pynetdicom's included) at DEBUG; nor what a normalize
    process writes to the task's stderr (which Airflow keeps as the task log)."""
    import logging

    from include.pacs_migration.normalize_processes import normalize_processes
    from include.pacs_migration.rules import load_ruleset

    cfg, store = setup
    ruleset = load_ruleset(Path(__file__).resolve().parents[2] / "include/config/rules/site-default.yaml")
    caplog.set_level(logging.DEBUG)
    for name in ("pynetdicom", "include", "botocore", "urllib3", "pydicom"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        census = take_census(lambda q: find(cfg.source, q), dt.date(2019, 3, 1))
        for p in census.partitions():
            write_census(store, p, census.for_partition(p))
            with normalize_processes(processes, ruleset, "LEGACYPACS") or contextlib.nullcontext() as normalizer:
                transfer_partition(
                    lambda q, classes, sink, source=cfg.source: c_get(source, q, classes, sink),
                    store,
                    p,
                    read_census(store, p),
                    cfg.staging_dir,
                    f"run-canary-{processes}",
                    3,
                    2,
                    4,
                    ruleset=ruleset,
                    source_ae="LEGACYPACS",
                    normalizer=normalizer,
                    keyer=TEST_KEYER,
                )
    finally:
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    out, err = capfd.readouterr()
    text = "\n".join(r.getMessage() for r in caplog.records) + out + err
    assert len(caplog.records) > 50  # DEBUG logging really was on
    leaked = [
        t
        for t in archive.patient_names + archive.patient_ids
        if t in text or t.replace("^", " ") in text or t.split("^")[0] in text
    ]
    assert leaked == []


def test_normalize_in_a_process_gives_the_same_manifest(pacs, s3_server, tmp_path):
    """Normalize in a worker process (the DAG's default, another core) and in
    the load threads: the same rows, state, reasons and bytes, with the site
    rule set that rewrites the archive's quirky instances."""
    from include.pacs_migration.normalize_processes import normalize_processes
    from include.pacs_migration.rules import load_ruleset

    ruleset = load_ruleset(Path(__file__).resolve().parents[2] / "include/config/rules/site-default.yaml")
    frames = {}
    for processes in (0, 1):
        bucket = f"processes-{processes}"
        s3_server.create_bucket(bucket)
        cfg = load_config(
            {
                "source": {
                    "host": "127.0.0.1",
                    "port": pacs.port,
                    "called_ae_title": "LEGACYPACS",
                    "calling_ae_title": "PACSMIGRATE",
                    "dimse_timeout": 20,
                    "acse_timeout": 5,
                },
                "target": {"bucket": bucket},
                "report": {"recipients": ["c@example.org"], "from_address": "m@example.org"},
                "staging_dir": str(tmp_path / f"staging-{processes}"),
            }
        )
        store = ObjectStore(s3_server.client(), cfg.target)
        census = take_census(lambda q, source=cfg.source: find(source, q), dt.date(2019, 3, 2))
        rows = []
        for p in census.partitions():
            write_census(store, p, census.for_partition(p))
            normalizer = normalize_processes(processes, ruleset, "LEGACYPACS")
            assert (normalizer is None) == (processes == 0)
            try:
                transfer_partition(
                    lambda q, classes, sink, source=cfg.source: c_get(source, q, classes, sink),
                    store,
                    p,
                    read_census(store, p),
                    cfg.staging_dir,
                    "run",
                    3,
                    2,
                    4,
                    ruleset=ruleset,
                    source_ae="LEGACYPACS",
                    normalizer=normalizer,
                    keyer=TEST_KEYER,
                )
            finally:
                if normalizer is not None:
                    normalizer.close()
            rows.append(read_transfer(store, p))
        frames[processes] = pd.concat(rows).sort_values("sop_instance_uid").reset_index(drop=True)
    threads, processes = frames[0], frames[1]
    assert len(threads) > 20 and (threads.state == "quarantined").sum() >= 1
    assert (threads.changes.notna()).sum() >= 1  # some instances were rewritten, not only passed through
    columns = [
        "sop_instance_uid",
        "state",
        "reason",
        "transfer_syntax_in",
        "transfer_syntax_out",
        "changes",
        "rules_applied",
        "received_sha256",
        "pixel_sha256_before",
        "pixel_sha256_after",
        "object_size",
    ]
    pd.testing.assert_frame_equal(threads[columns], processes[columns])
    unruled = threads.rules_applied.isna()  # rule changes carry their time: bytes differ run to run
    assert list(threads.object_sha256[unruled]) == list(processes.object_sha256[unruled])
    with (
        pytest.raises(ValueError, match="another rule set"),
        normalize_processes(1, ruleset, "LEGACYPACS") as other,
    ):
        transfer_partition(
            lambda *a: None,
            store,
            census.partitions()[0],
            [],
            tmp_path,
            "x",
            1,
            1,
            1,
            normalizer=other,
            keyer=TEST_KEYER,
        )
