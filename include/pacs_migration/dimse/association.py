"""Associations to the legacy PACS: one per call, every timeout set, TCP_NODELAY,
DICOM TLS, bounded retries of transient rejections; the errors the client raises; C-ECHO."""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pydicom.dataset import Dataset
from pynetdicom import AE, evt

from ..config import SourceConfig, TlsConfig
from ..logs import configure_logging

log = logging.getLogger(__name__)


VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"


class DicomNetworkError(RuntimeError):
    """The association could not be made or broke; worth a retry."""


class QueryFailed(RuntimeError):
    """The peer answered a C-FIND with a failure status."""

    def __init__(self, status: int) -> None:
        super().__init__(f"C-FIND failed with status 0x{status:04X}")
        self.status = status


class QueryTruncated(QueryFailed):
    """The peer stopped answering early (0xFE00 cancel, 0xA700 out of resources):
    ``answers`` holds what came before. The caller splits the query."""

    def __init__(self, status: int, answers: list[Dataset]) -> None:
        super().__init__(status)
        self.answers = answers


TRUNCATION_STATUSES = (0xFE00, 0xA700)

_REJECT_PERMANENT = 0x01
_REJECT_SOURCES = {1: "service user", 2: "service provider (ACSE)", 3: "service provider (presentation)"}


class Rejected(Exception):
    """One attempt refused by the peer: why, and whether another attempt can help."""

    def __init__(self, reason: str, permanent: bool) -> None:
        super().__init__(reason)
        self.permanent = permanent

    @classmethod
    def from_rj(cls, result: int, source: int, diagnostic: Any) -> Rejected:
        """From an A-ASSOCIATE-RJ's result (1 permanent, 2 transient), source and reason."""
        kind = "permanently" if result == _REJECT_PERMANENT else "transiently"
        where = _REJECT_SOURCES.get(source, "peer")
        return cls(f"rejected {kind} by the {where} (reason {diagnostic})", result == _REJECT_PERMANENT)


def nodelay_socket(sock: socket.socket) -> None:
    """TCP_NODELAY: DIMSE sends small writes that Nagle's algorithm would hold
    back for a delayed ACK (~40 ms each)."""
    with contextlib.suppress(AttributeError, OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def nodelay(assoc) -> None:
    """TCP_NODELAY on a pynetdicom association's socket."""
    with contextlib.suppress(AttributeError):
        nodelay_socket(assoc.dul.socket.socket)


def new_ae(source: SourceConfig) -> AE:
    ae = AE(ae_title=source.calling_ae_title)
    ae.acse_timeout = source.acse_timeout
    ae.dimse_timeout = source.dimse_timeout
    ae.network_timeout = source.network_timeout
    ae.connection_timeout = source.acse_timeout
    ae.maximum_pdu_size = source.max_pdu
    return ae


def tls_context(tls: TlsConfig) -> ssl.SSLContext:
    """A client context that trusts only ``tls.ca_file`` and presents our
    certificate when one is configured. TLS 1.2 at least (PS3.15 BCP 195)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = tls.check_hostname
    if tls.cert_file and tls.key_file:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return ctx


T = TypeVar("T")


def with_attempts(source: SourceConfig, open_once: Callable[[], T]) -> T:
    """``open_once()`` until it opens an association, or raise DicomNetworkError.

    A transient rejection or a failed connection is retried
    (``source.association_attempts``, exponential backoff); a permanent
    rejection (wrong AE title, unsupported context) is not.
    """
    configure_logging()  # before any association: no identifiers in logs, streamed receive
    peer = f"{source.called_ae_title}@{source.host}:{source.port}"
    attempts = max(1, source.association_attempts)
    reason = "failed"
    for attempt in range(attempts):
        try:
            return open_once()
        except Rejected as exc:
            reason = str(exc)
            if exc.permanent:
                break
        except DicomNetworkError as exc:
            reason = str(exc)
        if attempt + 1 < attempts:
            log.warning("association to %s %s; attempt %d of %d", peer, reason, attempt + 1, attempts)
            time.sleep(min(0.5 * 2**attempt, 5.0))
    raise DicomNetworkError(f"association to {peer} {reason}")


def associate(ae: AE, source: SourceConfig, **kwargs: Any):
    """Open a pynetdicom association to the source with TCP_NODELAY (attempts
    as :func:`with_attempts`), or raise DicomNetworkError."""
    handlers = list(kwargs.pop("evt_handlers", []))
    if source.tls is not None:
        kwargs["tls_args"] = (tls_context(source.tls), source.tls.server_name or source.host)

    def open_once():
        answer: dict[str, Any] = {}

        def on_acse(event: evt.Event) -> None:
            primitive: Any = getattr(event, "primitive", None)  # set on ACSE events only
            if getattr(primitive, "result", None) in (0x01, 0x02):
                answer.update(result=primitive.result, source=primitive.result_source, diagnostic=primitive.diagnostic)

        # max_pdu must be passed here: AE.maximum_pdu_size only applies to an acceptor.
        assoc = ae.associate(
            source.host,
            source.port,
            ae_title=source.called_ae_title,
            max_pdu=source.max_pdu,
            evt_handlers=[*handlers, (evt.EVT_ACSE_RECV, on_acse)],
            **kwargs,
        )
        if assoc.is_established:
            nodelay(assoc)
            return assoc
        if assoc.is_rejected:
            raise Rejected.from_rj(answer.get("result", 0), answer.get("source", 0), answer.get("diagnostic", "?"))
        raise DicomNetworkError("failed (no answer, refused connection or TLS handshake)")

    return with_attempts(source, open_once)


def echo(source: SourceConfig) -> int:
    """C-ECHO the source (association, TLS, AE titles); returns the status (0x0000: success).

    Raises
    ------
    DicomNetworkError
        When no association could be made.
    """
    ae = new_ae(source)
    ae.add_requested_context(VERIFICATION_SOP_CLASS)
    assoc = associate(ae, source)
    try:
        status = assoc.send_c_echo()
        if not status:
            raise DicomNetworkError("C-ECHO got no response (timeout or abort)")
        return int(status.Status)
    finally:
        if assoc.is_established:
            assoc.release()
