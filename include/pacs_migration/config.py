"""Migration configuration: plain, validated, immutable.

The YAML file under ``include/config/`` holds the non-secret settings; the DAG
layer overlays what comes from Airflow Connections and Variables and hands the
merged mapping to :func:`load_config`. Any bad or missing value fails fast with
a :class:`ConfigError` naming the field (``source.port: ...``).
"""

from __future__ import annotations

import datetime as dt
import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from .rules import STRUCTURAL, RuleSet, RuleSetError, load_ruleset


class ConfigError(ValueError):
    """A configuration value is missing or invalid; ``field`` names it."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


RETRIEVE_METHODS = ("C-GET", "C-MOVE")
SSE_MODES = ("AES256", "aws:kms", "none")
_EMAIL = re.compile(r"^[^@\s,;<>]+@[^@\s,;<>]+$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class TlsConfig:
    """DICOM TLS to the source (PS3.15 B.1): the CA that signed the PACS's
    certificate, and our client certificate and key when the PACS asks for one."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    # The name the PACS certificate must carry (default: source.host).
    server_name: str | None = None
    check_hostname: bool = True


@dataclass(frozen=True)
class SourceConfig:
    """The legacy PACS and how hard we may use it."""

    host: str
    port: int
    called_ae_title: str
    calling_ae_title: str
    max_associations: int = 2
    retrieve_method: str = "C-GET"
    retrieve_attempts: int = 3
    acse_timeout: float = 30.0
    dimse_timeout: float = 120.0
    network_timeout: float = 120.0
    max_pdu: int = 131072
    # The most answers the PACS returns to one C-FIND (None: unknown; a cap is
    # also learned when the PACS signals truncation).
    find_limit: int | None = None
    # The cap on image-level answers, when it differs (Orthanc LimitFindInstances).
    find_limit_instances: int | None = None
    census_split_depth: int = 12
    # C-MOVE: our Storage SCP, registered at the PACS under this AE title and port.
    move_ae_title: str | None = None  # default: calling_ae_title
    move_listen_host: str = "0.0.0.0"
    move_listen_port: int = 11113
    # After a C-MOVE's final response, how long to wait for stores still in flight.
    move_settle_timeout: float = 30.0
    # Ask only for uncompressed syntaxes (the PACS decompresses); default: as stored.
    request_uncompressed: bool = False
    # Attempts to open an association when it is refused transiently or the
    # connection fails (a permanent rejection is not retried).
    association_attempts: int = 3
    tls: TlsConfig | None = None


@dataclass(frozen=True)
class TargetConfig:
    """The S3 bucket the archive moves to."""

    bucket: str
    prefix: str = ""
    sse: str = "AES256"
    kms_key_id: str | None = None
    upload_threads: int = 4

    def key(self, relative: str) -> str:
        """An object key under the configured prefix."""
        return f"{self.prefix}{relative}"


@dataclass(frozen=True)
class ReportConfig:
    """Who receives the validation report, and from whom."""

    recipients: tuple[str, ...]
    from_address: str
    smtp_connection_id: str = "smtp_default"
    subject_prefix: str = "[PACS migration]"
    # Also told whenever a run is not PASSED (a task failed, the PACS was unreachable).
    operators: tuple[str, ...] = ()


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


@dataclass(frozen=True)
class ValidationConfig:
    """Thresholds of the per-partition suite."""

    max_quarantined_fraction: float = 0.10
    max_unresolved_fraction: float = 0.0
    allowed_transfer_syntaxes: tuple[str, ...] = DEFAULT_ALLOWED_SYNTAXES


@dataclass(frozen=True)
class AssessmentConfig:
    """How the assessment projects the duration, and how much it samples."""

    throughput_mb_s: float = 20.0
    throughput_instances_s: float = 40.0
    window_hours: float = 10.0
    sample_series: int = 2  # per year x modality: image-level answers read for sizes and syntaxes
    undated_sweep: bool = True  # one universal study query to find studies without a StudyDate


