"""Verify a partition: Great Expectations (GX Core 1.x) over its manifests,
after re-reading every migrated object from the bucket.

The suites check what compliance must be able to prove:

- ``expected`` (one row per instance of the census): each has exactly one end
  state; quarantined and unresolved shares within the configured thresholds;
- ``series`` (one row per census series): expected == migrated + quarantined
  + unresolved;
- ``transfer`` (one row per received or expected instance): SOP Instance UIDs
  present and unique;
- ``migrated``: StudyDate and Modality equal the partition's, SOP Instance UIDs
  well formed, transfer syntax allowed, every object re-read with the SHA-256
  the manifest recorded, keys unique;
- ``studies``: one patient (PatientID + Issuer, compared as a hash) per study among live objects;
- ``bucket``: the objects listed under the partition's series prefixes equal
  the migrated count;
- ``census``: no warning that the census itself may be incomplete (a C-FIND
  the PACS truncated beyond splitting, counts that disagree).

A file-backed GX context is used so Data Docs are produced; they and GX's own
validation results are published under the partition's ``_manifests/`` prefix.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import io
import json
import logging
import re
import tempfile
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pydicom

from . import study_index
from .census import BLOCKING_WARNINGS, CensusSeries
from .config import ValidationConfig
from .manifest import PartitionManifests
from .partition import Partition
from .reasons import InstanceState, ReasonCode
from .store import ObjectStore

log = logging.getLogger(__name__)


def gx() -> Any:
    """Great Expectations, imported on first use (~3 s, unless preloaded: see
    ``airflow_local_settings.py``). Its INFO chatter (hundreds of lines at import
    and per run, about its own decorators and config files) stays out of task logs."""
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations
    from great_expectations.expectations.expectation import Expectation

    _memoize_configurations(Expectation)
    return great_expectations


_SUITE_RUN = threading.local()  # this thread's suite run under way: its expectations' configurations


def _memoize_configurations(expectation: type) -> None:
    """GX 1.x builds ``Expectation.configuration`` anew (a pydantic dump) on every read:
    ~370 reads a suite run here, a quarter of the suites' CPU. Inside one of our suite
    runs (:func:`_configurations_memoized`) the expectations GX validates are objects
    it made for that run and does not change, so each one's is built once; anywhere
    else (adding a suite, rendering Data Docs, another thread) GX's property is used."""
    built = expectation.configuration.fget  # type: ignore[attr-defined]
    if getattr(built, "memoized", False):
        return

    def configuration(self: Any) -> Any:
        memo = getattr(_SUITE_RUN, "memo", None)
        if memo is None:
            return built(self)
        hit = memo.get(id(self))
        if hit is None:
            hit = memo[id(self)] = (self, built(self))  # the object held: its id is not reused
        return hit[1]

    configuration.memoized = True  # type: ignore[attr-defined]
    expectation.configuration = property(configuration, doc=built.__doc__)  # type: ignore[attr-defined]


@contextlib.contextmanager
def _configurations_memoized() -> Iterator[None]:
    _SUITE_RUN.memo = {}
    try:
        yield
    finally:
        _SUITE_RUN.memo = None


UID_REGEX = r"^(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))+$"  # no capturing group: pandas warns of one in every task
# Data Docs assets that only decorate (fonts, logos) are not published.
_DOCS_SKIP = ("static/fonts/", "static/images/")
_CONTENT_TYPES = {".html": "text/html", ".css": "text/css", ".json": "application/json", ".js": "text/javascript"}


@dataclass(frozen=True)
class ExpectationOutcome:
    batch: str
    expectation: str
    column: str | None
    success: bool
    observed: Any
    unexpected_count: int | None

    @property
    def label(self) -> str:
        """``batch:expectation(column)``, as the report names it."""
        return f"{self.batch}:{self.expectation}({self.column or ''})"

    def to_json(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "expectation": self.expectation,
            "column": self.column,
            "success": self.success,
            "observed": self.observed,
            "unexpected_count": self.unexpected_count,
        }


