"""Issue 18, point 5: the `dicom` connection type. Registered through the
project's provider entry point, with its own form fields; its test (the
Connections page's Test button) is a C-ECHO: it succeeds against Orthanc and
fails clearly against a closed port or a bad AE title."""

from __future__ import annotations

import json

from airflow.sdk import Connection

from include.pacs_migration_airflow import DicomHook
from peers.ports import free_port
from tests.peers import Orthanc


def _conn(port: int, called: str = "ORTHANC", **extra: str) -> Connection:
    fields = {"called_ae_title": called, "calling_ae_title": "PACSMIGRATE", **extra}
    return Connection(conn_id="pacs_source", conn_type="dicom", host="127.0.0.1", port=port, extra=json.dumps(fields))


def test_the_connection_type_is_registered_with_its_form():
    from airflow.providers_manager import ProvidersManager
    from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime

    pm = ProvidersManager()  # the api-server's view: providers and the connection form
    assert "pacs-migration" in pm.providers  # make venv installs the project's provider metadata
    assert ProvidersManagerTaskRuntime().hooks["dicom"].hook_class_name == "include.pacs_migration_airflow.DicomHook"
    assert {"extra__dicom__called_ae_title", "extra__dicom__tls_ca_file"} <= set(pm.connection_form_widgets)
    assert pm.field_behaviours["dicom"]["relabeling"] == {"host": "PACS host", "port": "DICOM port"}


def test_c_echo_succeeds_against_orthanc_and_fails_clearly_otherwise(tmp_path):
    orthanc = Orthanc(tmp_path / "orthanc")
    try:
        ok, message = DicomHook().test_connection(_conn(orthanc.dicom_port))
        assert ok, message
        assert message == f"ORTHANC@127.0.0.1:{orthanc.dicom_port} answered a C-ECHO from PACSMIGRATE"
    finally:
        orthanc.stop()
    closed = free_port()
    ok, message = DicomHook().test_connection(_conn(closed))
    assert not ok and message.startswith(f"ORTHANC@127.0.0.1:{closed} did not answer a C-ECHO from PACSMIGRATE:")
    ok, message = DicomHook().test_connection(_conn(104, called="AN-AE-TITLE-FAR-TOO-LONG"))
    assert not ok and message.startswith("called_ae_title:")
    # the prefixed form of the fields is read too
    fields = {"extra__dicom__called_ae_title": "ORTHANC", "extra__dicom__calling_ae_title": "PACSMIGRATE"}
    conn = Connection(conn_id="x", conn_type="dicom", host="127.0.0.1", port=closed, extra=json.dumps(fields))
    assert DicomHook().source(conn).called_ae_title == "ORTHANC"