@dataclass(frozen=True)
class Phase:
    """One phase of the plan: study dates (newest first by default) and the
    modalities it migrates (None: all)."""

    name: str
    date_from: dt.date | None  # None: ``last_months`` before the night
    date_to: dt.date | None  # None: the night's date
    last_months: int | None = None
    modalities: tuple[str, ...] | None = None
    newest_first: bool = True


@dataclass(frozen=True)
class Window:
    """The clinical-quiet window, local time of the hospital; may wrap midnight."""

    start: dt.time
    end: dt.time
    timezone: str

    @property
    def hours(self) -> float:
        a = self.start.hour * 60 + self.start.minute
        b = self.end.hour * 60 + self.end.minute
        return ((b - a) % (24 * 60) or 24 * 60) / 60


@dataclass(frozen=True)
class PlanConfig:
    """Phased nightly loads: what to move in which order, when, and how much per night."""

    phases: tuple[Phase, ...]
    window: Window
    max_partitions: int | None = None
    max_instances: int | None = None
    max_bytes: int | None = None
    max_attempts: int = 3
    delta_recent_days: int = 30  # done study dates this recent are re-censused every night
    delta_sweep_per_night: int = 7  # plus this many older done dates, least recently checked first


DEFAULT_PLAN = PlanConfig(
    phases=(Phase("recent", None, None, last_months=24), Phase("all", dt.date(1980, 1, 1), None)),
    window=Window(dt.time(20, 0), dt.time(6, 0), "UTC"),
)


@dataclass(frozen=True)
class MigrationConfig:
    source: SourceConfig
    target: TargetConfig
    report: ReportConfig
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    ruleset: RuleSet = STRUCTURAL
    # Processes that normalize beside a transfer task (another core); 0: in its
    # load threads. Only for partitions of at least normalize_processes_from
    # instances: starting a process costs ~0.7 s, it saves ~3 ms of the task's GIL
    # per instance.
    normalize_processes: int = 1
    normalize_processes_from: int = 200
    staging_dir: Path = field(default_factory=lambda: Path("/tmp/pacs-migration-staging"))
    assessment: AssessmentConfig = field(default_factory=AssessmentConfig)
    plan: PlanConfig = DEFAULT_PLAN


# Every key the configuration may hold: anything else is an error naming the
# nearest valid key (a misspelt section would otherwise fall back to defaults).
_PHASE_KEYS = {"name": None, "from": None, "to": None, "last_months": None, "modalities": None, "order": None}
SCHEMA: dict[str, Any] = {
    "source": {
        "host": None,
        "port": None,
        "called_ae_title": None,
        "calling_ae_title": None,
        "max_associations": None,
        "retrieve_method": None,
        "retrieve_attempts": None,
        "acse_timeout": None,
        "dimse_timeout": None,
        "network_timeout": None,
        "max_pdu": None,
        "find_limit": None,
        "find_limit_instances": None,
        "census_split_depth": None,
        "move_ae_title": None,
        "move_listen_host": None,
        "move_listen_port": None,
        "move_settle_timeout": None,
        "request_uncompressed": None,
        "association_attempts": None,
        "tls": {"ca_file": None, "cert_file": None, "key_file": None, "server_name": None, "check_hostname": None},
    },
    "target": {"bucket": None, "prefix": None, "sse": None, "kms_key_id": None, "upload_threads": None},
    "report": {
        "recipients": None,
        "operators": None,
        "from_address": None,
        "smtp_connection_id": None,
        "subject_prefix": None,
    },
    "normalization": {"ruleset": None, "processes": None, "processes_from_instances": None},
    "validation": {
        "max_quarantined_fraction": None,
        "max_unresolved_fraction": None,
        "allowed_transfer_syntaxes": None,
    },
    "staging_dir": None,
    "assessment": {
        "throughput_mb_s": None,
        "throughput_instances_s": None,
        "sample_series": None,
        "undated_sweep": None,
    },
    "plan": {
        "timezone": None,
        "window": {"start": None, "end": None},
        "budget": {"max_partitions": None, "max_instances": None, "max_bytes": None},
        "max_attempts": None,
        "delta": {"recent_days": None, "sweep_per_night": None},
        "phases": [_PHASE_KEYS],
    },
}


