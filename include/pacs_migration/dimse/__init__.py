"""DICOM network client (SCU) for the legacy PACS, on pynetdicom.

One association per call, opened and released here, with every timeout set, so
a stalled peer never hangs a task. :func:`configure_logging` (called before any
association) keeps identifiers, which can carry patient data, out of the logs.

- :mod:`.association`: associations, TLS, retries, errors, C-ECHO
- :mod:`.find`: the census's C-FIND
- :mod:`.staging`: where retrieved instances land
- :mod:`.get`: C-GET; :mod:`.move`: C-MOVE to our Storage SCP, and :func:`retriever`
"""

from .association import DicomNetworkError, QueryFailed, QueryTruncated, echo, nodelay, tls_context
from .find import FindSession, find
from .get import (
    RETRIEVE_TRANSFER_SYNTAXES,
    UNCOMPRESSED_TRANSFER_SYNTAXES,
    RetrieveOutcome,
    c_get,
    likely_storage_classes,
    retrieve_syntaxes,
    storage_contexts,
)
from .move import MoveRetriever, RouterClient, retriever
from .staging import ReceivedInstance, StagingSink

__all__ = [
    "RETRIEVE_TRANSFER_SYNTAXES",
    "UNCOMPRESSED_TRANSFER_SYNTAXES",
    "DicomNetworkError",
    "FindSession",
    "MoveRetriever",
    "QueryFailed",
    "QueryTruncated",
    "ReceivedInstance",
    "RetrieveOutcome",
    "StagingSink",
    "RouterClient",
    "c_get",
    "echo",
    "find",
    "likely_storage_classes",
    "nodelay",
    "retrieve_syntaxes",
    "retriever",
    "storage_contexts",
    "tls_context",
]