@dataclass(frozen=True)
class ValidationReport:
    partition: Partition
    success: bool
    outcomes: tuple[ExpectationOutcome, ...]
    reread_objects: int
    reread_failures: int
    artifacts: tuple[str, ...] = ()  # object keys of published GX results and Data Docs
    quarantine_rereads: int = 0  # quarantined objects re-read (proven like migrated ones)
    quarantine_failures: int = 0

    @property
    def failed(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success]

    def to_json(self) -> dict[str, Any]:
        return {
            "partition": self.partition.key,
            "success": self.success,
            "reread_objects": self.reread_objects,
            "reread_failures": self.reread_failures,
            "quarantine_rereads": self.quarantine_rereads,
            "quarantine_failures": self.quarantine_failures,
            "failed_expectations": [o.label for o in self.failed],
            "expectations": [o.to_json() for o in self.outcomes],
            "artifacts": list(self.artifacts),
        }


HEADER_BYTES = 4 << 20  # what a re-read keeps of an object to parse its header (never its pixels)


def reread_header(store: ObjectStore, key: str, sha256_hex: str) -> tuple[pydicom.Dataset, int] | None:
    """Fetch one object; its header (up to the pixel data) and size if its
    SHA-256 matches and it parses as DICOM, else None. Streamed: the hash is
    taken chunk by chunk and only the chunks holding the first :data:`HEADER_BYTES`
    are kept, so memory stays flat whatever the object's size. The header is scanned
    for the study index's elements (:func:`study_index.scan_header`), or, where the scan
    cannot follow it, parsed by pydicom (values over 64 KiB skipped, not read)."""
    digest, size = hashlib.sha256(), 0
    kept: list[bytes] = []
    try:
        for chunk in store.iter_chunks(key):
            digest.update(chunk)
            if size < HEADER_BYTES:
                kept.append(chunk)  # the chunks themselves, not copies: most objects are one chunk
            size += len(chunk)
    except Exception:
        return None
    if digest.hexdigest() != sha256_hex:
        return None
    head = kept[0] if len(kept) == 1 else b"".join(kept)
    scanned = study_index.scan_header(head)
    if scanned is not None:
        return scanned, size
    try:
        return pydicom.dcmread(io.BytesIO(head), stop_before_pixels=True, defer_size=1 << 16), size
    except Exception:
        return None


def reread(store: ObjectStore, key: str, sha256_hex: str) -> bool:
    """One object re-read: its SHA-256 matches and it parses as DICOM."""
    return reread_header(store, key, sha256_hex) is not None


def _reread_migrated(
    store: ObjectStore, partition: Partition, migrated: pd.DataFrame
) -> tuple[list[bool], dict[tuple[str, str], dict[str, Any]]]:
    """Re-read every migrated object: which verified, and their study-index rows
    from the same bytes (the index then reads no header again)."""
    rows = migrated.to_dict("records")

    def one(row: dict[str, Any]) -> tuple[bool, dict[str, Any] | None]:
        got = reread_header(store, row["object_key"], row["object_sha256"])
        if got is None:
            return False, None
        try:
            return True, study_index.header_row(*got, row, partition)
        except Exception:  # noqa: BLE001 - verified all the same; the index reads this header itself
            return True, None

    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="reread") as pool:
        found = list(pool.map(one, rows))
    index = {(r["object_key"], r["object_sha256"]): f for r, (_, f) in zip(rows, found, strict=True) if f is not None}
    return [ok for ok, _ in found], index


def _expected_frame(series: list[CensusSeries], transfer: pd.DataFrame) -> pd.DataFrame:
    """One row per instance of E: every (series, SOP) the census named, every
    member a capped series' retrieval named, every placeholder of a census gap."""
    named = pd.DataFrame(
        [
            {"series_instance_uid": s.series_instance_uid, "sop_instance_uid": i.sop_instance_uid}
            for s in series
            for i in s.instances
        ],
        columns=["series_instance_uid", "sop_instance_uid"],
    )
    rows = transfer[transfer["in_census"]][["series_instance_uid", "sop_instance_uid", "state"]]
    with_uid = rows[rows["sop_instance_uid"].notna()].drop_duplicates(["series_instance_uid", "sop_instance_uid"])
    expected = named.merge(with_uid, on=["series_instance_uid", "sop_instance_uid"], how="outer")
    return pd.concat([expected, rows[rows["sop_instance_uid"].isna()]], ignore_index=True)


