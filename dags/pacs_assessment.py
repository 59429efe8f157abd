"""pacs_assessment: measure the legacy archive before migrating it.

Census only (C-FIND, nothing retrieved) over a range of study dates: studies,
series, instances and estimated bytes by year x modality, transfer syntaxes
(sampled), metadata quality findings, projected duration. The dataset lands
in the bucket under ``_assessment/<from>_<to>/`` (Parquet and CSV; the
nightly planner reads its by-date figures) and an HTML report with a
year x modality heat map is e-mailed.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from pathlib import Path

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

from airflow.sdk import Param, dag, get_current_context, task

from include.pacs_migration_airflow import assessment_asset, default_args
from include.pacs_migration_dags import ACCESS_CONTROL, PACS_POOL, task_timeouts

TIMEOUTS = task_timeouts()

DAG_ID = "pacs_assessment"
ASSESSMENT = assessment_asset()


def _range() -> tuple[dt.date, dt.date]:
    params = get_current_context()["params"] or {}
    first, last = dt.date.fromisoformat(params["date_from"]), dt.date.fromisoformat(params["date_to"])
    if last < first:
        raise ValueError(f"params.date_to {last} is before params.date_from {first}")
    return first, last


@dag(
    dag_id=DAG_ID,
    schedule=None,
    start_date=dt.datetime(1990, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(),
    params={
        "date_from": Param("2019-03-01", type="string", format="date", description="first StudyDate (YYYY-MM-DD)"),
        "date_to": Param("2019-03-05", type="string", format="date", description="last StudyDate (YYYY-MM-DD)"),
    },
    access_control=ACCESS_CONTROL,
    tags=["pacs", "assessment"],
    doc_md=__doc__,
)
def pacs_assessment():
    @task(pool=PACS_POOL, pool_slots=1, execution_timeout=TIMEOUTS["transfer"], outlets=[ASSESSMENT])
    def assess() -> dict:
        from include.pacs_migration.assessment import assess as assess_archive
        from include.pacs_migration.assessment import render_assessment_html, write_assessment
        from include.pacs_migration.dimse import FindSession
        from include.pacs_migration.logs import configure_logging
        from include.pacs_migration.progress import ProgressLog
        from include.pacs_migration_airflow import object_store, runtime_config

        configure_logging()
        cfg = runtime_config()
        store = object_store(cfg)
        first, last = _range()
        progress = ProgressLog(f"assessment {first}..{last}", (last - first).days + 1, "days", every_n=30)
        reports = None
        r = cfg.reports
        if r.expected or r.export_dir is not None:  # the RIS is connected: studies without a report are findings
            from include.pacs_migration.reports.intake import accessions_of_date, import_folder

            if r.export_dir is not None:
                import_folder(store, r.export_dir, r.accession_field, r.default_charset)

            def reports(day):
                return accessions_of_date(store, day, r.accession_field, r.default_charset)

        with FindSession(cfg.source) as session:
            result = assess_archive(
                session.find,
                first,
                last,
                cfg.assessment,
                cfg.source.find_limit,
                cfg.source.census_split_depth,
                on_day=lambda _day: progress.tick(),  # a progress line every 30 days or 30 s
                reports=reports,
            )
        where = f"s3://{cfg.target.bucket}/{cfg.target.prefix}_assessment/{first}_{last}/"
        html = render_assessment_html(
            result, f"dicom://{cfg.source.host}:{cfg.source.port} AE {cfg.source.called_ae_title}", where
        )
        keys = write_assessment(store, result, html)
        # The summary only: figures and codes, no UIDs or patient data in XCom.
        return {**result.summary(), "prefix": keys[0].rsplit("/", 1)[0] + "/"}

    @task(execution_timeout=TIMEOUTS["report"])
    def report(summary: dict) -> dict:
        from include.pacs_migration_airflow import object_store, runtime_config, send_report

        cfg = runtime_config()
        store = object_store(cfg)
        prefix = summary["prefix"]
        gb = summary["est_bytes"] / 1e9
        subject = (
            f"{cfg.report.subject_prefix} Archive assessment {summary['date_from']} to {summary['date_to']}: "
            f"{summary['studies']} studies, {summary['instances']} instances, {gb:.1f} GB, "
            f"{summary['projection']['nights']} night(s)"
        )
        with tempfile.TemporaryDirectory() as tmp:
            files = []
            for name in ("by_year_modality.csv", "by_date_modality.csv", "findings.csv"):
                path = Path(tmp) / f"assessment-{summary['date_from']}_{summary['date_to']}-{name}"
                path.write_bytes(store.get(prefix + name))
                files.append(str(path))
            send_report(cfg, subject, store.get(prefix + "report.html").decode(), files)
        return {"emailed_to": len(cfg.report.recipients)}

    report(assess())


pacs_assessment()
