"""The census's C-FIND client keeps its associations: over one association it
loses no answer under CPU load (pynetdicom 3.0, which it used to run on, dropped
a response its reactor thread took first, #875), and a kept association the
PACS closed while idle is replaced without failing the query. Against Orthanc
with TCP_NODELAY (a PACS that answers in ~4 ms: the race needed prompt answers)
behind a counting relay."""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Iterator

import pytest
from pydicom.dataset import Dataset

from include.pacs_migration.config import SourceConfig
from include.pacs_migration.dimse import FindSession
from tests.peers import ConnectionCounter, Orthanc, many_studies

STUDIES = 30
ROUNDS = 40  # 1,200 queries: 26 of 2,160 lost an answer over one association before the fix


def _pacs(tmp_path_factory, **options) -> Iterator[tuple[ConnectionCounter, list[str]]]:
    folder = tmp_path_factory.mktemp("find-session")
    uids = many_studies(folder / "studies", STUDIES)
    orthanc = Orthanc(folder / "pacs", tcp_nodelay=True, **options)
    relay = None
    try:
        assert orthanc.upload_folder(folder / "studies") == STUDIES
        relay = ConnectionCounter(orthanc.dicom_port)
        yield relay, uids
    finally:
        if relay:
            relay.stop()
        orthanc.stop()


@pytest.fixture(scope="module")
def prompt_pacs(tmp_path_factory) -> Iterator[tuple[ConnectionCounter, list[str]]]:
    yield from _pacs(tmp_path_factory)


@pytest.fixture(scope="module")
def impatient_pacs(tmp_path_factory) -> Iterator[tuple[ConnectionCounter, list[str]]]:
    yield from _pacs(tmp_path_factory, DicomScpTimeout=1)  # closes an association idle 1 s


def _source(port: int) -> SourceConfig:
    return SourceConfig(
        host="127.0.0.1", port=port, called_ae_title="ORTHANC", calling_ae_title="PACSMIGRATE", dimse_timeout=30
    )


def _series_of(study_uid: str) -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = "SERIES"
    q.StudyInstanceUID = study_uid
    q.SeriesInstanceUID = ""
    return q


@contextlib.contextmanager
def cpu_load(threads: int = 3) -> Iterator[None]:
    """Threads that want the GIL: the reactor thread then runs late, as in a busy worker."""
    stop = threading.Event()

    def burn() -> None:
        block = b"x" * 100_000
        while not stop.is_set():
            hashlib.sha256(block).digest()
            sum(range(1000))

    workers = [threading.Thread(target=burn, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    try:
        yield
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=10)


def test_one_association_answers_every_query_under_cpu_load(prompt_pacs):
    relay, uids = prompt_pacs
    before = relay.total
    incomplete = 0
    with cpu_load(), FindSession(_source(relay.port)) as session:
        for _ in range(ROUNDS):
            for uid in uids:
                answers = session.find(_series_of(uid))
                incomplete += len(answers) != 1 or str(answers[0].StudyInstanceUID) != uid
    assert incomplete == 0, f"{incomplete} of {ROUNDS * STUDIES} queries lost their answer"
    # One association for them all (one per query before), bar one: a query that timed out on a
    # machine this loaded is asked again on a new one (CI once had Orthanc close it while idle 1 s).
    assert relay.total - before <= 2


def test_an_association_the_pacs_closed_while_idle_is_replaced(impatient_pacs):
    relay, uids = impatient_pacs
    before = relay.total
    with FindSession(_source(relay.port)) as session:
        assert len(session.find(_series_of(uids[0]))) == 1
        time.sleep(2.5)  # Orthanc closes it after 1 s idle
        assert len(session.find(_series_of(uids[1]))) == 1
    assert relay.total - before == 2


def test_queries_asked_at_once_each_have_their_own_association(prompt_pacs):
    relay, uids = prompt_pacs
    before, peak = relay.total, relay.max_active
    relay.max_active = 0
    with FindSession(_source(relay.port)) as session:
        threads = [
            threading.Thread(target=lambda u=u: [session.find(_series_of(x)) for x in uids[u::3]]) for u in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert relay.max_active <= 3 and relay.total - before <= 3
    relay.max_active = max(peak, relay.max_active)
