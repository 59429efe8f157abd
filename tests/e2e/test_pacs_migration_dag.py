"""A whole DAG run with dag.test(): simulated PACS -> moto S3 -> aiosmtpd.

Asserts DESIGN.md 6: conservation, re-read checksums, a re-run writes nothing,
the mail's figures equal the manifests, and no patient data in the mail.
"""

from __future__ import annotations

import csv
import datetime as dt
import email
import hashlib
import io

import pytest

from include.pacs_migration.config import TargetConfig
from include.pacs_migration.manifest import read_transfer
from include.pacs_migration.partition import Partition
from include.pacs_migration.store import ObjectStore
from include.pacs_migration.transfer import counts_from_frame

pytestmark = pytest.mark.e2e
DATE = dt.date(2019, 3, 2)  # holds the archive's truncated CT


def _dag():
    from airflow.dag_processing.dagbag import DagBag

    from tests.dags.test_dag_integrity import DAGS

    bag = DagBag(dag_folder=str(DAGS))
    assert not bag.import_errors
    return bag.dags["pacs_migration"]


def _mail_parts(path):
    msg = email.message_from_bytes(path.read_bytes())
    html, csv_text = None, None
    for part in msg.walk():
        if part.get_content_type() == "text/html":
            html = part.get_payload(decode=True).decode()
        elif part.get_filename() and part.get_filename().endswith(".csv"):
            csv_text = part.get_payload(decode=True).decode()
    return msg, html, csv_text


def test_dag_run_end_to_end(airflow_db, airflow_connections, s3_server, archive):
    bucket, mail = airflow_connections["bucket"], airflow_connections["mail"]
    dag = _dag()
    run = dag.test(logical_date=dt.datetime(DATE.year, DATE.month, DATE.day, tzinfo=dt.timezone.utc))
    assert run.state == "success"

    store = ObjectStore(s3_server.client(), TargetConfig(bucket=bucket))
    partitions = [Partition.parse(k) for k in archive.by_partition if k.startswith(DATE.isoformat())]
    figures = {}
    for p in partitions:
        df = read_transfer(store, p)
        c = counts_from_frame(df)
        # 1. Conservation, against the archive's own truth.
        assert c.expected == archive.by_partition[p.key]
        assert c.expected == c.migrated + c.quarantined + c.unresolved
        # 2. No loss: every migrated object re-reads with its checksum.
        for key, sha in zip(df[df.state == "migrated"].object_key, df[df.state == "migrated"].object_sha256):
            assert hashlib.sha256(store.get(key)).hexdigest() == sha
        figures[p.key] = c
    assert sum(c.quarantined for c in figures.values()) == 1  # the truncated one
    objects = s3_server.count(bucket, "studies/")
    assert objects == sum(c.migrated for c in figures.values())

    # 5. The mail's figures equal the manifests'.
    mails = mail.messages()
    assert len(mails) == 1
    msg, html, csv_text = _mail_parts(mails[0])
    assert "PASSED" in msg["Subject"]
    rows = {r["partition"]: r for r in csv.DictReader(io.StringIO(csv_text))}
    assert set(rows) == set(figures)
    for key, c in figures.items():
        for field in ("expected", "migrated", "quarantined", "unresolved", "written"):
            assert int(rows[key][field]) == getattr(c, field), (key, field)
            assert f'data-field="{field}">{getattr(c, field)}<' in html.split(f'data-partition="{key}"')[1].split("</tr>")[0]
    # 4. No patient data in the mail (names, IDs planted by the generator), decoded.
    decoded = str(msg) + html + csv_text
    for token in archive.patient_names + archive.patient_ids:
        for form in (token, token.replace("^", " "), token.split("^")[0]):
            assert form not in decoded

    # 3. A re-run writes nothing new and reports the same figures.
    from airflow.utils.state import DagRunState  # noqa: F401

    _clear_runs(dag.dag_id)
    run2 = dag.test(logical_date=dt.datetime(DATE.year, DATE.month, DATE.day, tzinfo=dt.timezone.utc))
    assert run2.state == "success"
    assert s3_server.count(bucket, "studies/") == objects
    for p in partitions:
        again = counts_from_frame(read_transfer(store, p))
        assert again.written == 0
        assert (again.expected, again.migrated, again.quarantined) == (
            figures[p.key].expected, figures[p.key].migrated, figures[p.key].quarantined)
    assert len(mail.messages()) == 2


def _clear_runs(dag_id: str) -> None:
    """dag.test() refuses a second run at the same logical date: drop the first."""
    from airflow.models import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        for r in session.query(DagRun).filter(DagRun.dag_id == dag_id):
            session.delete(r)
