"""Peers the tests and the demo run against, on loopback: a simulated PACS
(pynetdicom), moto's S3 server, an aiosmtpd mail sink, Airflow processes.
Not deployed: nothing under include/ imports them."""
