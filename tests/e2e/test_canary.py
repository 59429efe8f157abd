"""Issue 16, point 2: canary everywhere. One whole ``pacs_migration`` run
through Airflow over an archive whose patient fields all hold canary values,
then a scan of everything the run leaves: task logs, XCom (and the rest of the
metadata database), every object in the bucket but instances and quarantine
(Parquet decoded, lineage, GX JSON and Data Docs, the audit log), OpenLineage
events, every e-mail part decoded and zip attachments opened, the staging and
temp directories. Zero hits; then a leak planted in each channel is found."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import OPENLINEAGE_FILE
from tests.e2e.canary import PLANTED, Scan, plant, scan_bucket, scan_files
from tests.ris import oru

pytestmark = pytest.mark.e2e
DATE = dt.date(2019, 3, 1)


@pytest.fixture(scope="module")
def canary_pacs(tmp_path_factory):
    from include.demo.archive import build_archive
    from peers.pacs import SimulatedPACS

    root = tmp_path_factory.mktemp("canary-archive")
    summary = build_archive(root, first_date=DATE, days=1, seed=4711)
    assert plant(root) == summary.instances
    server = SimulatedPACS(root)
    yield server
    server.stop()


def _config(tmp_path: Path) -> Path:
    """The bundled config with a site rule that writes a value invalid for its VR."""
    import yaml

    from include.pacs_migration.config import read_yaml
    from include.pacs_migration_dags import DEFAULT_CONFIG

    rules = yaml.safe_load((DEFAULT_CONFIG.parent / "rules" / "site-default.yaml").read_text())
    rules["id"] = "canary"
    rules["rules"] = [
        {"id": "age", "when": {"Modality": "CT"}, "action": "set", "tag": "PatientAge", "value": "093 years"}
    ]
    rules["invalid_values"] = "keep"  # let the invalid values travel as far as they can
    (tmp_path / "canary-rules.yaml").write_text(yaml.safe_dump(rules))
    data = read_yaml(DEFAULT_CONFIG)
    data["normalization"]["ruleset"] = "canary-rules.yaml"
    data["audit"] = {"source_id": "pacs-migration-canary"}
    # The RIS's reports of the date, canaries in every field: one names every study's accession
    # number (ambiguous here), one cannot be read (its status is a canary); neither may leak.
    ris = tmp_path / "ris"
    ris.mkdir()
    when = DATE.strftime("%Y%m%d")
    common = dict(issuer=PLANTED["IssuerOfPatientID"], name=PLANTED["PatientName"], observed=f"{when}101500")
    text = ["CNRYQX findings: chest pain since Monday\\.br\\CNRYQX impression"]
    pid, acc = PLANTED["PatientID"], PLANTED["AccessionNumber"]
    (ris / "a.hl7").write_text(oru("CNRYQXMSG1", pid, acc, lines=text, **common))
    (ris / "b.hl7").write_text(oru("CNRYQXMSG2", pid, acc, lines=text, status="CNRYQX", **common))
    data["reports"] = {"export_dir": str(ris)}
    path = tmp_path / "migration.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _xcom_and_db(scan: Scan, home: Path) -> None:
    """XCom rows as Airflow returns them, and the metadata database's bytes (SQLite here)."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.query(XComModel).filter(XComModel.dag_id == "pacs_migration").all()
        for row in rows:
            scan.read("xcom", f"{row.task_id}/{row.key}", json.dumps(row.value, default=str).encode())
    scan_files(scan, "metadata-db", sorted(home.glob("airflow.db*")))


def _new_temp_files(since: float, exclude: list[Path]) -> list[Path]:
    root = Path(tempfile.gettempdir())
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if any(here == e or e in here.parents for e in exclude):
            dirnames[:] = []
            continue
        for f in filenames:
            p = here / f
            try:
                if p.is_file() and p.stat().st_mtime >= since and p.stat().st_size < 64 << 20:
                    out.append(p)
            except OSError:
                continue
    return out


@pytest.fixture(scope="module")
def state():
    return {}


