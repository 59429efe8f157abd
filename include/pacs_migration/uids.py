"""UID syntax (PS3.5 9.1): the only values allowed into object keys."""

from __future__ import annotations

import re
from typing import NamedTuple

# Ours, as the implementation that writes files (File Meta) and requests associations.
IMPLEMENTATION_CLASS_UID = "2.25.150733591347453178402262417218350212113"

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


def is_valid_uid(value: object) -> bool:
    """True for a conformant UID: at most 64 chars, digits and dots, no
    leading zeros in a component, at least two components."""
    return isinstance(value, str) and len(value) <= 64 and bool(_UID.match(value))


class InstanceUIDs(NamedTuple):
    """An instance's place in the hierarchy, in one order everywhere: (study, series, SOP)."""

    study: str
    series: str
    sop: str
