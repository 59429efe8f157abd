"""`core.hostname_callable` for the Celery test: each worker reports its own
name (both run on this one machine, where the FQDN would not tell them apart)."""

from __future__ import annotations

import os
import socket


def worker_hostname() -> str:
    return os.environ.get("PACS_WORKER_NAME") or socket.getfqdn()