def test_a_whole_run_leaks_no_canary(
    airflow_db,
    airflow_connections,
    canary_pacs,
    s3_server,
    tmp_path,
    tmp_path_factory,
    monkeypatch,
    capfd,
    caplog,
    state,
):
    from tests.e2e.test_pacs_migration_dag import _dag, _run

    monkeypatch.setenv("AIRFLOW_VAR_PACS_MIGRATION_CONFIG_PATH", str(_config(tmp_path)))
    conn = json.loads(os.environ["AIRFLOW_CONN_PACS_SOURCE"])
    monkeypatch.setenv("AIRFLOW_CONN_PACS_SOURCE", json.dumps({**conn, "port": canary_pacs.port}))
    caplog.set_level(logging.DEBUG)
    started = time.time()
    run = _run(_dag(), DATE)
    assert run.state in ("success", "failed")  # the MR instances' invalid values may fail it; we read what it left

    home = Path(os.environ["AIRFLOW_HOME"])
    out, err = capfd.readouterr()
    scan = Scan()
    scan.read("task-output", "stdout", out.encode())
    scan.read("task-output", "stderr", err.encode())
    scan.read("log-records", "caplog", "\n".join(r.getMessage() for r in caplog.records).encode())
    scan_files(scan, "task-logs", sorted((home / "logs").rglob("*")))
    _xcom_and_db(scan, home)
    scan_bucket(scan, s3_server.client(), airflow_connections["bucket"])
    # the study index holds them, as it must to answer a search by name: and nothing else does
    index = Scan()
    scan_bucket(index, s3_server.client(), airflow_connections["bucket"], skip=("studies/", "quarantine/"))
    where = {h.split(": ")[1].split("/")[0] + "/" + h.split(": ")[1].split("/")[1] for h in index.hits}
    assert where == {"_index/studies", "_reports/inbox"}, index.hits[:3]  # the RIS's messages too, and nothing else
    scan_files(scan, "openlineage", [OPENLINEAGE_FILE])
    scan_files(scan, "e-mail", airflow_connections["mail"].messages())
    staging = tmp_path / "staging"
    scan_files(scan, "staging", sorted(staging.rglob("*")))
    # New files in the temp dir, but pytest's own folders (this session's archives and peers, all
    # xdist workers', and any other pytest session's on the machine: they are tests, not the pipeline)
    base = tmp_path_factory.getbasetemp()
    ours = next((p for p in base.parents if p.name.startswith("pytest-of-")), base)
    scan_files(scan, "temp", _new_temp_files(started, [ours, base.parent, home]))

    state.update(scan=scan, home=home, staging=staging, bucket=airflow_connections["bucket"])
    state["mail"] = airflow_connections["mail"]
    print(f"canary scan: {scan.files} files, {scan.bytes} bytes; by channel {scan.scope}")
    assert scan.scope.get("bucket", 0) > 10 and scan.scope.get("e-mail", 0) > 3 and scan.scope.get("xcom", 0) > 3
    assert len(out) + len(err) > 10_000  # dag.test() writes the task logs here
    assert [p for p in staging.rglob("*") if p.is_file() and p.name != ".owner"] == []
    assert scan.hits == []


def test_the_scanner_finds_a_leak_planted_in_each_channel(state, s3_server, tmp_path):
    """The same scan, after one canary value is planted in each channel: a
    scanner that cannot see a channel would pass the test above for nothing."""
    import io
    import zipfile

    import pandas as pd

    if "scan" not in state:
        pytest.skip("needs the run of the test above")
    leak, home, client, bucket = PLANTED["PatientID"], state["home"], s3_server.client(), state["bucket"]
    log_dir = home / "logs" / "planted"
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "attempt=1.log").write_text(f"INFO normalizing patient {leak}\n")
    buf = io.BytesIO()
    pd.DataFrame({"patient": [leak]}).to_parquet(buf)
    client.put_object(Bucket=bucket, Key="_manifests/planted/transfer.parquet", Body=buf.getvalue())
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("docs/index.html", f"<td>{PLANTED['PatientName']}</td>")
    mail_dir = state["mail"].folder
    from email.message import EmailMessage

    msg = EmailMessage()
    msg["Subject"] = "planted"
    msg.set_content("figures only")
    msg.add_attachment(zipped.getvalue(), maintype="application", subtype="zip", filename="docs.zip")
    (mail_dir / "planted.eml").write_bytes(bytes(msg))
    (state["staging"] / "left-behind.dcm").write_bytes(
        b"\x00" * 128 + b"DICM\x10\x00 " + PLANTED["PatientBirthDate"].encode()
    )

    scan = Scan()
    scan_files(scan, "task-logs", [log_dir / "attempt=1.log"])
    scan_bucket(scan, client, bucket)
    scan_files(scan, "e-mail", [mail_dir / "planted.eml"])
    scan_files(scan, "staging", [state["staging"] / "left-behind.dcm"])
    channels = {h.split(":")[0] for h in scan.hits}
    assert channels == {"task-logs", "bucket", "e-mail", "staging"}, scan.hits
    assert any("transfer.parquet (decoded)" in h for h in scan.hits)  # found only once decoded
    assert any("docs.zip" in h and "index.html" in h for h in scan.hits)  # inside the zip in the mail
    shutil.rmtree(log_dir)
