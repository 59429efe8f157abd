"""Data Docs views whose templates are compiled once per process.

GX builds a new jinja ``Environment`` for every view it renders with, so each
partition's Data Docs compiled the same ~50 templates again (over half of the
build's CPU). These views share one in-memory bytecode cache: a process compiles
each template once, and a task forked from a process that already built Data
Docs (see :func:`validate.warm_up`) compiles none. The cache is keyed by the
template's name and source checksum, so a changed template is compiled anew.

Named in the Data Docs site config (:data:`validate.DATA_DOCS_SITE`); GX imports
this module when it builds the docs.
"""

from __future__ import annotations

import threading

from great_expectations.render.view import DefaultJinjaIndexPageView, DefaultJinjaPageView
from jinja2 import BytecodeCache
from jinja2.bccache import Bucket


class MemoryBytecodeCache(BytecodeCache):
    """Compiled templates kept in this process (templates only: no data)."""

    def __init__(self) -> None:
        self._code: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def load_bytecode(self, bucket: Bucket) -> None:
        with self._lock:
            code = self._code.get(bucket.key)
        if code is not None:
            bucket.bytecode_from_string(code)

    def dump_bytecode(self, bucket: Bucket) -> None:
        code = bucket.bytecode_to_string()
        with self._lock:
            self._code[bucket.key] = code

    def clear(self) -> None:
        with self._lock:
            self._code.clear()

    def __len__(self) -> int:
        return len(self._code)


TEMPLATES = MemoryBytecodeCache()


class PageView(DefaultJinjaPageView):
    """GX's page view, its templates from :data:`TEMPLATES`."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.env.bytecode_cache = TEMPLATES


class IndexPageView(DefaultJinjaIndexPageView):
    """GX's index page view, its templates from :data:`TEMPLATES`."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.env.bytecode_cache = TEMPLATES
