"""The HTML the project sends people (report, nightly progress, assessment):
Jinja2 templates in ``templates/``, autoescaped. Charts are inline SVG made
in Python and passed in as markup."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

_FOLDER = Path(__file__).with_name("templates")


@cache
def _environment() -> Environment:
    return Environment(
        loader=FileSystemLoader(_FOLDER),
        autoescape=select_autoescape(["html", "j2"]),
        undefined=StrictUndefined,  # a missing value is an error, not an empty cell
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render(name: str, **values: Any) -> str:
    return _environment().get_template(name).render(**values)


def svg(markup: str) -> Markup:
    """An SVG chart built by our own code (its text parts escaped there)."""
    return Markup(markup)
