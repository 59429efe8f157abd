"""The report: figures in HTML and CSV, no external assets, renders in Chromium."""

from __future__ import annotations

import csv
import io
import os
import re

import pytest

from demo.render import chromium_binary, png_size, render_html_to_png
from include.pacs_migration.counts import PartitionCounts
from include.pacs_migration.report import PartitionFigures, chart_svg, figures_csv, render_html, subject

FIGURES = [
    PartitionFigures.of("2019-03-02/CR", PartitionCounts(6, 6, 0, 0, 0, 6, {}), True),
    PartitionFigures.of("2019-03-02/CT", PartitionCounts(24, 23, 1, 0, 0, 23, {"PIXEL_LENGTH_MISMATCH": 1}), True),
    PartitionFigures.of(
        "2019-03-02/MR",
        PartitionCounts(12, 10, 0, 2, 0, 10, {"NOT_RECEIVED": 2}),
        False,
        ("expected:expect_column_values_to_not_be_in_set(state)",),
    ),
]


def test_html_carries_every_figure_and_no_external_asset():
    html = render_html("backfill__2019-03-02", "2019-03-02", FIGURES, "s3://pacs-archive/")
    for f in FIGURES:
        row = html.split(f'data-partition="{f.partition}"')[1].split("</tr>")[0]
        for field in ("expected", "migrated", "quarantined", "unresolved", "written"):
            assert f'data-field="{field}">{getattr(f, field)}<' in row
    assert "expect_column_values_to_not_be_in_set(state)" in html and "PIXEL_LENGTH_MISMATCH" in html
    # Inline CSS and SVG only: nothing the mail client would have to fetch.
    assert not re.search(r"""(src|href)\s*=\s*["']?https?:""", html)
    assert "<link" not in html and "@import" not in html
    assert subject("[X]", "2019-03-02", FIGURES).endswith("validation FAILED")


def test_csv_matches_figures():
    rows = list(csv.DictReader(io.StringIO(figures_csv(FIGURES))))
    assert [r["partition"] for r in rows] == [f.partition for f in FIGURES]
    assert rows[2]["unresolved"] == "2" and rows[2]["validation_passed"] == "False"


def test_chart_has_a_bar_per_modality():
    svg = chart_svg(FIGURES)
    assert svg.startswith("<svg") and all(f">{m}<" in svg for m in ("CR", "CT", "MR"))


def test_report_renders_in_headless_chromium(tmp_path):
    if chromium_binary() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is required in CI (.ci/run installs it)")
        pytest.skip("chromium not installed")
    html = render_html("backfill__2019-03-02", "2019-03-02", FIGURES, "s3://pacs-archive/")
    out = render_html_to_png(html, tmp_path / "report.png", width=900, height=600)
    data = out.read_bytes()
    assert png_size(data) == (900, 600)
    assert len(data) > 10_000  # a rendered page, not a blank canvas


def test_findings_and_inconsistent_studies_are_named_in_the_report():
    from include.pacs_migration.counts import PartitionCounts
    from include.pacs_migration.report import PartitionFigures, render_html

    f = PartitionFigures.of(
        "2019-03-01/CT",
        PartitionCounts(10, 5, 5, 0, 0, 5, {"INCONSISTENT_PATIENT": 5}),
        True,
        inconsistent=("1.2.3 quarantined",),
        findings={"charset:undeclared-non-ascii": 2},
    )
    html = render_html("r", "2019-03-01", [f], "s3://b")
    assert "study naming more than one patient: <code>1.2.3 quarantined</code>" in html
    assert "charset:undeclared-non-ascii &times; 2" in html


def test_every_string_that_reaches_the_html_is_escaped():
    """Reason codes, findings, expectation labels, run ids and modalities come
    from the archive or the PACS; markup in any of them is shown, never run."""
    evil = '<script>alert("x")</script>'
    f = PartitionFigures.of(
        f"2019-03-01/{evil}",
        PartitionCounts(2, 1, 1, 0, 0, 1, {f"RULE_REJECTED:{evil}": 1}),
        False,
        (f"expected:{evil}",),
        inconsistent=(evil,),
        findings={f"charset:{evil}": 1},
    )
    html = render_html(f"run-{evil}", "2019-03-01", [f], f"s3://b/{evil}")
    chart = chart_svg([f])
    assert "<script" not in html and "<script" not in chart
    assert "&lt;script&gt;" in html
