"""DICOM network client (SCU) for the legacy PACS: the census's C-FIND and
C-GET on our own Upper Layer (:mod:`.upper_layer`, one thread an association);
C-MOVE and C-ECHO on pynetdicom, whose Storage SCP receives C-MOVE's stores.

Associations are opened and released here, with every timeout set, so a stalled
peer never hangs a task. :func:`configure_logging` (called before any
association) keeps identifiers, which can carry patient data, out of the logs.

- :mod:`.association`: associations, TLS, retries, errors, C-ECHO
- :mod:`.upper_layer`: PS3.8 as a requestor needs it: A-ASSOCIATE, P-DATA, A-RELEASE, A-ABORT
- :mod:`.command`: DIMSE command sets, the Part 10 header of a received instance
- :mod:`.find`: the census's C-FIND (:class:`FindSession` keeps its associations)
- :mod:`.staging`: where retrieved instances land
- :mod:`.get`: C-GET; :mod:`.move`: C-MOVE to our Storage SCP, and :func:`retriever`
"""

from .association import DicomNetworkError, QueryFailed, QueryTruncated, echo, nodelay, tls_context
from .find import FindSession, answer_text, find
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
    "answer_text",
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