def check_keys(data: Any, schema: Any = None, path: str = "") -> None:
    """Refuse any key the configuration does not know, naming the nearest one."""
    schema = SCHEMA if schema is None else schema
    if isinstance(schema, list) and isinstance(data, list):
        for n, item in enumerate(data):
            check_keys(item, schema[0], f"{path}[{n}]")
        return
    if not isinstance(schema, dict) or not isinstance(data, Mapping):
        return
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in schema:
            near = difflib.get_close_matches(str(key), [str(k) for k in schema], n=1, cutoff=0.6)
            hint = (
                f"; did you mean {(path + '.' if path else '') + near[0]!r}?"
                if near
                else f"; valid keys here: {', '.join(sorted(schema))}"
            )
            raise ConfigError(where, f"unknown key{hint}")
        check_keys(value, schema[key], where)


def _section(data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = data.get(name)
    if not isinstance(value, Mapping):
        raise ConfigError(name, "missing section (a mapping is required)")
    return value


def _str(sec: Mapping[str, Any], path: str, key: str, default: str | None = None) -> str:
    value = sec.get(key, default)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ConfigError(f"{path}.{key}", "is required")
    if not isinstance(value, str):
        raise ConfigError(f"{path}.{key}", f"must be a string, got {type(value).__name__}")
    return value.strip()


def _int(sec: Mapping[str, Any], path: str, key: str, default: int, lo: int, hi: int) -> int:
    value = sec.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        # Exact types: "8" or true is a mistake to report, not to coerce.
        raise ConfigError(f"{path}.{key}", f"must be an integer, got {type(value).__name__} {value!r}")
    number = value
    if not lo <= number <= hi:
        raise ConfigError(f"{path}.{key}", f"must be between {lo} and {hi}, got {number}")
    return number


def _float(sec: Mapping[str, Any], path: str, key: str, default: float, lo: float, hi: float) -> float:
    value = sec.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{path}.{key}", f"must be a number, got {type(value).__name__} {value!r}")
    number = float(value)
    if not lo <= number <= hi:
        raise ConfigError(f"{path}.{key}", f"must be between {lo} and {hi}, got {number}")
    return number


def _ae_title(sec: Mapping[str, Any], path: str, key: str) -> str:
    value = _str(sec, path, key)
    # PS3.5: AE is at most 16 characters, no backslash or control characters.
    if len(value) > 16 or "\\" in value or any(ord(c) < 0x20 or ord(c) > 0x7E for c in value):
        raise ConfigError(f"{path}.{key}", f"{value!r} is not a valid AE title (1-16 printable ASCII, no backslash)")
    return value


def load_config(data: Mapping[str, Any], base_dir: Path | None = None) -> MigrationConfig:
    """Validate a configuration mapping.

    Parameters
    ----------
    base_dir : Path, optional
        Where relative paths in the config (the rule set) are resolved.

    Raises
    ------
    ConfigError
        Naming the first field that is missing or invalid.
    """
    if not isinstance(data, Mapping):
        raise ConfigError("<root>", "configuration must be a mapping")
    check_keys(data)
    src = _section(data, "source")
    host = _str(src, "source", "host")
    if any(c.isspace() for c in host):
        raise ConfigError("source.host", f"{host!r} is not a host name")
    method = _str(src, "source", "retrieve_method", "C-GET").upper()
    if method not in RETRIEVE_METHODS:
        raise ConfigError("source.retrieve_method", f"must be one of {RETRIEVE_METHODS}, got {method!r}")
    source = SourceConfig(
        host=host,
        port=_int(src, "source", "port", 0, 1, 65535) if "port" in src else _missing("source.port"),
        called_ae_title=_ae_title(src, "source", "called_ae_title"),
        calling_ae_title=_ae_title(src, "source", "calling_ae_title"),
        max_associations=_int(src, "source", "max_associations", 2, 1, 64),
        retrieve_method=method,
        retrieve_attempts=_int(src, "source", "retrieve_attempts", 3, 1, 20),
        acse_timeout=_float(src, "source", "acse_timeout", 30.0, 0.1, 3600),
        dimse_timeout=_float(src, "source", "dimse_timeout", 120.0, 0.1, 3600),
        network_timeout=_float(src, "source", "network_timeout", 120.0, 0.1, 3600),
        max_pdu=_int(src, "source", "max_pdu", 131072, 4096, 2**31 - 1),
        find_limit=_int(src, "source", "find_limit", 0, 1, 10**7) if src.get("find_limit") else None,
        find_limit_instances=(
            _int(src, "source", "find_limit_instances", 0, 1, 10**7) if src.get("find_limit_instances") else None
        ),
        census_split_depth=_int(src, "source", "census_split_depth", 12, 0, 17),
        move_ae_title=_ae_title(src, "source", "move_ae_title") if src.get("move_ae_title") else None,
        move_listen_host=_str(src, "source", "move_listen_host", "0.0.0.0"),
        move_listen_port=_int(src, "source", "move_listen_port", 11113, 1, 65535),
        move_settle_timeout=_float(src, "source", "move_settle_timeout", 30.0, 0.0, 3600),
        request_uncompressed=_bool(src, "source", "request_uncompressed", False),
        association_attempts=_int(src, "source", "association_attempts", 3, 1, 20),
        tls=_tls(src.get("tls"), base_dir),
    )

    tgt = _section(data, "target")
    bucket = _str(tgt, "target", "bucket")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise ConfigError("target.bucket", f"{bucket!r} is not a valid S3 bucket name")
    prefix = tgt.get("prefix") or ""
    if not isinstance(prefix, str) or prefix.startswith("/") or ".." in prefix.split("/"):
        raise ConfigError("target.prefix", f"{prefix!r} must be a relative key prefix without '..'")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    sse = str(tgt.get("sse", "AES256"))
    if sse not in SSE_MODES:
        raise ConfigError("target.sse", f"must be one of {SSE_MODES}, got {sse!r}")
    kms_key_id = tgt.get("kms_key_id")
    if sse == "aws:kms" and not kms_key_id:
        raise ConfigError("target.kms_key_id", "is required when target.sse is aws:kms")
    target = TargetConfig(
        bucket=bucket,
        prefix=prefix,
        sse=sse,
        kms_key_id=str(kms_key_id) if kms_key_id else None,
        upload_threads=_int(tgt, "target", "upload_threads", 4, 1, 64),
    )

    rep = _section(data, "report")
    raw = _addresses(rep.get("recipients"), "report.recipients")
    if not raw:
        raise ConfigError("report.recipients", "at least one e-mail address is required")
    sender = _str(rep, "report", "from_address")
    if not _EMAIL.match(sender):
        raise ConfigError("report.from_address", f"{sender!r} is not an e-mail address")
    report = ReportConfig(
        recipients=tuple(raw),
        from_address=sender,
        smtp_connection_id=_str(rep, "report", "smtp_connection_id", "smtp_default"),
        subject_prefix=str(rep.get("subject_prefix", "[PACS migration]")),
        operators=tuple(_addresses(rep.get("operators"), "report.operators")),
    )
    val = data.get("validation") or {}
    if not isinstance(val, Mapping):
        raise ConfigError("validation", "must be a mapping")
    syntaxes = val.get("allowed_transfer_syntaxes", DEFAULT_ALLOWED_SYNTAXES)
    if not isinstance(syntaxes, (list, tuple)) or not syntaxes:
        raise ConfigError("validation.allowed_transfer_syntaxes", "must be a non-empty list of UIDs")
    for uid in syntaxes:
        if not isinstance(uid, str) or not re.fullmatch(r"[0-9.]{3,64}", uid):
            raise ConfigError("validation.allowed_transfer_syntaxes", f"{uid!r} is not a transfer syntax UID")
    validation = ValidationConfig(
        max_quarantined_fraction=_float(val, "validation", "max_quarantined_fraction", 0.10, 0.0, 1.0),
        max_unresolved_fraction=_float(val, "validation", "max_unresolved_fraction", 0.0, 0.0, 1.0),
        allowed_transfer_syntaxes=tuple(syntaxes),
    )
    norm = data.get("normalization") or {}
    if not isinstance(norm, Mapping):
        raise ConfigError("normalization", "must be a mapping")
    ruleset = STRUCTURAL
    if norm.get("ruleset"):
        path = Path(str(norm["ruleset"]))
        if not path.is_absolute():
            path = (base_dir or Path(".")) / path
        try:
            ruleset = load_ruleset(path)
        except RuleSetError as exc:
            raise ConfigError("normalization.ruleset", str(exc)) from None
    normalize_processes = _int(norm, "normalization", "processes", 1, 0, 64)
    normalize_processes_from = _int(norm, "normalization", "processes_from_instances", 200, 1, 10**9)
    staging = data.get("staging_dir", "/tmp/pacs-migration-staging")
    if not isinstance(staging, str) or not staging:
        raise ConfigError("staging_dir", "must be a directory path")
    plan = _plan(data.get("plan"))
    asm = data.get("assessment") or {}
    if not isinstance(asm, Mapping):
        raise ConfigError("assessment", "must be a mapping")
    assessment = AssessmentConfig(
        throughput_mb_s=_float(asm, "assessment", "throughput_mb_s", 20.0, 0.001, 1e6),
        throughput_instances_s=_float(asm, "assessment", "throughput_instances_s", 40.0, 0.001, 1e6),
        window_hours=plan.window.hours,
        sample_series=_int(asm, "assessment", "sample_series", 2, 0, 1000),
        undated_sweep=_bool(asm, "assessment", "undated_sweep", True),
    )
    return MigrationConfig(
        source=source,
        target=target,
        report=report,
        validation=validation,
        ruleset=ruleset,
        normalize_processes=normalize_processes,
        normalize_processes_from=normalize_processes_from,
        staging_dir=Path(staging),
        assessment=assessment,
        plan=plan,
    )


def _addresses(raw: Any, path: str) -> list[str]:
    """E-mail addresses from a list or a comma/semicolon/space separated string."""
    if raw is None:
        return []
    if isinstance(raw, str):
        raw = [r for r in re.split(r"[,;\s]+", raw) if r]
    if not isinstance(raw, (list, tuple)):
        raise ConfigError(path, "must be a list of e-mail addresses")
    for addr in raw:
        if not isinstance(addr, str) or not _EMAIL.match(addr):
            raise ConfigError(path, f"{addr!r} is not an e-mail address")
    return list(raw)


def _date(value: Any, path: str) -> dt.date:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value))
    except ValueError:
        raise ConfigError(path, f"must be a date YYYY-MM-DD, got {value!r}") from None


