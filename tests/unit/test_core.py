"""Unit tests of the core: config, partition keys, UIDs, normalize."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from include.pacs_migration.config import ConfigError, load_config
from include.pacs_migration.manifest import instance_key
from include.pacs_migration.normalize import normalize
from include.pacs_migration.partition import Partition
from include.pacs_migration.rules import STRUCTURAL
from include.pacs_migration.uids import InstanceUIDs, is_valid_uid

GOOD = {
    "source": {"host": "127.0.0.1", "port": 11112, "called_ae_title": "PACS", "calling_ae_title": "MIG"},
    "target": {"bucket": "pacs-archive"},
    "report": {"recipients": ["compliance@example.org"], "from_address": "mig@example.org"},
}


def test_core_does_not_import_airflow():
    code = (
        "import sys, importlib, pkgutil, include.pacs_migration as p\n"
        "for m in pkgutil.iter_modules(p.__path__): importlib.import_module(f'include.pacs_migration.{m.name}')\n"
        "assert not [m for m in sys.modules if m == 'airflow' or m.startswith('airflow.')], 'airflow imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_config_valid():
    cfg = load_config(GOOD)
    assert cfg.source.port == 11112 and cfg.target.sse == "AES256"
    assert cfg.report.recipients == ("compliance@example.org",)


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("source", "port"), "eleven", "source.port"),
        (("source", "port"), 70000, "source.port"),
        (("source", "called_ae_title"), "A" * 17, "source.called_ae_title"),
        (("source", "host"), "", "source.host"),
        (("source", "retrieve_method"), "C-STEAL", "source.retrieve_method"),
        (("target", "bucket"), "Bad_Bucket", "target.bucket"),
        (("target", "prefix"), "../escape", "target.prefix"),
        (("target", "sse"), "rot13", "target.sse"),
        (("report", "recipients"), ["not-an-address"], "report.recipients"),
        (("report", "recipients"), [], "report.recipients"),
        (("normalization", "processes"), -1, "normalization.processes"),
        (("normalization", "processes"), "two", "normalization.processes"),
    ],
)
def test_config_error_names_the_field(path, value, field):
    data = {k: dict(v) for k, v in GOOD.items()}
    data.setdefault(path[0], {})[path[1]] = value
    with pytest.raises(ConfigError) as err:
        load_config(data)
    assert err.value.field == field
    assert str(err.value).startswith(field)


def test_config_missing_section():
    with pytest.raises(ConfigError, match="^target"):
        load_config({"source": GOOD["source"], "report": GOOD["report"]})


def test_yaml_example_loads_with_connection_values():
    from pathlib import Path

    from include.pacs_migration.config import deep_merge, read_yaml

    path = Path("include/config/migration.yaml")
    cfg = load_config(deep_merge(read_yaml(path), {"source": {"host": "pacs.local", "port": 104}}), path.parent)
    assert cfg.source.called_ae_title == "LEGACYPACS"
    assert cfg.ruleset.label == "site-default@1"
    assert cfg.normalize_processes == 1


def test_partition_keys():
    p = Partition(dt.date(2019, 3, 1), "CT")
    assert p.key == "2019-03-01/CT"
    assert p.hive_path == "date=2019-03-01/modality=CT"
    assert Partition.parse(p.key) == p
    with pytest.raises(ValueError):
        Partition(dt.date(2019, 3, 1), "../CT")


@pytest.mark.parametrize("uid", ["1.2.840.10008.1.2", "2.25.1234567890", "1.0.3"])
def test_valid_uids(uid):
    assert is_valid_uid(uid)


@pytest.mark.parametrize("uid", ["", "../1.2", "1.02.3", "1", "1.2." + "3" * 70, "1.2.abc", "1..2", None])
def test_invalid_uids_never_reach_a_key(uid):
    assert not is_valid_uid(uid)
    with pytest.raises(ValueError):
        instance_key("", "1.2.3", "1.2.4", uid)  # type: ignore[arg-type]


def _raw(name: str) -> bytes:
    with open(get_testdata_file(name), "rb") as fh:
        return fh.read()


def test_conformant_file_passes_through_byte_for_byte():
    raw = _raw("CT_small.dcm")
    r = normalize(raw)
    assert r.reason is None and r.data == raw and r.changes == []
    assert r.pixel_sha256_before == r.pixel_sha256_after


@pytest.mark.parametrize("name", ["MR_small_bigendian.dcm", "MR_small_implicit.dcm", "image_dfl.dcm"])
def test_encodings_become_explicit_vr_little_endian_with_pixels_unchanged(name):
    r = normalize(_raw(name))
    assert r.reason is None
    out = pydicom.dcmread(io.BytesIO(r.data))
    assert out.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert any(c.startswith("transfer_syntax:") for c in r.changes)
    # Pixel values identical to the little-endian reference file.
    ref = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    if name.startswith("MR_small"):
        assert out.PixelData == ref.PixelData
    assert r.pixel_sha256_before == r.pixel_sha256_after == hashlib.sha256(out.PixelData).hexdigest()


def test_file_meta_is_created_when_missing():
    raw = _raw("ExplVR_LitEndNoMeta.dcm") if get_testdata_file("ExplVR_LitEndNoMeta.dcm") else None
    assert raw is not None
    r = normalize(raw)
    assert r.reason is None and "file_meta:created" in r.changes
    out = pydicom.dcmread(io.BytesIO(r.data))
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.97])
def test_truncated_files_are_quarantined(cut):
    raw = _raw("CT_small.dcm")
    r = normalize(raw[: int(len(raw) * cut)])
    assert r.reason in ("TRUNCATED", "PIXEL_LENGTH_MISMATCH")


def test_truncated_reference_file_and_not_dicom():
    assert normalize(_raw("MR_truncated.dcm")).reason == "TRUNCATED"
    assert normalize(b"hello, this is not DICOM at all" * 10).reason == "NOT_DICOM"


@pytest.mark.parametrize("keyword", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"])
def test_missing_and_malformed_uids(keyword):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    delattr(ds, keyword)
    buf = io.BytesIO()
    ds.save_as(buf)
    assert normalize(buf.getvalue()).reason == f"MISSING_UID:{keyword}"
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    setattr(ds, keyword, "../1.2")
    buf = io.BytesIO()
    ds.save_as(buf)
    assert normalize(buf.getvalue()).reason == f"BAD_UID_SYNTAX:{keyword}"


def test_uid_conflict_with_census():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    r = normalize(_raw("CT_small.dcm"), InstanceUIDs(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), "1.2.3.4"))
    assert r.reason == "UID_CONFLICT"


def test_census_warnings_reach_the_partitions_they_threaten():
    from include.pacs_migration.census import Census, CensusSeries, CensusWarning, ExpectedInstance

    d = dt.date(2019, 3, 1)
    ct = CensusSeries("1.2.1", "1.2.1.1", "CT", d, 1, (ExpectedInstance("1.2.1.1.1", "1.2.840.10008.5.1.4.1.1.2"),))
    mr = CensusSeries("1.2.2", "1.2.2.1", "MR", d, 1, (ExpectedInstance("1.2.2.1.1", "1.2.840.10008.5.1.4.1.1.4"),))
    census = Census(
        d,
        (ct, mr),
        (
            CensusWarning("QUERY_TRUNCATED", "", None, "date-wide"),
            CensusWarning("SERIES_LEVEL_TRUNCATED", "1.2.9", None, "a study with no series found: modality unknown"),
            CensusWarning("IMAGE_LEVEL_TRUNCATED", "1.2.2", "1.2.2.1", "the MR series"),
            CensusWarning("COUNT_MISMATCH", "1.2.1", None, "the CT study"),
        ),
    )
    codes = {p.modality: sorted(w.code for w in census.warnings_for(p)) for p in census.partitions()}
    assert codes == {
        "CT": ["COUNT_MISMATCH", "QUERY_TRUNCATED", "SERIES_LEVEL_TRUNCATED"],
        "MR": ["IMAGE_LEVEL_TRUNCATED", "QUERY_TRUNCATED", "SERIES_LEVEL_TRUNCATED"],
    }


def test_normalize_process_matches_in_process_and_fails_fast_when_dead(tmp_path):
    """A normalize process returns what normalize returns in-process; once it
    dies, every request fails at once with a clear error (none waits)."""
    from include.pacs_migration.normalize_processes import NormalizeProcesses

    raw = _raw("CT_small.dcm")
    ds = pydicom.dcmread(io.BytesIO(raw))
    uids = InstanceUIDs(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    path = tmp_path / "00000001.dcm"
    path.write_bytes(raw)
    here = normalize(raw, uids)
    with NormalizeProcesses(1, STRUCTURAL, None) as processes:
        there, rewritten, seconds = processes.normalize(path, uids)
        assert (there.reason, there.changes, there.pixel_sha256_after) == (
            here.reason,
            here.changes,
            here.pixel_sha256_after,
        )
        assert rewritten == (here.data != raw) and seconds > 0 and there.data is None
        if rewritten:
            assert (tmp_path / "00000001.dcm.out").read_bytes() == here.data or here.changes
        processes._procs[0].kill()
        processes._procs[0].wait(timeout=10)
        for _ in range(2):
            with pytest.raises(RuntimeError, match="normalize process .* ended"):
                processes.normalize(path, uids)


def test_an_instance_past_the_normalize_time_limit_is_quarantined_and_its_process_replaced(tmp_path):
    """Issue 15.5: one instance's normalize is bounded in time: past the limit
    its process is killed, a fresh one takes its place, and the instance is
    quarantined NORMALIZE_TIME_LIMIT; the next instance normalizes as usual."""
    from include.pacs_migration.normalize_processes import NormalizeProcesses

    raw = _raw("CT_small.dcm")
    ds = pydicom.dcmread(io.BytesIO(raw))
    uids = InstanceUIDs(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    path = tmp_path / "00000001.dcm"
    path.write_bytes(raw)
    with NormalizeProcesses(1, STRUCTURAL, None, time_limit_s=1e-4) as processes:  # no instance is that fast
        stuck = processes._procs[0]
        result, rewritten, _ = processes.normalize(path, uids)
        assert (result.reason, rewritten) == ("NORMALIZE_TIME_LIMIT", False)
        assert stuck.poll() is not None and processes.count == 1 and processes._procs[0] is not stuck
        processes.time_limit_s = 30
        result, _, _ = processes.normalize(path, uids)
        assert result.reason is None


def test_no_value_reaches_a_log_or_warning_after_configure_logging(caplog, recwarn):
    """pydicom's default WARN validation logs the offending value (here a
    birth date and a name); configure_logging() silences it (values are
    validated by our rules instead)."""
    import io
    import logging
    import warnings

    import pydicom
    from pydicom import config as pydicom_config
    from pydicom.data import get_testdata_file

    from include.pacs_migration.logs import configure_logging
    from include.pacs_migration.normalize import normalize
    from include.pacs_migration.rules import load_ruleset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the test's own writing of bad values
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.PatientBirthDate = "1950.07.14"  # invalid DA
        ds.PatientName = "CANARY^" + "X" * 70  # over-long PN
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
    recwarn.clear()
    caplog.clear()
    before = pydicom_config.settings.reading_validation_mode
    filters = warnings.filters[:]
    try:
        caplog.set_level(logging.DEBUG)
        configure_logging()
        ruleset = load_ruleset(Path(__file__).resolve().parents[2] / "include/config/rules/site-default.yaml")
        normalize(buf.getvalue(), ruleset=ruleset)
    finally:
        pydicom_config.settings.reading_validation_mode = before
        warnings.filters[:] = filters
    text = "\n".join(r.getMessage() for r in caplog.records) + "\n".join(str(w.message) for w in recwarn)
    assert "1950.07.14" not in text and "CANARY" not in text
