"""pacs_assessment: measure the legacy archive before migrating it.

Census only (C-FIND, nothing retrieved) over a range of study dates: studies,
series, instances and estimated bytes by year x modality, transfer syntaxes
(sampled), metadata quality findings, projected duration. The dataset lands
in the bucket under ``_assessment/<from>_<to>/`` (Parquet and CSV; the
nightly planner reads its by-date figures) and an HTML report with a
year x modality heat map is e-mailed.

Several legacy archives (``sources``): each is assessed by its own task
(``assess_<name>``, in its pool, under ``_assessment/source=<name>/``), and
the e-mail compares them: per pair, the studies both hold and the patient IDs
both use (compared keyed), same patient or colliding.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from pathlib import Path

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

from airflow.sdk import Param, dag, get_current_context, task

from include.pacs_migration_airflow import assessment_asset, default_args
from include.pacs_migration_dags import ACCESS_CONTROL, SourceTasks, source_tasks, task_timeouts

TIMEOUTS = task_timeouts()
SOURCES = source_tasks()  # several legacy archives: one assess task each, in its pool; their overlap

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
    summaries = [_assess(src) for src in SOURCES]
    report(summaries)


def _assess(src: SourceTasks):
    """One source archive's census-only assessment, in its pool."""

    @task(
        task_id=src.task_id("assess"),
        pool=src.pool,
        pool_slots=src.census_slots,
        execution_timeout=TIMEOUTS["transfer"],
        outlets=[ASSESSMENT],
    )
    def assess() -> dict:
        from include.pacs_migration.assessment import assess as assess_archive
        from include.pacs_migration.assessment import render_assessment_html, write_assessment
        from include.pacs_migration.dimse import FindSession
        from include.pacs_migration.logs import configure_logging
        from include.pacs_migration.privacy import PatientKeyer
        from include.pacs_migration.progress import ProgressLog
        from include.pacs_migration_airflow import object_store, patient_secret, runtime_config

        configure_logging()
        cfg = runtime_config()
        source = cfg.source_named(src.name)
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

        keyer = None
        if len(SOURCES) > 1:  # archives to compare: keep each study's patient ID, keyed
            keyer = PatientKeyer.from_secret(patient_secret()).key_of
        with FindSession(source) as session:
            result = assess_archive(
                session.find,
                first,
                last,
                cfg.assessment,
                source.find_limit,
                source.census_split_depth,
                on_day=lambda _day: progress.tick(),  # a progress line every 30 days or 30 s
                reports=reports,
                patient_key=keyer,
                workers=source.census_associations,
            )
        where = f"s3://{cfg.target.bucket}/{cfg.target.prefix}_assessment/{first}_{last}/"
        label = f"dicom://{source.host}:{source.port} AE {source.called_ae_title}"
        keys = write_assessment(store, result, render_assessment_html(result, label, where), src.name)
        # The summary only: figures and codes, no UIDs or patient data in XCom.
        return {**result.summary(), "prefix": keys[0].rsplit("/", 1)[0] + "/", "source": src.name, "label": label}

    return assess()


@task(execution_timeout=TIMEOUTS["report"])
def report(summaries: list[dict]) -> dict:
    """One e-mail: the assessment (several source archives: each one's attached, and their overlap)."""
    from include.pacs_migration.assessment import (
        ASSESSMENT_PREFIX,
        overlap,
        read_study_keys,
        render_consolidation_html,
        rows_csv,
    )
    from include.pacs_migration.manifest import source_label
    from include.pacs_migration_airflow import object_store, runtime_config, send_report

    cfg = runtime_config()
    store = object_store(cfg)
    first, last = _range()
    est = sum(s["est_bytes"] for s in summaries) / 1e9
    nights = max(s["projection"]["nights"] for s in summaries)
    several = len(summaries) > 1
    subject = (
        f"{cfg.report.subject_prefix} Archive assessment {first} to {last}"
        + (f" ({len(summaries)} source archives)" if several else "")
        + f": {sum(s['studies'] for s in summaries)} studies, {sum(s['instances'] for s in summaries)} instances, "
        f"{est:.1f} GB, {nights} night(s)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for summary in summaries:
            tag = f"-{summary['source']}" if summary["source"] else ""
            names = ("by_year_modality.csv", "by_date_modality.csv", "findings.csv") + (
                ("report.html",) if several else ()
            )
            for name in names:
                path = Path(tmp) / f"assessment{tag}-{summary['date_from']}_{summary['date_to']}-{name}"
                path.write_bytes(store.get(summary["prefix"] + name))
                files.append(str(path))
        if not several:
            html = store.get(summaries[0]["prefix"] + "report.html").decode()
        else:
            keys = {source_label(s["source"]): read_study_keys(store, first, last, s["source"]) for s in summaries}
            rows = overlap(keys) if all(k is not None for k in keys.values()) else []
            table = rows_csv(rows)
            store.put(
                f"{store.target.prefix}{ASSESSMENT_PREFIX}overlap/{first}_{last}/overlap.csv",
                table.encode(),
                "text/csv",
            )
            path = Path(tmp) / f"assessment-{first}_{last}-overlap.csv"
            path.write_text(table)
            files.append(str(path))
            shown = [{**s, "source": source_label(s["source"])} for s in summaries]
            html = render_consolidation_html(shown, rows, f"s3://{cfg.target.bucket}/{cfg.target.prefix}_assessment/")
        send_report(cfg, subject, html, files)
    return {"emailed_to": len(cfg.report.recipients), "sources": len(summaries)}


pacs_assessment()
