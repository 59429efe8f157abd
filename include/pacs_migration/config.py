"""Migration configuration: declared once, validated, immutable.

Each section of the YAML is a pydantic model below, field for field: its
type, its default and its bounds are written once, here. Unknown keys are
errors naming the nearest valid key; types are exact (``"8"`` is not an
integer, ``true`` is not a fraction). The YAML under ``include/config/``
holds the non-secret settings; the Airflow glue overlays what comes from
Connections and Variables and hands the merged mapping to :func:`load_config`.
Any bad or missing value fails with a :class:`ConfigError` naming the field
(``source.port: ...``).
"""

from __future__ import annotations

import datetime as dt
import difflib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

if TYPE_CHECKING:
    from .rules import RuleSet


class ConfigError(ValueError):
    """A configuration value is missing or invalid; ``field`` names it."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


_EMAIL = re.compile(r"^[^@\s,;<>]+@[^@\s,;<>]+$")
# A source's name goes into object keys (``source=<name>/``), pool and Connection ids.
_SOURCE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


# ---------------------------------------------------------------- value types


def _ae_title(value: str) -> str:
    value = value.strip()
    # PS3.5: AE is at most 16 characters, no backslash or control characters.
    if not value or len(value) > 16 or "\\" in value or any(ord(c) < 0x20 or ord(c) > 0x7E for c in value):
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable ASCII, no backslash)")
    return value


def _addresses(value: Any) -> tuple[str, ...]:
    """E-mail addresses from a list or a comma/semicolon/space separated string."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [r for r in re.split(r"[,;\s]+", value) if r]
    if not isinstance(value, list | tuple):
        raise ValueError("must be a list of e-mail addresses")
    for addr in value:
        if not isinstance(addr, str) or not _EMAIL.match(addr):
            raise ValueError(f"{addr!r} is not an e-mail address")
    return tuple(value)


def _email(value: str) -> str:
    if not _EMAIL.match(value):
        raise ValueError(f"{value!r} is not an e-mail address")
    return value


def _non_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("is required")
    return value.strip()


def _time(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):  # YAML 1.1 reads 20:00 as sexagesimal 1200
        return f"{value // 60:02d}:{value % 60:02d}"
    return value


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


