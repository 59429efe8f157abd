"""The ``dicom`` connection type: the legacy PACS as an Airflow Connection with
its own form (host, port, the AE titles, the DICOM TLS files) and a working
Test button (a C-ECHO). Registered by this project's provider entry point
(include/pacs_migration_provider.py)."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook

FIELDS = ("called_ae_title", "calling_ae_title", "tls_ca_file", "tls_cert_file", "tls_key_file", "tls_server_name")


def dicom_extra(extra: dict[str, Any]) -> dict[str, Any]:
    """The connection's DICOM fields, whether the form stored them plain or prefixed (``extra__dicom__``)."""
    return {k: extra.get(k) or extra.get(f"extra__dicom__{k}") for k in FIELDS}


def source_overlay(host: str | None, port: int | None, extra: dict[str, Any]) -> dict[str, Any]:
    """The ``source`` keys of the migration config a Connection gives."""
    fields = dicom_extra(extra)
    overlay: dict[str, Any] = {
        "host": host,
        "port": port,
        "called_ae_title": fields["called_ae_title"],
        "calling_ae_title": fields["calling_ae_title"],
    }
    tls = {k[4:]: fields[k] for k in ("tls_ca_file", "tls_cert_file", "tls_key_file", "tls_server_name") if fields[k]}
    if tls:
        overlay["tls"] = tls
    return overlay


class DicomHook(BaseHook):
    """A DICOM peer (the legacy PACS): C-ECHO as the connection test."""

    conn_name_attr = "dicom_conn_id"
    default_conn_name = "pacs_source"
    conn_type = "dicom"
    hook_name = "DICOM (legacy PACS)"

    def __init__(self, dicom_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dicom_conn_id = dicom_conn_id

    def source(self, connection: Any = None) -> Any:
        from include.pacs_migration.config import SourceConfig

        conn = connection or self.get_connection(self.dicom_conn_id)
        values = {k: v for k, v in source_overlay(conn.host, conn.port, conn.extra_dejson or {}).items() if v}
        return SourceConfig.model_validate(values)

    def test_connection(self, connection: Any = None) -> tuple[bool, str]:
        """C-ECHO the peer: (True, who answered) or (False, why not, naming the field or the error class)."""
        from pydantic import ValidationError

        from include.pacs_migration.dimse import echo

        try:
            source = self.source(connection or self.get_connection(self.dicom_conn_id))
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(x) for x in first["loc"])
            return False, f"{field}: {first['msg']}"
        peer = f"{source.called_ae_title}@{source.host}:{source.port}"
        try:
            status = echo(source)
        except Exception as exc:  # the peer's answer, not a crash of the form
            return False, f"{peer} did not answer a C-ECHO from {source.calling_ae_title}: {type(exc).__name__}: {exc}"
        if status != 0:
            return False, f"{peer} answered the C-ECHO with status 0x{status:04X}"
        return True, f"{peer} answered a C-ECHO from {source.calling_ae_title}" + (" over TLS" if source.tls else "")
