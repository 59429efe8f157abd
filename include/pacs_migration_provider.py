"""This project as an Airflow provider (entry point ``apache_airflow_provider``
in pyproject.toml): it registers the ``dicom`` connection type."""

from __future__ import annotations

from typing import Any


def _field(label: str, description: str, **schema: Any) -> dict[str, Any]:
    return {"label": label, "description": description, "schema": {"type": ["string", "null"], **schema}}


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "pacs-migration",
        "name": "PACS migration",
        "description": "Migration of a legacy PACS archive to S3: the DICOM connection type.",
        "versions": ["0.1.0"],
        "connection-types": [
            {
                "connection-type": "dicom",
                "hook-class-name": "include.pacs_migration_airflow.DicomHook",
                "hook-name": "DICOM (legacy PACS)",
                "conn-fields": {
                    "called_ae_title": _field("Called AE title", "the PACS's AE title", maxLength=16),
                    "calling_ae_title": _field("Calling AE title", "ours, registered at the PACS", maxLength=16),
                    "tls_ca_file": _field("TLS CA file", "DICOM TLS: the CA that signed the PACS's certificate"),
                    "tls_cert_file": _field("TLS certificate file", "ours, when the PACS asks for one"),
                    "tls_key_file": _field("TLS key file", "the key of our certificate"),
                    "tls_server_name": _field("TLS server name", "the name on the PACS's certificate"),
                },
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "login", "password", "extra"],
                    "relabeling": {"host": "PACS host", "port": "DICOM port"},
                    "placeholders": {"host": "pacs.hospital.local", "port": "104"},
                },
            }
        ],
    }