AETitle = Annotated[str, AfterValidator(_ae_title)]
Text = Annotated[str, AfterValidator(_non_blank)]
Email = Annotated[str, AfterValidator(_email)]
Addresses = Annotated[tuple[str, ...], BeforeValidator(_addresses)]
LaxPath = Annotated[Path, Field(strict=False)]
LaxDate = Annotated[dt.date, Field(strict=False)]
ClockTime = Annotated[dt.time, BeforeValidator(_time), Field(strict=False)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class Section(BaseModel):
    """Exact types, unknown keys refused, immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)


def _resolve(path: Path, info: ValidationInfo) -> Path:
    """A relative path in the config is relative to the config file."""
    base = (info.context or {}).get("base_dir") or Path(".")
    return path if path.is_absolute() else Path(base) / path


# ---------------------------------------------------------------- sections


class TlsConfig(Section):
    """DICOM TLS to the source (PS3.15 B.1): the CA that signed the PACS's
    certificate, and our client certificate and key when the PACS asks for one.
    The files must exist now, so a typo fails at parse, not mid-night."""

    ca_file: LaxPath
    cert_file: LaxPath | None = None
    key_file: LaxPath | None = None
    server_name: str | None = None  # the name the PACS certificate must carry (default: source.host)
    check_hostname: bool = True

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _readable(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        path = _resolve(value, info)
        if not path.is_file():
            raise ValueError(f"{path} is not a readable file")
        return path

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise _FieldError(
                "key_file" if self.key_file is None else "cert_file", "cert_file and key_file go together"
            )
        return self


def _source_name(value: str) -> str:
    if not _SOURCE_NAME.match(value) or value == "default":  # "default": how reports name the first source
        raise ValueError(f"{value!r} is not a source name (lower-case letters, digits, _; at most 32)")
    return value


def _issuer(value: str) -> str:
    if not value.strip() or len(value) > 64 or "\\" in value or any(ord(c) < 32 for c in value):
        raise ValueError("must be a DICOM LO value: 1 to 64 characters, no backslash or control characters")
    return value


SourceName = Annotated[str, AfterValidator(_source_name)]
Issuer = Annotated[str, AfterValidator(_issuer)]


class SourceConfig(Section):
    """A legacy PACS and how hard we may use it. The first (``source``) may
    go unnamed (its partitions keep the layout without ``source=``) and keeps
    Airflow's ids whatever its name (Connection ``pacs_source``, pool
    ``pacs_source_associations``, task ``census``, DAG ``pacs_nightly``); each
    of ``sources`` (a consolidation) is named, and that name is in its keys,
    its pool (``pacs_source_associations_<name>``), its Connection
    (``pacs_source_<name>``), its tasks and its nightly DAG."""

    name: SourceName | None = None
    # Given to instances that carry no IssuerOfPatientID, before the crosswalk
    # (keyed by issuer): two sites' patient 12345 stay two patients.
    issuer_of_patient_id: Issuer | None = None
    # This archive's own night window and budget (default: plan.window, plan.budget).
    window: Window | None = None
    budget: Budget | None = None
    host: Text
    port: int = Field(ge=1, le=65535)
    called_ae_title: AETitle
    calling_ae_title: AETitle
    max_associations: int = Field(2, ge=1, le=64)
    # Studies the census (and the assessment) asks about at once, each worker over an
    # association it keeps; at most max_associations (the census task holds as many pool slots).
    census_associations: int = Field(1, ge=1, le=64)
    retrieve_method: Literal["C-GET", "C-MOVE"] = "C-GET"
    retrieve_attempts: int = Field(3, ge=1, le=20)
    acse_timeout: float = Field(30.0, ge=0.1, le=3600)
    dimse_timeout: float = Field(120.0, ge=0.1, le=3600)
    network_timeout: float = Field(120.0, ge=0.1, le=3600)
    max_pdu: int = Field(131072, ge=4096, le=2**31 - 1)
    # The most answers the PACS returns to one C-FIND (None: unknown; a cap is
    # also learned when the PACS signals truncation).
    find_limit: int | None = Field(None, ge=1, le=10**7)
    # The cap on image-level answers, when it differs (Orthanc LimitFindInstances).
    find_limit_instances: int | None = Field(None, ge=1, le=10**7)
    census_split_depth: int = Field(12, ge=0, le=17)
    # C-MOVE: our Storage SCP, registered at the PACS under this AE title and port.
    move_ae_title: AETitle | None = None  # default: calling_ae_title
    # The address our Storage SCP binds: the interface the PACS reaches (loopback by default).
    move_listen_host: Text = "127.0.0.1"
    move_listen_port: int = Field(11113, ge=1, le=65535)
    # After a C-MOVE's final response, how long to wait for stores still in flight.
    move_settle_timeout: float = Field(30.0, ge=0.0, le=3600)
    # Ask only for uncompressed syntaxes (the PACS decompresses); default: as stored.
    request_uncompressed: bool = False
    # Attempts to open an association when it is refused transiently or the
    # connection fails (a permanent rejection is not retried).
    association_attempts: int = Field(3, ge=1, le=20)
    tls: TlsConfig | None = None

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if any(c.isspace() for c in value):
            raise ValueError(f"{value!r} is not a host name")
        return value

    @field_validator("retrieve_method", mode="before")
    @classmethod
    def _method(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @model_validator(mode="before")
    @classmethod
    def _window_zone(cls, data: Any) -> Any:
        window = data.get("window") if isinstance(data, Mapping) else None
        if isinstance(window, Mapping) and "timezone" in window:
            raise _FieldError("window.timezone", "unknown key; the window is local time of plan.timezone")
        return data

    @property
    def label(self) -> str:
        """The name in partition keys (``""``: the unnamed first source)."""
        return self.name or ""

    @model_validator(mode="after")
    def _census_associations(self) -> SourceConfig:
        if self.census_associations > self.max_associations:
            raise _FieldError(
                "census_associations",
                f"{self.census_associations} is more than max_associations ({self.max_associations})",
            )
        return self

    @model_validator(mode="after")
    def _move_tls(self) -> SourceConfig:
        if self.retrieve_method == "C-MOVE" and self.tls is not None and self.tls.cert_file is None:
            raise _FieldError("tls.cert_file", "C-MOVE over TLS needs our certificate and key: the PACS connects to us")
        return self


class TargetConfig(Section):
    """The S3 bucket the archive moves to."""

    bucket: Text
    prefix: str = ""
    sse: Literal["AES256", "aws:kms", "none"] = "AES256"
    kms_key_id: str | None = None
    upload_threads: int = Field(4, ge=1, le=64)
    # Attempts per S3 request (botocore adaptive mode: throttling, 5xx, resets),
    # and the client's timeouts: an outage fails in bounded time, naming S3.
    retry_attempts: int = Field(10, ge=1, le=50)
    connect_timeout: float = Field(10.0, gt=0, le=600)
    read_timeout: float = Field(60.0, gt=0, le=3600)
    # An object over this size goes up in parts (S3 takes at most 5 GB in one PUT), each part
    # with its own SHA-256, completed write-once; parts of at least 5 MiB (S3's minimum).
    multipart_threshold_mb: int = Field(256, ge=5, le=5120)
    multipart_part_mb: int = Field(64, ge=5, le=5120)
    # Instance PUTs and re-read GETs sent without botocore's per-request machinery (~1 ms of
    # CPU each) but with its credentials, signer and HTTP session; anything but a plain
    # answer goes back to botocore and its retries. Off: every request through botocore.
    lean_requests: bool = True

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, value: str) -> str:
        if not _BUCKET.match(value) or ".." in value:
            raise ValueError(f"{value!r} is not a valid S3 bucket name")
        return value

    @field_validator("prefix", mode="before")
    @classmethod
    def _prefix(cls, value: Any) -> Any:
        if value is None:
            return ""
        if not isinstance(value, str) or value.startswith("/") or ".." in value.split("/"):
            raise ValueError(f"{value!r} must be a relative key prefix without '..'")
        return value if not value or value.endswith("/") else value + "/"

    @model_validator(mode="after")
    def _kms(self) -> TargetConfig:
        if self.sse == "aws:kms" and not self.kms_key_id:
            raise _FieldError("kms_key_id", "is required when target.sse is aws:kms")
        return self

    def key(self, relative: str) -> str:
        """An object key under the configured prefix."""
        return f"{self.prefix}{relative}"

    def client_config(self) -> Any:
        """botocore settings for every S3 client of the pipeline: botocore's
        default (3 attempts) turns a throttling burst into a failed task."""
        from botocore.config import Config

        return Config(
            retries={"mode": "adaptive", "max_attempts": self.retry_attempts},
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
        )


class SyslogConfig(Section):
    """An ATNA audit repository taking syslog over TLS (RFC 5425)."""

    host: Text
    port: int = Field(6514, ge=1, le=65535)
    ca_file: LaxPath  # the CA that signed the collector's certificate
    cert_file: LaxPath | None = None  # ours, when the collector asks for one
    key_file: LaxPath | None = None
    server_name: str | None = None  # the name on the collector's certificate (default: host)

    _readable = field_validator("ca_file", "cert_file", "key_file")(TlsConfig._readable.__func__)  # type: ignore[attr-defined]


class AuditConfig(Section):
    """DICOM audit messages (PS3.15 A.5): always to ``_audit/`` in the bucket
    (write-once, hash-chained); to a syslog collector as well when set."""

    source_id: Text = "pacs-migration"  # AuditSourceID: this deployment
    site_id: str | None = None  # AuditEnterpriseSiteID: the hospital
    syslog: SyslogConfig | None = None


class DigestConfig(Section):
    """One mail per day or week across all runs (``pacs_digest``), instead of
    one per run: a backfill of years would otherwise send thousands. A run
    that is not PASSED still mails these recipients at once."""

    recipients: Addresses = Field(min_length=1)
    every: Literal["day", "week"] = "day"
    at: ClockTime = dt.time(7, 0)  # UTC; weekly digests go out on Mondays


class ReportConfig(Section):
    """Who receives the validation report, and from whom."""

    recipients: Addresses = Field(min_length=1)
    from_address: Email
    smtp_connection_id: Text = "smtp_default"
    subject_prefix: str = "[PACS migration]"
    # Also told whenever a run is not PASSED (a task failed, the PACS was unreachable).
    operators: Addresses = ()
    digest: DigestConfig | None = None


DEFAULT_ALLOWED_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian: what normalize writes
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.5",
)
TransferSyntaxUID = Annotated[str, Field(pattern=r"^[0-9.]{3,64}$")]
NotifierPath = Annotated[str, Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")]


class ValidationConfig(Section):
    """Thresholds of the per-partition suite."""

    max_quarantined_fraction: Fraction = 0.10
    max_unresolved_fraction: Fraction = 0.0
    # An instance deleted at the source after migration: its object always stays
    # (write-once; removal is a rollback). keep: the partition validates and the
    # report lists it; hold: the partition fails validation until someone decides.
    source_deleted: Literal["keep", "hold"] = "keep"
    allowed_transfer_syntaxes: Annotated[tuple[TransferSyntaxUID, ...], BeforeValidator(_tuple)] = Field(
        DEFAULT_ALLOWED_SYNTAXES, min_length=1
    )


class NormalizationConfig(Section):
    """The site's rule set and where normalize runs."""

    ruleset: LaxPath | None = None  # relative to the config file
    # Processes that normalize beside a transfer task (another core); 0: in its
    # load threads. Only for partitions of at least processes_from_instances:
    # starting a process costs ~0.7 s, it saves ~3 ms of the task's GIL per instance.
    processes: int = Field(1, ge=0, le=64)
    processes_from_instances: int = Field(200, ge=1, le=10**9)
    # One instance's normalize time in a normalize process; past it the process is
    # replaced and the instance quarantined NORMALIZE_TIME_LIMIT (in the load
    # threads the byte and nesting limits and the task's execution_timeout bound it).
    instance_seconds: float = Field(60.0, gt=0, le=3600)
    # Instances of at least this size are normalized from their staged file (header
    # parsed, pixel data hashed and copied in chunks): memory stays flat in object size.
    stream_from_mb: int = Field(16, ge=1, le=5120)
    _rules: Any = PrivateAttr(default=None)  # the loaded RuleSet (rules.py is imported only to load one)

    @field_validator("ruleset")
    @classmethod
    def _path(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else _resolve(value, info)

    @model_validator(mode="after")
    def _load(self) -> NormalizationConfig:
        if self.ruleset is not None:
            from .rules import RuleSetError, load_ruleset

            try:
                self._rules = load_ruleset(self.ruleset)
            except RuleSetError as exc:
                raise _FieldError("ruleset", str(exc)) from None
        return self

    @property
    def rules(self) -> RuleSet:
        from .rules import STRUCTURAL

        return self._rules or STRUCTURAL


class AssessmentConfig(Section):
    """How the assessment projects the duration, and how much it samples."""

    throughput_mb_s: float = Field(20.0, ge=0.001, le=1e6)
    throughput_instances_s: float = Field(40.0, ge=0.001, le=1e6)
    window_hours: float = Field(10.0, gt=0)  # derived from plan.window, not set in the YAML
    sample_series: int = Field(2, ge=0, le=1000)  # per year x modality: image-level answers read
    undated_sweep: bool = True  # one universal study query to find studies without a StudyDate


class Phase(Section):
    """One phase of the plan: study dates (newest first by default) and the
    modalities it migrates (None: all)."""

    name: Text
    date_from: LaxDate | None = Field(None, alias="from")  # None: ``last_months`` before the night
    date_to: LaxDate | None = Field(None, alias="to")  # None: the night's date
    last_months: int | None = Field(None, ge=1, le=1200)
    modalities: tuple[Annotated[str, Field(pattern=r"^[A-Z0-9_]{1,16}$")], ...] | None = None
    order: Literal["newest_first", "oldest_first"] = "newest_first"

    @field_validator("modalities", mode="before")
    @classmethod
    def _modalities(cls, value: Any) -> Any:
        if value in ("all", None):
            return None
        if not isinstance(value, list) or not value:
            raise ValueError(f"must be 'all' or a list of modality codes, got {value!r}")
        return tuple(value)

    @model_validator(mode="after")
    def _dates(self) -> Phase:
        if (self.date_from is None) == (self.last_months is None):
            raise _FieldError("from", "give either from (a date) or last_months")
        if self.date_from and self.date_to and self.date_to < self.date_from:
            raise _FieldError("to", f"{self.date_to} is before {self.date_from}")
        return self

    @property
    def newest_first(self) -> bool:
        return self.order == "newest_first"


class Window(Section):
    """The clinical-quiet window, local time of the hospital (``plan.timezone``,
    copied in); may wrap midnight."""

    start: ClockTime = dt.time(20, 0)
    end: ClockTime = dt.time(6, 0)
    timezone: str = "UTC"  # not a YAML key here: plan.timezone

    @model_validator(mode="after")
    def _differ(self) -> Window:
        if self.start == self.end:
            raise _FieldError("end", "must differ from plan.window.start")
        return self

    @property
    def hours(self) -> float:
        a = self.start.hour * 60 + self.start.minute
        b = self.end.hour * 60 + self.end.minute
        return ((b - a) % (24 * 60) or 24 * 60) / 60


class Budget(Section):
    """Per night; a key left out is no limit."""

    max_partitions: int | None = Field(None, ge=1, le=10**15)
    max_instances: int | None = Field(None, ge=1, le=10**15)
    max_bytes: int | None = Field(None, ge=1, le=10**15)


class Delta(Section):
    recent_days: int = Field(30, ge=0, le=36500)  # done study dates this recent are re-censused every night
    sweep_per_night: int = Field(7, ge=0, le=100000)  # plus this many older ones, least recently checked first


def _default_phases() -> tuple[Phase, ...]:
    return (Phase(name="recent", last_months=24), Phase(name="all", date_from=dt.date(1980, 1, 1)))


class PlanConfig(Section):
    """Phased nightly loads: what to move in which order, when, and how much per night."""

    timezone: str = "UTC"
    window: Window = Field(default_factory=Window)
    budget: Budget = Field(default_factory=Budget)
    max_attempts: int = Field(3, ge=1, le=100)
    delta: Delta = Field(default_factory=Delta)
    phases: Annotated[tuple[Phase, ...], BeforeValidator(_tuple)] = Field(default_factory=_default_phases, min_length=1)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not an IANA time zone") from None
        return value

    @model_validator(mode="before")
    @classmethod
    def _window_zone(cls, data: Any) -> Any:
        """The window is local time of plan.timezone."""
        if not isinstance(data, Mapping):
            return data
        window = data.get("window", {})
        if isinstance(window, Mapping):
            if "timezone" in window:
                raise _FieldError("window.timezone", "unknown key; did you mean 'plan.timezone'?")
            data = {**data, "window": {**window, "timezone": data.get("timezone", "UTC")}}
        return data

    @property
    def max_partitions(self) -> int | None:
        return self.budget.max_partitions

    @property
    def max_instances(self) -> int | None:
        return self.budget.max_instances

    @property
    def max_bytes(self) -> int | None:
        return self.budget.max_bytes

    @property
    def delta_recent_days(self) -> int:
        return self.delta.recent_days

    @property
    def delta_sweep_per_night(self) -> int:
        return self.delta.sweep_per_night


DEFAULT_PLAN = PlanConfig()
SourceConfig.model_rebuild()  # its window and budget are declared above it


def source_pool(name: str) -> str:
    """The Airflow pool bounding one source's associations, cluster-wide (``""``: the first source's)."""
    return f"pacs_source_associations_{name}" if name else "pacs_source_associations"


class TimeoutsConfig(Section):
    """Each task's execution_timeout, in minutes: a stalled peer or a hostile
    object can never hold a worker and a pool slot for ever."""

    census_minutes: int = Field(60, ge=1, le=24 * 60)  # the date's C-FINDs
    transfer_minutes: int = Field(360, ge=1, le=7 * 24 * 60)  # one partition (a nightly unit: one date)
    validate_minutes: int = Field(60, ge=1, le=24 * 60)  # re-reads every object of a partition, then its lineage
    report_minutes: int = Field(15, ge=1, le=24 * 60)  # lineage (validate failed), report, gate, nightly plan, progress
    # One writer per study date: the lease lapses this long after its holder stopped
    # renewing it (a dead worker); a second run of the date waits this long, then fails.
    lease_ttl_seconds: int = Field(600, ge=30, le=24 * 3600)
    lease_wait_seconds: int = Field(0, ge=0, le=24 * 3600)


class AlertsConfig(Section):
    """Who hears of a task that failed for good: ``report.operators`` by e-mail
    (else the recipients), and the site's own notifiers (``module:callable``
    returning an Airflow notifier, e.g. a Slack one)."""

    notifiers: Annotated[tuple[NotifierPath, ...], BeforeValidator(_tuple)] = ()


class RollbackConfig(Section):
    """What a rollback keeps: its verified copies stay under ``rolled-back/``
    at least this long; only then may an explicit, audited purge delete them."""

    retention_days: int = Field(365, ge=0, le=100 * 365)


class DicomWebConfig(Section):
    """The DICOMweb service (``make serve``): one endpoint for viewers while
    both archives coexist. A study not migrated yet is found and opened on the
    legacy PACS through at most ``legacy_associations`` associations: keep them
    out of what the migration's Airflow pool ``pacs_source_associations`` may
    use, so that the two together never exceed what the PACS allows."""

    legacy_fallback: bool = True
    legacy_associations: int = Field(1, ge=1, le=16)
    legacy_max_study_mb: int = Field(2048, ge=1, le=1 << 20)  # one fallback retrieval held in memory
    legacy_cache_mb: int = Field(512, ge=0, le=1 << 20)  # recently retrieved legacy series, in memory
    legacy_cache_seconds: float = Field(300.0, ge=0, le=24 * 3600)
    legacy_label: str = Field(" [legacy PACS]", max_length=32)  # appended to a legacy study's description
    refresh_seconds: float = Field(30.0, ge=0, le=3600)  # how stale the study index may be for a search
    max_results: int = Field(1000, ge=1, le=100_000)  # one search's answers at most (PS3.18 limit)
    audit_flush_seconds: float = Field(5.0, gt=0, le=3600)  # accesses are recorded in batches this often


class ReportsConfig(Section):
    """Radiology reports from the RIS (HL7 v2 ORU^R01): read from ``export_dir``
    at each run of a date and pushed live to the MLLP listener (``make
    hl7-listen``); each matched to its migrated study by accession number
    and patient ID (through the rule set's crosswalk) and stored in it as a
    Basic Text SR or an Encapsulated PDF."""

    export_dir: LaxPath | None = None  # the RIS's export folder (read only: nothing in it is moved or deleted)
    accession_field: Literal["OBR-2", "OBR-3", "OBR-18", "OBR-19", "OBR-20"] = "OBR-3"
    default_charset: str = "8859/1"  # HL7 table 0211 name, for a message whose MSH-18 is empty
    match_days: int = Field(1, ge=0, le=31)  # a report's study is searched on its date +/- this many days
    expected: bool = False  # every study should have a report: the assessment lists those without one
    mllp_host: str = "127.0.0.1"
    mllp_port: int = Field(2575, ge=1, le=65535)
    max_message_kb: int = Field(20480, ge=1, le=1 << 20)  # one message at most (a PDF in base64 included)
    mllp_idle_seconds: float = Field(300.0, gt=0, le=24 * 3600)  # a silent sender's connection is closed

    @field_validator("export_dir")
    @classmethod
    def _export_dir(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else _resolve(value, info)

    @field_validator("default_charset")
    @classmethod
    def _charset(cls, value: str) -> str:
        from .reports.hl7 import CHARSETS

        if value not in CHARSETS:
            raise ValueError(f"not an HL7 character set (table 0211): one of {', '.join(sorted(CHARSETS))}")
        return value


class MigrationConfig(Section):
    """The whole file."""

    source: SourceConfig
    # More legacy archives feeding the same archive (a merger, several sites): each named.
    sources: Annotated[tuple[SourceConfig, ...], BeforeValidator(_tuple)] = ()
    target: TargetConfig
    report: ReportConfig
    normalization: NormalizationConfig = Field(default_factory=NormalizationConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    # The worker user's own folder (0700; one owned by another user is refused).
    staging_dir: LaxPath = Field(default_factory=lambda: Path.home() / ".cache" / "pacs-migration" / "staging")
    assessment: AssessmentConfig = Field(default_factory=AssessmentConfig)
    plan: PlanConfig = Field(default_factory=PlanConfig)
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    rollback: RollbackConfig = Field(default_factory=RollbackConfig)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    dicomweb: DicomWebConfig = Field(default_factory=DicomWebConfig)
    reports: ReportsConfig = Field(default_factory=ReportsConfig)

    @model_validator(mode="before")
    @classmethod
    def _derived(cls, data: Any) -> Any:
        """assessment.window_hours follows plan.window; it is not a YAML key."""
        assessment = data.get("assessment") if isinstance(data, Mapping) else None
        if isinstance(assessment, Mapping) and "window_hours" in assessment:
            raise _FieldError("assessment.window_hours", "unknown key; it follows plan.window")
        return data

    @model_validator(mode="after")
    def _window_hours(self) -> MigrationConfig:
        hours = self.plan.window.hours
        if self.assessment.window_hours != hours:
            object.__setattr__(self, "assessment", self.assessment.model_copy(update={"window_hours": hours}))
        return self

    @model_validator(mode="after")
    def _source_names(self) -> MigrationConfig:
        seen = {self.source.name} if self.source.name else set()
        for i, src in enumerate(self.sources):
            if src.name is None:
                raise _FieldError(f"sources[{i}].name", "is required (it names the source in keys and pools)")
            if src.name in seen:
                raise _FieldError(f"sources[{i}].name", f"{src.name!r} names two sources")
            seen.add(src.name)
        return self

    @property
    def archives(self) -> tuple[SourceConfig, ...]:
        """Every legacy archive: ``source`` first, then ``sources``."""
        return (self.source, *self.sources)

    def source_named(self, name: str) -> SourceConfig:
        """The source a partition names (``""``: the first, unnamed one)."""
        for src in self.archives:
            if src.label == name:
                return src
        raise ConfigError("sources", f"no source named {name!r}")

    def pool_of(self, source: SourceConfig) -> str:
        """The Airflow pool of a source (the first's is ``pacs_source_associations``, named or not)."""
        return source_pool("" if source is self.source else source.label)

    def plan_for(self, source: SourceConfig) -> PlanConfig:
        """The nightly plan of one source: its own window and budget where it has them."""
        update: dict[str, Any] = {}
        if source.window is not None:
            update["window"] = source.window.model_copy(update={"timezone": self.plan.timezone})
        if source.budget is not None:
            update["budget"] = source.budget
        return self.plan.model_copy(update=update) if update else self.plan

    @property
    def ruleset(self) -> RuleSet:
        return self.normalization.rules

    @property
    def normalize_processes(self) -> int:
        return self.normalization.processes

    @property
    def normalize_processes_from(self) -> int:
        return self.normalization.processes_from_instances


# ---------------------------------------------------------------- loading


class _FieldError(ValueError):
    """A cross-field check that names its field (relative to the model)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field_name = field_name


def _keys(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The section model at a location (for the nearest-key hint)."""
    model: Any = MigrationConfig
    for part in loc:
        if isinstance(part, int):
            continue
        fields = {f.alias or n: f for n, f in model.model_fields.items()}
        if part not in fields:
            return None
        ann = fields[part].annotation
        inner = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner and getattr(ann, "__args__", None):  # tuple[Phase, ...]
            inner = [a for a in ann.__args__ if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            return None
        model = inner[0]
    return model


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _config_error(exc: ValidationError) -> ConfigError:
    """The first error, as ``<field>: <what is wrong>``."""
    err = exc.errors(include_url=False)[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and (p.startswith("function-") or "[" in p)))
    ctx = err.get("ctx") or {}
    cause = ctx.get("error")
    if isinstance(cause, _FieldError):
        return ConfigError(_path((*loc, cause.field_name)), str(cause))
    if err["type"] == "extra_forbidden":
        model = _model_at(loc[:-1])
        known = _keys(model) if model else []
        near = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        parent = _path(loc[:-1])
        hint = (
            f"; did you mean {(parent + '.' if parent else '') + near[0]!r}?"
            if near
            else (f"; valid keys here: {', '.join(sorted(known))}" if known else "")
        )
        return ConfigError(_path(loc), f"unknown key{hint}")
    if err["type"] == "missing":
        return ConfigError(_path(loc), "is required" if len(loc) > 1 else "missing section (a mapping is required)")
    message = str(cause) if isinstance(cause, ValueError) else err["msg"]
    if err["type"].endswith("_type") or err["type"] in ("int_from_float",):
        message += f", got {type(err.get('input')).__name__} {err.get('input')!r}"
    return ConfigError(_path(loc) or "<root>", message.removeprefix("Value error, "))


def load_config(data: Mapping[str, Any], base_dir: Path | None = None) -> MigrationConfig:
    """Validate a configuration mapping.

    Parameters
    ----------
    base_dir : Path, optional
        Where relative paths in the config (the rule set, TLS files) are resolved.

    Raises
    ------
    ConfigError
        Naming the first field that is missing or invalid.
    """
    if not isinstance(data, Mapping):
        raise ConfigError("<root>", "configuration must be a mapping")
    try:
        return MigrationConfig.model_validate(dict(data), context={"base_dir": base_dir})
    except ValidationError as exc:
        raise _config_error(exc) from None


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML config file; a missing or malformed file names itself."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(str(path), "configuration file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), f"not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), "top level must be a mapping")
    return data


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``override`` into ``base``; ``None`` values in override are ignored."""
    out: dict[str, Any] = dict(base)
    for key, value in override.items():
        if value is None:
            continue
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


DICOM_CONNECTION_FIELDS = (
    "called_ae_title",
    "calling_ae_title",
    "tls_ca_file",
    "tls_cert_file",
    "tls_key_file",
    "tls_server_name",
)


def dicom_extra(extra: Mapping[str, Any]) -> dict[str, Any]:
    """A connection's DICOM fields, whether its form stored them plain or prefixed (``extra__dicom__``)."""
    return {k: extra.get(k) or extra.get(f"extra__dicom__{k}") for k in DICOM_CONNECTION_FIELDS}


def source_overlay(host: str | None, port: int | None, extra: Mapping[str, Any]) -> dict[str, Any]:
    """The ``source`` keys of the configuration a connection to the PACS gives (type ``dicom`` or generic)."""
    fields = dicom_extra(extra)
    overlay: dict[str, Any] = {
        "host": host,
        "port": port,
        "called_ae_title": fields["called_ae_title"],
        "calling_ae_title": fields["calling_ae_title"],
    }
    tls = {k[4:]: fields[k] for k in ("tls_ca_file", "tls_cert_file", "tls_key_file", "tls_server_name") if fields[k]}
    if tls:
        overlay["tls"] = tls
    return overlay