def _series_frame(series: list[CensusSeries], transfer: pd.DataFrame) -> pd.DataFrame:
    rows = []
    in_census = transfer[transfer["in_census"]]
    for s in series:
        mine = in_census[
            (in_census["study_instance_uid"] == s.study_instance_uid)
            & (in_census["series_instance_uid"].fillna("") == s.series_instance_uid)
        ]
        counts = mine["state"].value_counts()
        named = len({i.sop_instance_uid for i in s.instances})
        # A series with a census gap is proven against the PACS's own count.
        expected = s.reported_instances if s.census_gap and s.reported_instances is not None else max(named, len(mine))
        row: dict[str, Any] = {
            "series_instance_uid": s.series_instance_uid,
            "expected": expected,
            **{st.value: int(counts.get(st.value, 0)) for st in InstanceState},
        }
        row["accounted"] = row["migrated"] + row["quarantined"] + row["unresolved"]
        rows.append(row)
    return pd.DataFrame(
        rows, columns=["series_instance_uid", "expected", "migrated", "quarantined", "unresolved", "accounted"]
    )


def reread_quarantine(store: ObjectStore, key: str, sha256_hex: str) -> bool:
    """A quarantined object exists and its bytes hash to its key and the manifest (streamed)."""
    found = store.sha256_of(key)
    return found is not None and key.endswith(f"/{sha256_hex}.dcm") and found[0] == sha256_hex


def _frames(
    store: ObjectStore, partition: Partition, series: list[CensusSeries], transfer: pd.DataFrame
) -> tuple[dict[str, pd.DataFrame], dict[tuple[str, str], dict[str, Any]]]:
    """The suites' frames, and the study-index rows of the objects that verified."""
    manifests = PartitionManifests(store, partition)
    gap = transfer["sop_instance_uid"].isna() & (transfer["state"] == InstanceState.UNRESOLVED.value)
    migrated = transfer[transfer["state"] == InstanceState.MIGRATED.value].copy()
    migrated["checksum_verified"], index_rows = _reread_migrated(store, partition, migrated)
    # Every object kept in quarantine, including the new version of an instance changed at the source.
    quarantined = transfer[transfer["quarantine_key"].notna()].copy()
    qpairs = list(zip(quarantined["quarantine_key"], quarantined["received_sha256"], strict=True))
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="reread") as pool:
        quarantined["checksum_verified"] = list(pool.map(lambda p: reread_quarantine(store, p[0], p[1]), qpairs))

    # Live objects name one patient per study; a study flagged INCONSISTENT_PATIENT
    # was migrated by policy and is named in the report instead.
    flagged = transfer["findings"].fillna("").str.contains(ReasonCode.INCONSISTENT_PATIENT.value, regex=False)
    received = migrated[migrated["patient_key"].notna() & ~flagged.loc[migrated.index]]
    studies = (
        received.groupby("study_instance_uid")["patient_key"].nunique().rename("patients").reset_index()
        if len(received)
        else pd.DataFrame({"study_instance_uid": pd.Series(dtype=str), "patients": pd.Series(dtype=int)})
    )

    # The census's series, and those of every migrated row (a series gone from the source keeps its objects).
    prefixes = {
        manifests.series_prefix(s.study_instance_uid, s.series_instance_uid) for s in series if s.series_instance_uid
    } | {manifests.series_prefix(r.study_instance_uid, r.series_instance_uid) for r in migrated.itertuples()}
    keys = [k for p in sorted(prefixes) for k in store.list_keys(p)]
    # An object no migrated row names is an orphan, unless another source archive stored it (a series
    # both archives hold in part, or whose copies conflict): that archive's partition accounts for it.
    named = set(migrated["object_key"])
    foreign = sum(1 for k in keys if k not in named and _stored_by_another_source(store, k, manifests.partition))
    listed = len(keys) - foreign
    in_quarantine = set(store.list_keys(manifests.quarantine_prefix))
    recorded = set(quarantined["quarantine_key"].dropna())
    bucket = pd.DataFrame(
        [
            {
                "listed_objects": listed,
                "migrated": len(migrated),
                "quarantine_listed": len(in_quarantine),
                "quarantine_recorded": len(recorded),
                "quarantine_unaccounted": len(in_quarantine ^ recorded),
            }
        ]
    )
    frames = {
        "expected": _expected_frame(series, transfer),
        "series": _series_frame(series, transfer),
        "transfer": transfer.assign(uid_or_gap=transfer["sop_instance_uid"].where(~gap, transfer["reason"])),
        "migrated": migrated,
        "quarantined": quarantined,
        "studies": studies,
        "bucket": bucket,
    }
    return frames, index_rows


