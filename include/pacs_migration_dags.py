"""What the DAG files share at parse time: the PACS pool and the bits of the
YAML that shape the DAGs (association slots, the nightly window). Reads one
small file, no database, no heavy imports: DAG parsing stays fast."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import Field, TypeAdapter, ValidationError

from include.pacs_migration.config import (
    PlanConfig,
    SourceConfig,
    SourceName,
    TimeoutsConfig,
    Window,
    source_pool,
)
from include.pacs_migration.roles import ACCESS_CONTROL as ACCESS_CONTROL  # what each DAG grants the roles

# Every task that talks to the legacy PACS takes slots of this pool, one per
# association it may open: the pool's size bounds the PACS's load cluster-wide
# (each further source archive has its own: ``pacs_source_associations_<name>``).
PACS_POOL = source_pool("")
DEFAULT_CONFIG = Path(__file__).parent / "config" / "migration.yaml"
# The site's YAML, for DAG parsing and tasks alike. An environment variable
# (an Airflow Variable set by environment), so the dag-processor, which reads
# no Variables from the database at parse time, sees the same file as tasks.
CONFIG_ENV = "AIRFLOW_VAR_PACS_MIGRATION_CONFIG_PATH"


def config_path() -> Path:
    """The one configuration file: ``$AIRFLOW_VAR_PACS_MIGRATION_CONFIG_PATH``, or the bundled example."""
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def _yaml() -> dict[str, Any]:
    """The file, parsed once per parse of the DAGs (it may change between parses)."""
    path = config_path()
    try:
        return _parsed(path, path.stat().st_mtime_ns)
    except OSError:
        return {}


@functools.lru_cache(maxsize=4)
def _parsed(path: Path, mtime_ns: int) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def alert_notifiers() -> tuple[str, ...]:
    """``alerts.notifiers``: the site's own failure notifiers (``module:callable``)."""
    return tuple(str(x) for x in (_yaml().get("alerts") or {}).get("notifiers") or ())


def asset_uris() -> dict[str, str]:
    """Where the archive and its assessment are (the Airflow assets' URIs)."""
    target = _yaml().get("target") or {}
    base = f"s3://{target.get('bucket') or 'pacs-archive'}/{target.get('prefix') or ''}"
    return {"pacs_archive": f"{base}studies/", "pacs_assessment": f"{base}_assessment/"}


def asset_partition_key(study_date: str, modality: str, source: str = "") -> str:
    """The partition key of the archive asset's events (``date|modality``, ``|source`` for a named source)."""
    return f"{study_date}|{modality}|{source}" if source else f"{study_date}|{modality}"


def associations_per_task(source: Any = None, key: str = "max_associations") -> int:
    """max_associations of a source (default: ``source``): the pool slots of a task that
    retrieves (``key`` census_associations: of a census). An invalid value falls back to
    the default here; the tasks fail on it, naming it."""
    field = SourceConfig.model_fields[key]
    section = source if isinstance(source, dict) else (_yaml().get("source") or {})
    value = section.get(key, field.default)
    try:
        return int(TypeAdapter(Annotated[int, Field(strict=True), *field.metadata]).validate_python(value))
    except ValidationError:
        return int(field.default)


@dataclass(frozen=True)
class SourceTasks:
    """What shapes one source's tasks: its name (in partition keys; "" for an
    unnamed first source), pool and slots per retrieving task."""

    name: str
    pool: str
    slots: int
    first: bool = False  # the first source keeps the ids a single-source deployment has
    census_slots: int = 1  # census_associations: the census's and the assessment's

    def task_id(self, base: str) -> str:
        """``census`` for the first source, ``census_<name>`` for the others."""
        return base if self.first else f"{base}_{self.name}"


def source_tasks() -> list[SourceTasks]:
    """``source`` then each of ``sources`` (a consolidation): one census, one
    partition group, one pool each. A source without a valid name is left out
    here; the tasks fail on the config, naming it."""
    first, *more = _source_sections()
    out = [SourceTasks(_name(first.get("name")), PACS_POOL, associations_per_task(first), True, _census_slots(first))]
    for src in more:
        if name := _name(src.get("name")):
            out.append(SourceTasks(name, source_pool(name), associations_per_task(src), False, _census_slots(src)))
    return out


def _census_slots(source: dict) -> int:
    return min(associations_per_task(source, "census_associations"), associations_per_task(source))


def _name(value: Any) -> str:
    try:
        return TypeAdapter(SourceName).validate_python(value) if value is not None else ""
    except ValidationError:
        return ""


def nightly_cron(source: str = "") -> tuple[str, str]:
    """(cron, timezone) starting a source archive's nightly DAG when its window opens
    (its own ``window``, else ``plan.window``)."""
    try:
        plan = PlanConfig.model_validate(_yaml().get("plan") or {})
    except ValidationError:
        plan = PlanConfig()  # the tasks fail on it, naming the field
    start = plan.window.start
    own = next((s.get("window") for s in _source_sections() if _name(s.get("name")) == source), None)
    if isinstance(own, dict):
        with contextlib.suppress(ValidationError):  # the tasks fail on it, naming the field
            start = Window.model_validate({k: v for k, v in own.items() if k != "timezone"}).start
    return f"{start.minute} {start.hour} * * *", plan.timezone


def _source_sections() -> list[dict[str, Any]]:
    data = _yaml()
    first = data.get("source") if isinstance(data.get("source"), dict) else {}
    return [first, *(s for s in data.get("sources") or [] if isinstance(s, dict))]


def digest_cron() -> str | None:
    """When ``pacs_digest`` runs (``report.digest``: daily, or Mondays), or None when no digest is configured."""
    digest = (_yaml().get("report") or {}).get("digest")
    if not isinstance(digest, dict):
        return None
    hour, _, minute = str(digest.get("at") or "07:00").partition(":")
    try:
        h, m = int(hour), int(minute or 0)
    except ValueError:
        h, m = 7, 0  # the task fails on it, naming the field
    return f"{m} {h} * * {'1' if digest.get('every') == 'week' else '*'}"


def task_timeouts() -> dict[str, dt.timedelta]:
    """``timeouts``: each kind of task's execution_timeout (the models' defaults if the file has none or a bad one)."""
    try:
        timeouts = TimeoutsConfig.model_validate(_yaml().get("timeouts") or {})
    except ValidationError:
        timeouts = TimeoutsConfig()  # the tasks fail on it, naming the field
    return {
        kind: dt.timedelta(minutes=getattr(timeouts, f"{kind}_minutes"))
        for kind in ("census", "transfer", "validate", "report")
    }