def _time(value: Any, path: str) -> dt.time:
    text = str(value)
    if isinstance(value, int):  # YAML 1.1 reads 20:00 as sexagesimal 1200
        text = f"{value // 60:02d}:{value % 60:02d}"
    try:
        return dt.time.fromisoformat(text)
    except ValueError:
        raise ConfigError(path, f"must be a time HH:MM, got {value!r}") from None


def _plan(value: Any) -> PlanConfig:
    if value is None:
        return DEFAULT_PLAN
    if not isinstance(value, Mapping):
        raise ConfigError("plan", "must be a mapping")
    win = value.get("window") or {}
    if not isinstance(win, Mapping):
        raise ConfigError("plan.window", "must be a mapping with start and end (HH:MM)")
    tz = str(value.get("timezone", "UTC"))
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError("plan.timezone", f"{tz!r} is not an IANA time zone") from None
    window = Window(
        _time(win.get("start", "20:00"), "plan.window.start"), _time(win.get("end", "06:00"), "plan.window.end"), tz
    )
    if window.start == window.end:
        raise ConfigError("plan.window.end", "must differ from plan.window.start")
    raw_phases = value.get("phases")
    if not raw_phases or not isinstance(raw_phases, list):
        raise ConfigError("plan.phases", "at least one phase is required")
    phases = []
    for n, ph in enumerate(raw_phases):
        path = f"plan.phases[{n}]"
        if not isinstance(ph, Mapping):
            raise ConfigError(path, "must be a mapping")
        name = _str(ph, path, "name")
        last = _int(ph, path, "last_months", 0, 1, 1200) if ph.get("last_months") is not None else None
        start = _date(ph["from"], f"{path}.from") if ph.get("from") is not None else None
        end = _date(ph["to"], f"{path}.to") if ph.get("to") is not None else None
        if (start is None) == (last is None):
            raise ConfigError(f"{path}.from", "give either from (a date) or last_months")
        if start and end and end < start:
            raise ConfigError(f"{path}.to", f"{end} is before {start}")
        mods = ph.get("modalities", "all")
        if mods == "all" or mods is None:
            modalities = None
        elif (
            isinstance(mods, list)
            and mods
            and all(isinstance(m, str) and re.fullmatch(r"[A-Z0-9_]{1,16}", m) for m in mods)
        ):
            modalities = tuple(mods)
        else:
            raise ConfigError(f"{path}.modalities", f"must be 'all' or a list of modality codes, got {mods!r}")
        order = str(ph.get("order", "newest_first"))
        if order not in ("newest_first", "oldest_first"):
            raise ConfigError(f"{path}.order", f"must be newest_first or oldest_first, got {order!r}")
        phases.append(Phase(name, start, end, last, modalities, order == "newest_first"))
    budget = value.get("budget") or {}
    if not isinstance(budget, Mapping):
        raise ConfigError("plan.budget", "must be a mapping")

    def limit(key: str) -> int | None:
        return _int(budget, "plan.budget", key, 0, 1, 10**15) if budget.get(key) is not None else None

    delta = value.get("delta") or {}
    if not isinstance(delta, Mapping):
        raise ConfigError("plan.delta", "must be a mapping")
    return PlanConfig(
        phases=tuple(phases),
        window=window,
        max_partitions=limit("max_partitions"),
        max_instances=limit("max_instances"),
        max_bytes=limit("max_bytes"),
        max_attempts=_int(value, "plan", "max_attempts", 3, 1, 100),
        delta_recent_days=_int(delta, "plan.delta", "recent_days", 30, 0, 36500),
        delta_sweep_per_night=_int(delta, "plan.delta", "sweep_per_night", 7, 0, 100000),
    )


