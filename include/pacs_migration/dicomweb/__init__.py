"""The DICOMweb service (PS3.18) over the migrated archive, with federated
fallback to the legacy PACS: ``qido`` (search and matching), ``wado``
(retrieval, metadata, frames, rendered), ``catalog`` (the study index in
memory), ``legacy`` (C-FIND and C-GET on demand), ``service`` (the app)."""
