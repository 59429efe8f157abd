"""Retrieve: bring every expected instance of a partition into staging.

Completion is decided by reconciling received SOP Instance UIDs against the
census, never by the peer's status counters. A series is fetched whole first;
what is still missing is asked for again at image level, within a bounded
number of attempts. What never arrives is ``unresolved``; what arrives unasked
is reported so it can be quarantined ``UNSOLICITED``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pydicom.dataset import Dataset

from .census import CensusSeries
from .dimse import DicomNetworkError, RetrieveOutcome, StagingSink, likely_storage_classes

log = logging.getLogger(__name__)

GetFn = Callable[[Dataset, Iterable[str], StagingSink], RetrieveOutcome]
_UIDS_PER_REQUEST = 64  # keeps an image-level identifier well under any PDU limit


@dataclass(frozen=True)
class SeriesRetrieval:
    series_instance_uid: str
    expected: int
    received: int
    missing: tuple[str, ...]
    attempts: int
    last_error: str | None
    # Missing instances the source itself named in a Failed SOP Instance UID List.
    peer_failed: tuple[str, ...] = ()
    stopped: bool = False  # never asked for: the run had to stop first (the window closed)

    def why_missing(self, sop_instance_uid: str) -> str:
        """Detail of NOT_RECEIVED for one missing instance: ``source-failed``
        (the source reported its sub-operation failed), ``network`` (the last
        attempt broke: rejected, aborted or timed out) or ``not-sent`` (the
        source finished without sending it)."""
        if sop_instance_uid in self.peer_failed:
            return "source-failed"
        return "network" if self.last_error else "not-sent"


def _series_query(series: CensusSeries) -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = "SERIES"
    q.StudyInstanceUID = series.study_instance_uid
    q.SeriesInstanceUID = series.series_instance_uid
    return q


def _image_query(series: CensusSeries, sop_uids: list[str]) -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE"
    q.StudyInstanceUID = series.study_instance_uid
    q.SeriesInstanceUID = series.series_instance_uid
    q.SOPInstanceUID = sop_uids if len(sop_uids) > 1 else sop_uids[0]
    return q


def retrieve_series(
    get: GetFn,
    series: CensusSeries,
    sink: StagingSink,
    attempts: int,
    backoff: float = 0.5,
) -> SeriesRetrieval:
    """Fetch one series until every expected SOP instance is in ``sink``."""
    expected = {i.sop_instance_uid for i in series.instances}
    classes = {i.sop_class_uid for i in series.instances if i.sop_class_uid}
    if len(classes) == 0 or any(not i.sop_class_uid for i in series.instances):
        classes |= set(likely_storage_classes(series.modality))  # the census could not learn them all
    last_error: str | None = None
    peer_failed: set[str] = set()
    used = 0
    for attempt in range(attempts):
        missing = sorted(expected - sink.received.keys())
        # A series with a census gap is fetched whole once: the retrieval names its members.
        if not missing and not (attempt == 0 and series.census_gap):
            break
        if sink.out_of_space():
            break  # STAGING_FULL: the source is not at fault, asking again would only wait
        used = attempt + 1
        last_error = None
        try:
            if attempt == 0:
                outcomes = [get(_series_query(series), sorted(classes), sink)]
            else:
                outcomes = [
                    get(_image_query(series, missing[start : start + _UIDS_PER_REQUEST]), sorted(classes), sink)
                    for start in range(0, len(missing), _UIDS_PER_REQUEST)
                ]
            peer_failed = {u for o in outcomes for u in o.failed_sop_instance_uids}
        except DicomNetworkError as exc:
            last_error = str(exc)
            log.warning("retrieve attempt %d of %d for a series failed: %s", used, attempts, exc)
        if expected - sink.received.keys() and attempt + 1 < attempts:
            time.sleep(min(backoff * 2**attempt, 10.0))
    missing_final = tuple(sorted(expected - sink.received.keys()))
    return SeriesRetrieval(
        series.series_instance_uid,
        len(expected),
        len(expected) - len(missing_final),
        missing_final,
        used,
        last_error,
        tuple(sorted(peer_failed & set(missing_final))),
    )


def retrieve_partition(
    get: GetFn,
    series: list[CensusSeries],
    sink: StagingSink,
    attempts: int,
    max_associations: int,
    on_series_done: Callable[[CensusSeries], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[SeriesRetrieval]:
    """Retrieve every series of a partition, at most ``max_associations`` at
    once (a study whose series could not be listed has none to retrieve).
    ``on_series_done`` is called as each series' retrieval ends. Once
    ``should_stop()`` says so (the clinical window closed), no further series
    is asked for: those come back ``stopped``, the ones under way finish."""

    def one(s: CensusSeries) -> SeriesRetrieval:
        if should_stop is not None and should_stop():
            expected = tuple(sorted(i.sop_instance_uid for i in s.instances))
            result = SeriesRetrieval(s.series_instance_uid, len(expected), 0, expected, 0, None, stopped=True)
        else:
            result = retrieve_series(get, s, sink, attempts)
        if on_series_done is not None:
            on_series_done(s)
        return result

    # Series of a study run next to each other, so a held study is released early.
    ordered = sorted((s for s in series if s.series_instance_uid), key=lambda s: s.study_instance_uid)
    with ThreadPoolExecutor(max_workers=max_associations, thread_name_prefix="retrieve") as pool:
        return list(pool.map(one, ordered))