def _stored_by_another_source(store: ObjectStore, key: str, partition: Partition) -> bool:
    head = store.head(key)
    return head is not None and (head.metadata or {}).get("source", "") != partition.source


def _suites(partition: Partition, n_expected: int, settings: ValidationConfig) -> dict[str, list[Any]]:
    E = gx().expectations
    return {
        "expected": [
            E.ExpectTableRowCountToEqual(value=n_expected),
            E.ExpectColumnValuesToNotBeNull(column="state"),  # conservation: one end state each
            E.ExpectColumnValuesToBeInSet(column="state", value_set=[s.value for s in InstanceState]),
            E.ExpectCompoundColumnsToBeUnique(
                column_list=["series_instance_uid", "sop_instance_uid"], ignore_row_if="any_value_is_missing"
            ),
            E.ExpectColumnValuesToNotBeInSet(
                column="state", value_set=[InstanceState.UNRESOLVED.value], mostly=1 - settings.max_unresolved_fraction
            ),
            E.ExpectColumnValuesToNotBeInSet(
                column="state",
                value_set=[InstanceState.QUARANTINED.value],
                mostly=1 - settings.max_quarantined_fraction,
            ),
        ],
        "series": [E.ExpectColumnPairValuesToBeEqual(column_A="expected", column_B="accounted")],
        "transfer": [
            E.ExpectTableRowCountToBeBetween(min_value=n_expected),
            # A SOP Instance UID on every row but what a census gap could not name (unresolved).
            E.ExpectColumnValuesToNotBeNull(column="uid_or_gap"),
            E.ExpectCompoundColumnsToBeUnique(
                column_list=["series_instance_uid", "sop_instance_uid", "received_sha256"],
                ignore_row_if="any_value_is_missing",
            ),
        ],
        "quarantined": [
            E.ExpectColumnValuesToNotBeNull(column="reason"),
            E.ExpectColumnValuesToBeInSet(column="checksum_verified", value_set=[True]),
        ],
        "migrated": [
            E.ExpectColumnValuesToBeInSet(column="study_date", value_set=[partition.dicom_date]),
            E.ExpectColumnValuesToBeInSet(column="modality", value_set=[partition.modality]),
            E.ExpectColumnValueLengthsToBeBetween(column="sop_instance_uid", min_value=1, max_value=64),
            E.ExpectColumnValuesToMatchRegex(column="sop_instance_uid", regex=UID_REGEX),
            E.ExpectColumnValuesToBeInSet(
                column="transfer_syntax_out", value_set=list(settings.allowed_transfer_syntaxes)
            ),
            E.ExpectColumnValuesToBeInSet(column="checksum_verified", value_set=[True]),
            E.ExpectColumnValuesToBeUnique(column="object_key"),
            E.ExpectColumnValuesToNotBeNull(column="object_sha256"),
            *(
                [E.ExpectColumnValuesToNotBeInSet(column="reason", value_set=[ReasonCode.SOURCE_DELETED.value])]
                if settings.source_deleted == "hold"
                else []
            ),
        ],
        "studies": [E.ExpectColumnValuesToBeBetween(column="patients", min_value=0, max_value=1)],
        "bucket": [
            E.ExpectColumnPairValuesToBeEqual(column_A="listed_objects", column_B="migrated"),
            E.ExpectColumnPairValuesToBeEqual(column_A="quarantine_listed", column_B="quarantine_recorded"),
            E.ExpectColumnValuesToBeBetween(column="quarantine_unaccounted", min_value=0, max_value=0),
        ],
        # E itself must be complete: a census the PACS truncated beyond repair proves nothing.
        "census": [E.ExpectTableRowCountToEqual(value=0)],
    }


DATA_DOCS_SITE = "local_site"  # the site GX scaffolds, rendered with our views (templates compiled once)


