"""PACS migration core: pure, typed, Airflow-free.

Every I/O goes through a small client passed in by the caller (a DICOM
association factory, an object store), so the core is tested against real
peers without mocks, and the DAG files stay thin.
"""

__version__ = "0.1.0"
