"""QIDO-RS matching (PS3.4 C.2.2.2) on the study index's columns, with DuckDB as the service runs it."""

from __future__ import annotations

import duckdb
import pytest

from include.pacs_migration.dicomweb import qido
from include.pacs_migration.dicomweb.catalog import TABLE, _sql_type
from include.pacs_migration.study_index import COLUMNS


def _row(study: str, series: str, sop: str, **attrs) -> dict:
    base = {c: None for c in COLUMNS}
    base.update(StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=sop, **attrs)
    return base


ROWS = [
    _row("1.2.1", "1.2.1.1", "1.2.1.1.1", PatientName="O'Brien^Ann", PatientID="P1", StudyDate="20190301",
         StudyTime="101500", Modality="CT", AccessionNumber="A100", SeriesNumber=1, InstanceNumber=1),
    _row("1.2.1", "1.2.1.2", "1.2.1.2.1", PatientName="O'Brien^Ann", PatientID="P1", StudyDate="20190301",
         StudyTime="101500", Modality="SR", AccessionNumber="A100", SeriesNumber=2, InstanceNumber=1),
    _row("1.2.2", "1.2.2.1", "1.2.2.1.1", PatientName="SMITH^JOHN", PatientID="P2", StudyDate="20190302",
         StudyTime="083000", Modality="MR", AccessionNumber="A200", SeriesNumber=1, InstanceNumber=1),
    _row("1.2.3", "1.2.3.1", "1.2.3.1.1", PatientName="SMITHSON^JO", PatientID="P3", StudyDate="20200115",
         StudyTime="235959", Modality="CT", AccessionNumber="A_300", SeriesNumber=1, InstanceNumber=1),
]  # fmt: skip


@pytest.fixture(scope="module")
def db():
    con = duckdb.connect(":memory:")
    con.execute(f"CREATE TABLE {TABLE} ({', '.join(f'{chr(34)}{c}{chr(34)} {_sql_type(c)}' for c in COLUMNS)})")
    marks = ", ".join("?" for _ in COLUMNS)
    con.executemany(f"INSERT INTO {TABLE} VALUES ({marks})", [[r[c] for c in COLUMNS] for r in ROWS])
    return con


def _studies(db, **params) -> list[str]:
    query = qido.parse_query(qido.Level.STUDY, list(params.items()))
    sql, args = qido.sql(query)
    cur = db.execute(sql, args)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r, strict=True))["StudyInstanceUID"] for r in cur.fetchall()]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, ["1.2.3", "1.2.2", "1.2.1"]),  # newest first
        ({"PatientName": "smith*"}, ["1.2.3", "1.2.2"]),  # wildcard, case-insensitive for names
        ({"PatientName": "SMITH^JOHN"}, ["1.2.2"]),  # single value
        ({"PatientName": "o'brien*"}, ["1.2.1"]),  # a quote is a value, not SQL
        ({"00100020": "P?"}, ["1.2.3", "1.2.2", "1.2.1"]),  # by tag, ? matches one character
        ({"StudyDate": "20190301-20190302"}, ["1.2.2", "1.2.1"]),  # closed range
        ({"StudyDate": "20190302-"}, ["1.2.3", "1.2.2"]),  # open ranges
        ({"StudyDate": "-20190301"}, ["1.2.1"]),
        ({"StudyTime": "2300-"}, ["1.2.3"]),
        ({"StudyInstanceUID": "1.2.1,1.2.3"}, ["1.2.3", "1.2.1"]),  # UID list
        ({"ModalitiesInStudy": "SR"}, ["1.2.1"]),  # any series of the study
        ({"AccessionNumber": "A_3*"}, ["1.2.3"]),  # _ and % are not wildcards
        ({"AccessionNumber": "A%"}, []),
        ({"PatientID": "*"}, ["1.2.3", "1.2.2", "1.2.1"]),  # universal matching
    ],
)
def test_study_matching(db, params, expected):
    assert _studies(db, **params) == expected


def test_study_answers_aggregate_their_series(db):
    query = qido.parse_query(qido.Level.STUDY, [("StudyInstanceUID", "1.2.1")])
    cur = db.execute(*qido.sql(query))
    row = dict(zip([d[0] for d in cur.description], cur.fetchone(), strict=True))
    assert row["ModalitiesInStudy"] == "CT\\SR"
    assert (row["NumberOfStudyRelatedSeries"], row["NumberOfStudyRelatedInstances"]) == (2, 2)
    out = qido.to_json(row, query.returned)
    assert out["00080061"] == {"vr": "CS", "Value": ["CT", "SR"]}
    assert out["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "O'Brien^Ann"}]}
    assert out["00201206"] == {"vr": "IS", "Value": [2]}
    assert list(out) == sorted(out)


@pytest.mark.parametrize(
    ("level", "params", "named"),
    [
        (qido.Level.STUDY, [("NoSuchKey", "1")], "NoSuchKey"),
        (qido.Level.STUDY, [("SOPInstanceUID", "1.2")], "SOPInstanceUID"),  # not a study-level key
        (qido.Level.STUDY, [("limit", "ten")], "limit"),
        (qido.Level.STUDY, [("offset", "-1")], "offset"),
        (qido.Level.STUDY, [("includefield", "00109999")], "00109999"),
        (qido.Level.SERIES, [("SeriesNumber", "one")], "SeriesNumber"),
    ],
)
def test_a_bad_parameter_is_named(level, params, named):
    with pytest.raises(qido.QueryError, match=named):
        sql = qido.sql(qido.parse_query(level, params))
        assert sql  # SeriesNumber's integer check happens when the SQL is built


def test_includefield_by_keyword_tag_or_all():
    q = qido.parse_query(qido.Level.STUDY, [("includefield", "00081030,PatientSex"), ("includefield", "all")])
    assert q.includefield == ("StudyDescription", "PatientSex") and q.include_all


@pytest.mark.parametrize("level", list(qido.Level))
def test_the_legacy_find_identifier_is_valid_dicom_at_every_level(level, monkeypatch):
    """Every returned key asked empty whatever its VR (Rows is US: "" is not a
    US value), under pydicom's strict mode (importing dicomweb-client turns it on)."""
    from pydicom import config as pydicom_config
    from pynetdicom.dsutils import encode

    from include.pacs_migration.dicomweb.legacy import FIND_KEYS, find_identifier

    monkeypatch.setattr(pydicom_config.settings, "reading_validation_mode", pydicom_config.RAISE)
    params = [("StudyDate", "20190301-20190302"), ("ModalitiesInStudy", "CT"), ("PatientID", "P1")]
    fixed = {"StudyInstanceUID": "1.2.1"} if level is not qido.Level.STUDY else {}
    if level is qido.Level.IMAGE:
        fixed["SeriesInstanceUID"] = "1.2.1.1"
    ds = find_identifier(qido.parse_query(level, params if level is qido.Level.STUDY else [], fixed))
    assert ds.QueryRetrieveLevel == level.value
    assert all(kw in ds for kw in FIND_KEYS[level])
    assert encode(ds, True, True)  # as the association sends it
    if level is qido.Level.STUDY:
        assert ds.StudyDate == "20190301-20190302" and ds.PatientID == "P1"
