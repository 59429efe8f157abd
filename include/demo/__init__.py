"""The demo archive (also seeded into Orthanc by docker-compose)."""
