"""Imported by Airflow from PYTHONPATH in each of its processes (its documented
``airflow_local_settings`` hook).

Every task runs in a process forked from the one that starts it: the scheduler
under the LocalExecutor, a Celery worker under the CeleryExecutor. Whatever those
import before forking, no task imports again. Here they import what our tasks
need most: Great Expectations (~3 s a validate task), pandas, pydicom, pynetdicom,
boto3 and the pipeline's core (~1 s a task); ~4 s once at start instead, and the
pages stay shared between tasks. Then what tasks would build on first use is built
here once (``WARM_UP``): botocore's S3 models, parsed into the loader every S3 client
shares (~0.06 s of CPU each task saves), and one empty validation (GX's validation
machinery, Data Docs' compiled templates: ~0.3 s each validate task saves). Only the
Airflow-free core is imported (this runs while Airflow itself initializes).
``PACS_PRELOAD=0`` turns it off.

Our DAG files are parsed in forked processes: by the DAG processor, each file
every 30 s, and by every task, which parses its DAG file again before it runs.
Each parse used to import what Airflow imports lazily for them (its ``dag`` and
``task`` decorators; for the ``s3://`` archive asset, the Amazon provider's asset
module and boto3 with it) and our DAG-side modules: half the DAG processor's CPU
around the clock, ~0.04 CPU-seconds a task instance. These processes import them
once, before their first fork (``warm_parsing``), so each parse only builds the DAGs.

The core's code can change under a running worker (``include/`` mounted, a new
checkout): a forked process whose preloaded core files changed since forgets the
core's modules, so the task imports the code now on disk, never an older version
beside a newer DAG file.
"""

from __future__ import annotations

import logging
import os
import sys
import time

# Airflow copies every public name of this module over its own settings: none.
__all__: list[str] = []

# The core's modules that pull in the heavy libraries; great_expectations last.
PRELOAD = (
    "include.pacs_migration.steps",
    "include.pacs_migration.validate",
    "include.pacs_migration.report",
    "include.pacs_migration.openlineage",
    "great_expectations",
)

# Their warm_up() runs once the modules are in: botocore's S3 models parsed, then GX's first
# validation and Data Docs' templates.
WARM_UP = ("include.pacs_migration.store", "include.pacs_migration.validate")
# What the DAG files import of ours (every parse: the DAG processor's, each task's).
PARSING = ("include.pacs_migration_dags", "include.pacs_migration_airflow")
_PARSING_WARM = False
log = logging.getLogger(__name__)
_OWN = "include"  # the pipeline's package: its preloaded files are watched
_PRELOADED: dict[str, int] = {}  # file of a preloaded module of ours -> its mtime then


def forks_tasks(argv: list[str], executor: str) -> bool:
    """Whether this process (its command line, the configured executor) starts task processes."""
    if argv[1:3] == ["celery", "worker"]:
        return True
    return argv[1:2] == ["scheduler"] and any("local" in e.lower() for e in executor.split(","))


def preload(modules: tuple[str, ...] = PRELOAD) -> float:
    """Import ``modules``; seconds taken. A module that fails is left to the task
    that needs it, which then fails naming it."""
    import importlib

    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")  # no GX thread or network at import
    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # its import chatter
    t0 = time.perf_counter()
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - an optimization must not stop Airflow starting
            log.warning("not preloaded for tasks: %s (%s)", name, type(exc).__name__)
    for name in (m for m in WARM_UP if m in sys.modules):
        try:  # what every task would build on first use, built once here (see WARM_UP)
            sys.modules[name].warm_up()
        except Exception as exc:  # noqa: BLE001 - as above
            log.warning("not warmed up for tasks: %s (%s)", name, type(exc).__name__)
    seconds = time.perf_counter() - t0
    _watch_own_modules()
    return seconds


def _watch_own_modules() -> None:
    """Note our modules' files as imported now: a fork forgets them if one changed since."""
    if not _PRELOADED:
        os.register_at_fork(after_in_child=forget_if_changed)
    _PRELOADED.update(
        (f, os.stat(f).st_mtime_ns)
        for name, mod in list(sys.modules.items())
        if (name == _OWN or name.startswith(_OWN + ".")) and (f := getattr(mod, "__file__", None))
    )


def parses_dags(argv: list[str], executor: str) -> bool:
    """Whether the processes this one forks parse our DAG files: the DAG
    processor's (a process per file parse) and tasks (each parses its DAG file)."""
    return argv[1:2] == ["dag-processor"] or forks_tasks(argv, executor)


def warm_parsing(modules: tuple[str, ...] = PARSING) -> bool:
    """Once, before this process's first fork (Airflow is up by then, unlike
    when this module is imported): what every parse of our DAG files in a forked
    process would import again, imported here. Only imports: no configuration
    is read (the DAG-side caches key on the file's mtime and stay empty here).
    True if it ran now."""
    global _PARSING_WARM
    if _PARSING_WARM:
        return False
    _PARSING_WARM = True
    try:
        import importlib

        import airflow.dag_processing.dagbag  # noqa: F401 - a task's parse imports it (the scheduler has already)
        from airflow.sdk import Asset, dag, task, task_group  # noqa: F401 - Airflow loads these lazily

        Asset(name="pacs_migration_warm_up", uri="s3://pacs-migration-warm-up/")  # the s3 URI handlers loaded
        for name in modules:
            importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - an optimization must not stop a parse
        log.warning("DAG parsing not warmed up (%s)", type(exc).__name__)
    _watch_own_modules()
    return True


def forget_if_changed() -> bool:
    """In a forked process: if a preloaded file of ours changed since, drop our
    modules (the next import reads them from disk); True if it did."""
    for path, mtime in _PRELOADED.items():
        try:
            same = os.stat(path).st_mtime_ns == mtime
        except OSError:
            same = False
        if not same:
            for name in [n for n in sys.modules if n == _OWN or n.startswith(_OWN + ".")]:
                del sys.modules[name]
            _PRELOADED.clear()  # this process and its forks import afresh from now on
            return True
    return False


def _executor() -> str:
    from airflow.configuration import conf

    return conf.get("core", "executor", fallback="")


if os.environ.get("PACS_PRELOAD", "1") != "0":
    _EXECUTOR = _executor()
    if parses_dags(sys.argv, _EXECUTOR):
        os.register_at_fork(before=warm_parsing)
    if forks_tasks(sys.argv, _EXECUTOR):
        # Airflow configures logging after this module: stderr is the process's log.
        print(f"pacs-migration: modules for tasks preloaded in {preload():.1f} s", file=sys.stderr, flush=True)