def docs_site() -> dict[str, Any]:
    """GX's default local site, its pages rendered by :mod:`gx_views`."""
    views = __name__.rsplit(".", 1)[0] + ".gx_views"
    page = {"view": {"module_name": views, "class_name": "PageView"}}
    return {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": True,
        "store_backend": {
            "class_name": "TupleFilesystemStoreBackend",
            "base_directory": f"uncommitted/data_docs/{DATA_DOCS_SITE}/",
        },
        "site_index_builder": {
            "class_name": "DefaultSiteIndexBuilder",
            "view": {"module_name": views, "class_name": "IndexPageView"},
        },
        "site_section_builders": {"expectations": page, "validations": page, "profiling": page},
    }


_UUID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")


@functools.cache
def _project_template() -> str:
    """The ``great_expectations.yml`` a partition's GX project starts from: our Data Docs
    site, no progress bars, a pandas data source (named ``partition`` here) with one asset
    for every frame (the frame comes with each run). GX rewrites the file on each of these
    changes (~50 ms a partition), so it is built once a process (:func:`_project_file`)."""
    ge = gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    with tempfile.TemporaryDirectory(prefix="gx-project-") as tmp:
        context = ge.get_context(mode="file", project_root_dir=tmp)
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        context.update_data_docs_site(DATA_DOCS_SITE, docs_site())
        source = context.data_sources.add_pandas("partition")
        source.add_dataframe_asset("frames").add_batch_definition_whole_dataframe("all")
        return (Path(tmp) / "gx" / "great_expectations.yml").read_text()


def _project_file(name: str) -> str:
    """The template with the data source named ``name`` (a JSON string is a YAML scalar)
    and ids of its own, as GX would have written it for this partition."""
    template = _project_template()
    if template.count("\n  partition:\n") != 1:  # a GX that writes its project file otherwise
        raise RuntimeError("GX's project file has no data source 'partition' to name: GX changed its format")
    text = template.replace("\n  partition:\n", f"\n  {json.dumps(name)}:\n")
    return _UUID.sub(lambda _: str(uuid.uuid4()), text)


def run_suites(
    root: Path, frames: dict[str, pd.DataFrame], suites: dict[str, list[Any]], name: str
) -> list[ExpectationOutcome]:
    ge = gx()
    project = root / "gx"
    project.mkdir(parents=True, exist_ok=True)
    # The project file alone: no config_variables.yml either, which GX would parse again on
    # every read of a context variable (~120 a partition).
    (project / "great_expectations.yml").write_text(_project_file(name))
    context = ge.get_context(mode="file", project_root_dir=str(root))
    batch_def = context.data_sources.get(name).get_asset("frames").get_batch_definition("all")
    outcomes: list[ExpectationOutcome] = []
    for batch_name, df in frames.items():
        suite = context.suites.add(ge.ExpectationSuite(name=f"{name}.{batch_name}", expectations=suites[batch_name]))
        definition = context.validation_definitions.add(
            ge.ValidationDefinition(name=f"{name}.{batch_name}", data=batch_def, suite=suite)
        )
        with _configurations_memoized():
            # BASIC: the counts, the observed value and up to 20 unexpected values, which the
            # verdict and Data Docs show; SUMMARY's value counts cost a metric per column check.
            result = definition.run(batch_parameters={"dataframe": df}, result_format="BASIC")
        for r in result.results:
            if r.expectation_config is None:
                continue  # GX always sets it on a result of a suite run
            res = r.result or {}
            observed = res.get("observed_value")
            outcomes.append(
                ExpectationOutcome(
                    batch=batch_name,
                    expectation=r.expectation_config.type,
                    column=r.expectation_config.kwargs.get("column")
                    or "|".join(r.expectation_config.kwargs.get("column_list") or ())
                    or "|".join(
                        str(r.expectation_config.kwargs[k])
                        for k in ("column_A", "column_B")
                        if k in r.expectation_config.kwargs
                    )
                    or None,
                    success=bool(r.success),
                    observed=observed if isinstance(observed, int | float | str | bool | type(None)) else str(observed),
                    unexpected_count=res.get("unexpected_count"),
                )
            )
    context.build_data_docs()
    return outcomes


