"""What is deployed (dags/, include/) never imports what is not: the test and
demo peers, the tests, or test-only packages (they are not in the image)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOT_DEPLOYED = {"peers", "demo", "tests", "benchmarks", "moto", "aiosmtpd", "pytest", "playwright"}
DEPLOYED = sorted(p for d in ("dags", "include") for p in (ROOT / d).rglob("*.py"))


@pytest.mark.parametrize("path", DEPLOYED, ids=[str(p.relative_to(ROOT)) for p in DEPLOYED])
def test_deployed_code_imports_nothing_that_is_not_deployed(path):
    for node in ast.walk(ast.parse(path.read_text())):
        names = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module]
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
            else []
        )
        for name in names:
            assert name.split(".")[0] not in NOT_DEPLOYED, f"{path.relative_to(ROOT)} imports {name}"


def test_runtime_requirements_hold_no_test_tools():
    runtime = (ROOT / "requirements.txt").read_text().lower()
    for tool in ("pytest", "moto", "aiosmtpd", "playwright", "ruff", "mypy"):
        assert f"\n{tool}" not in runtime and not runtime.startswith(tool), tool
