"""Corpus test: every DICOM instance among pydicom's bundled test files, plus
generated mutants, through normalize with the default rule set.

Each ends migrated or quarantined with the expected reason; nothing crashes;
no file takes more than 2 s. Migrated outputs: pydicom re-reads them with
strict validation; dciodvfy (dicom3tools) reports no message (error or
warning) for the output that it did not report for the input (sets compared
per file, so a new error cannot hide behind a fixed one); pixel data is
unchanged (hash).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import time
import warnings
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from pydicom import config as pydicom_config

from include.pacs_migration.normalize import normalize
from include.pacs_migration.reasons import ReasonCode
from include.pacs_migration.rules import STRUCTURAL, load_ruleset
from tests.corpus.corpus import Case, mutants, pydicom_files

RULESET = load_ruleset(Path(__file__).resolve().parents[2] / "include/config/rules/site-default.yaml")
CASES = pydicom_files() + mutants()
SUMMARY: Counter[str] = Counter()
DCIODVFY: Counter[str] = Counter()


def _reason_ok(reason: str | None) -> bool:
    if reason is None:
        return True
    code = reason.split(":", 1)[0]
    return code in {c.value for c in ReasonCode}


def _strict_reread(data: bytes) -> None:
    old = pydicom_config.settings.reading_validation_mode
    pydicom_config.settings.reading_validation_mode = pydicom_config.RAISE
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        for elem in ds.iterall():
            _ = elem.value
    finally:
        pydicom_config.settings.reading_validation_mode = old


def _plain_reencoding(data: bytes) -> bytes:
    """The input re-encoded by the structural rules alone (encoding and
    transfer syntax; no value changes)."""
    result = normalize(data, ruleset=STRUCTURAL)
    assert result.data is not None, result.reason
    return result.data


def dciodvfy_messages(data: bytes, tmp: Path) -> set[str]:
    """dciodvfy's distinct "Error" and "Warning" lines for one file."""
    path = tmp / "check.dcm"
    path.write_bytes(data)
    proc = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True, errors="replace", timeout=60)
    return {line.strip() for line in (proc.stdout + proc.stderr).splitlines() if line.startswith(("Error", "Warning"))}


@pytest.fixture(scope="module")
def dciodvfy():
    if shutil.which("dciodvfy") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("dciodvfy (Debian package dicom3tools) is required in CI")
        pytest.skip("dciodvfy not installed")
    return True


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corpus_case(case: Case, dciodvfy, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        result = normalize(case.data, ruleset=RULESET, source_ae="LEGACYPACS")
        elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"{elapsed:.2f} s"
    assert _reason_ok(result.reason), result.reason
    SUMMARY[result.reason or "migrated"] += 1
    if case.expected is None:
        assert result.reason is None, result.reason
    elif case.expected != "*":
        assert result.reason in case.expected.split("|"), result.reason
    if result.reason is not None:
        assert result.data is None
        return
    assert result.data is not None
    _strict_reread(result.data)
    out = pydicom.dcmread(io.BytesIO(result.data))
    assert out.file_meta.TransferSyntaxUID in RULESET_ALLOWED or out.file_meta.TransferSyntaxUID.is_compressed
    if "PixelData" in out:
        assert result.pixel_sha256_after == result.pixel_sha256_before == hashlib.sha256(out.PixelData).hexdigest()
    before = dciodvfy_messages(case.data, tmp_path)
    if any("Dicom dataset read failed" in m for m in before):
        # dciodvfy cannot read the input (deflated, or an implicit VR body under
        # an explicit transfer syntax): the baseline is its plain re-encoding.
        DCIODVFY["baseline_reencoded"] += 1
        before = dciodvfy_messages(_plain_reencoding(case.data), tmp_path)
    after = dciodvfy_messages(result.data, tmp_path)
    new = after - before
    DCIODVFY["files"] += 1
    DCIODVFY["before"] += len(before)
    DCIODVFY["after"] += len(after)
    DCIODVFY["new"] += len(new)
    DCIODVFY["errors_before"] += sum(m.startswith("Error") for m in before)
    DCIODVFY["errors_after"] += sum(m.startswith("Error") for m in after)
    assert not new, f"dciodvfy messages our output added: {sorted(new)}"


RULESET_ALLOWED = {"1.2.840.10008.1.2.1"}


def test_corpus_summary(capsys):
    """Print the table the closing note quotes (runs last in this module)."""
    with capsys.disabled():
        print(
            f"\ncorpus: {len(CASES)} files; outcomes: {dict(sorted(SUMMARY.items()))}; "
            f"dciodvfy over {DCIODVFY['files']} migrated files: distinct messages before {DCIODVFY['before']} "
            f"-> after {DCIODVFY['after']}, new {DCIODVFY['new']} (errors {DCIODVFY['errors_before']} -> "
            f"{DCIODVFY['errors_after']}); inputs dciodvfy could not read, compared with a plain re-encoding: "
            f"{DCIODVFY['baseline_reencoded']}"
        )
    assert sum(SUMMARY.values()) in (0, len(CASES))