def warm_up() -> None:
    """Validate an empty partition once, publishing nothing. Run in a process that forks
    tasks (``airflow_local_settings``), it leaves compiled there what every validate task
    would build again: GX's expectation and metric machinery on first use, Data Docs'
    templates (:mod:`gx_views`) and the GX project file (:func:`_project_template`)."""
    suites = _suites(Partition(dt.date(1970, 1, 1), "OT"), 0, ValidationConfig())
    columns = {c for s in suites.values() for e in s for c in _columns_of(e)}
    empty = pd.DataFrame({c: pd.Series(dtype=object) for c in sorted(columns)})
    with tempfile.TemporaryDirectory(prefix="gx-warm-") as tmp:
        run_suites(Path(tmp), dict.fromkeys(suites, empty), suites, "warm_up")


def _columns_of(expectation: Any) -> list[str]:
    kw = expectation.configuration.kwargs
    return [kw[k] for k in ("column", "column_A", "column_B") if k in kw] + list(kw.get("column_list") or ())


def _publish(store: ObjectStore, partition: Partition, root: Path) -> list[str]:
    """Upload GX's validation results and Data Docs beside the manifests."""
    base = PartitionManifests(store, partition).gx_prefix
    files: list[tuple[str, Path]] = []
    uncommitted = root / "gx" / "uncommitted"
    for folder, dest in (
        (uncommitted / "validations", "validations/"),
        (uncommitted / "data_docs" / DATA_DOCS_SITE, "data_docs/"),
    ):
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
            rel = path.relative_to(folder).as_posix()
            if not any(rel.startswith(s) for s in _DOCS_SKIP):
                files.append((base + dest + rel, path))

    def put(item: tuple[str, Path]) -> str:
        key, path = item
        store.put(key, path.read_bytes(), _CONTENT_TYPES.get(path.suffix, "application/octet-stream"))
        return key

    with ThreadPoolExecutor(8, thread_name_prefix="publish") as pool:  # ~40 small files a partition
        return list(pool.map(put, files))


def validate_partition(
    store: ObjectStore,
    partition: Partition,
    series: list[CensusSeries],
    transfer: pd.DataFrame,
    settings: ValidationConfig | None = None,
    docs_dir: Path | None = None,
    publish: bool = True,
    census_warnings: list[str] | None = None,
    index: bool = False,
) -> ValidationReport:
    """Run the partition's suites; re-read every migrated object first.

    Parameters
    ----------
    docs_dir : Path, optional
        Where the GX project (results and Data Docs) is built; a temporary
        folder when not given. Published to the bucket when ``publish``.
    index : bool
        Also write the partition's study index (DICOMweb, the locator) from the
        headers of the objects re-read, when every one of them verified.
    """
    settings = settings or ValidationConfig()
    frames, index_rows = _frames(store, partition, series, transfer)
    # From the headers just re-read: the study index reads none again. Not when an object
    # failed its re-read (missing, altered): the partition fails here, on its verdict, and
    # lineage's index update meets that object as it always did.
    if index and bool(frames["migrated"]["checksum_verified"].all()):
        study_index.index_partition(store, partition, transfer, headers=index_rows)
    frames["census"] = pd.DataFrame(
        {"warning": pd.Series([w for w in (census_warnings or []) if w in BLOCKING_WARNINGS], dtype=object)}
    )
    suites = _suites(partition, len(frames["expected"]), settings)
    name = f"{partition.study_date.isoformat()}.{partition.modality}"
    with tempfile.TemporaryDirectory(prefix="gx-") as tmp:
        root = docs_dir or Path(tmp)
        outcomes = run_suites(root, frames, suites, name)
        artifacts = _publish(store, partition, root) if publish else []
    verified = frames["migrated"]["checksum_verified"]
    quarantine = frames["quarantined"]["checksum_verified"]
    failures = int((~verified.astype(bool)).sum())
    report = ValidationReport(
        partition=partition,
        success=all(o.success for o in outcomes),
        outcomes=tuple(outcomes),
        reread_objects=len(verified),
        reread_failures=failures,
        artifacts=tuple(artifacts),
        quarantine_rereads=len(quarantine),
        quarantine_failures=int((~quarantine.astype(bool)).sum()),
    )
    log.info(
        "partition %s validation %s (%d objects re-read, %d failed)",
        partition.key,
        "passed" if report.success else "FAILED",
        len(verified),
        failures,
    )
    return report
