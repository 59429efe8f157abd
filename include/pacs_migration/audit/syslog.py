"""Audit messages to a collector (an ATNA audit record repository): syslog
(RFC 5424) over TLS (RFC 5425, octet-counted frames), as IHE ATNA asks:
facility authpriv, severity notice, MSGID ``IHE+RFC-3881``."""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

PRI = 10 * 8 + 5  # authpriv.notice
MSGID = "IHE+RFC-3881"


@dataclass(frozen=True)
class SyslogTarget:
    host: str
    port: int
    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None
    timeout: float = 10.0


def record(xml: bytes, app_name: str = "pacs-migration", host: str | None = None) -> bytes:
    """One RFC 5424 message carrying ``xml`` (UTF-8, with the BOM 5424 asks for)."""
    stamp = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    header = f"<{PRI}>1 {stamp} {host or socket.gethostname()} {app_name} {os.getpid()} {MSGID} - "
    return header.encode("ascii") + b"\xef\xbb\xbf" + xml


def frame(message: bytes) -> bytes:
    """RFC 5425 octet counting: ``MSG-LEN SP SYSLOG-MSG``."""
    return f"{len(message)} ".encode("ascii") + message


def send(target: SyslogTarget, messages: list[bytes], app_name: str = "pacs-migration") -> None:
    """Send every message over one TLS connection (the collector's certificate verified)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(target.ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if target.cert_file is not None:
        context.load_cert_chain(str(target.cert_file), str(target.key_file) if target.key_file else None)
    with (
        socket.create_connection((target.host, target.port), timeout=target.timeout) as raw,
        context.wrap_socket(raw, server_hostname=target.server_name or target.host) as tls,
    ):
        tls.sendall(b"".join(frame(record(m, app_name)) for m in messages))
        tls.unwrap()  # close_notify: the collector knows the last frame is whole
