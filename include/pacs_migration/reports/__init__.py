"""Radiology reports from the RIS, moved into their studies: ``hl7`` (ORU^R01 read),
``intake`` (the export folder; each message kept before anything else), ``mllp``
(the listener the RIS pushes to), ``ledger`` (the one owner of a date's report
keys), ``place`` (matching and the write-once SR/PDF), ``dicom`` (Basic Text SR,
Encapsulated PDF), ``check`` (the GX validation of a date's reports)."""