def _bool(sec: Mapping[str, Any], path: str, key: str, default: bool) -> bool:
    value = sec.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{path}.{key}", f"must be true or false, got {value!r}")
    return value


def _tls(value: Any, base_dir: Path | None) -> TlsConfig | None:
    """source.tls: files must exist now, so a typo fails at parse, not mid-night."""
    if value in (None, False):
        return None
    if not isinstance(value, Mapping):
        raise ConfigError("source.tls", "must be a mapping (ca_file, cert_file, key_file)")

    def file(key: str, required: bool) -> Path | None:
        raw = value.get(key)
        if not raw:
            if required:
                raise ConfigError(f"source.tls.{key}", "is required")
            return None
        path = Path(str(raw))
        if not path.is_absolute():
            path = (base_dir or Path(".")) / path
        if not path.is_file():
            raise ConfigError(f"source.tls.{key}", f"{path} is not a readable file")
        return path

    cert, key = file("cert_file", False), file("key_file", False)
    if (cert is None) != (key is None):
        raise ConfigError(
            "source.tls.key_file" if key is None else "source.tls.cert_file", "cert_file and key_file go together"
        )
    name = value.get("server_name")
    return TlsConfig(
        ca_file=file("ca_file", True),  # type: ignore[arg-type]
        cert_file=cert,
        key_file=key,
        server_name=str(name) if name else None,
        check_hostname=_bool(value, "source.tls", "check_hostname", True),
    )


def _missing(name: str) -> int:
    raise ConfigError(name, "is required")


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
