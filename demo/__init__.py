"""The demo: a real migration of a synthetic archive through Airflow
(`make demo`), its screenshots and the trace of one instance. Not deployed."""
