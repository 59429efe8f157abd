"""HL7 v2 ORU^R01 reports: parsing with the legacy quirks, and the DICOM objects made of them."""

from __future__ import annotations

import io

import pydicom
import pytest

from include.pacs_migration.reports import dicom
from include.pacs_migration.reports.hl7 import ParseError, ReportStatus, parse_report, split_messages
from tests.ris import dciodvfy, oru, tiny_pdf

STUDY = {
    "PatientName": "DOE^JANE", "PatientID": "P1", "PatientBirthDate": "19600101", "PatientSex": "F",
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.1", "StudyDate": "20190301", "StudyTime": "101500",
    "AccessionNumber": "ACC1", "ReferringPhysicianName": None, "StudyID": "1",
}  # fmt: skip


def _without(segment: str, message: str) -> bytes:
    return "\r".join(s for s in message.split("\r") if not s.startswith(segment)).encode()


def test_text_with_escapes_repetitions_and_line_breaks():
    raw = oru("C1", "P1", "ACC1", "20190301101500",
              ["FINDINGS:\\.br\\No nodule \\T\\ no effusion~Heart size normal", "IMPRESSION: \\F\\ normal \\S\\ 1"],
              reported="20190301120000").encode()  # fmt: skip
    r = parse_report(raw)
    assert r.text == "FINDINGS:\nNo nodule & no effusion\nHeart size normal\nIMPRESSION: | normal ^ 1"
    assert (r.accession, r.patient_id, r.issuer, r.status) == ("ACC1", "P1", "HOSP", ReportStatus.FINAL)
    assert r.interpreter is not None and r.interpreter.dicom_name == "HOUSE^GREGORY"
    assert r.observed_at.isoformat() == "2019-03-01T10:15:00" and r.reported_at.hour == 12


def test_segments_ending_in_newlines_and_files_of_many_messages():
    one = oru("C1", "P1", "ACC1", "20190301101500", ["a"], segment_end="\r\n")
    two = oru("C2", "P2", "ACC2", "20190301111500", ["b"], segment_end="\n")
    messages = split_messages(("FHS|^~\\&\nBHS|^~\\&\n" + one + two + "BTS|2\nFTS|1\n").encode())
    assert [parse_report(m).accession for m in messages] == ["ACC1", "ACC2"]


def test_character_sets_of_msh_18():
    raw = oru("C1", "P1", "ACC1", "20190301", ["Заключение: без патологии"], charset="8859/5").encode("iso8859-5")
    assert parse_report(raw).text == "Заключение: без патологии"
    raw = oru("C2", "P1", "ACC1", "20190301", ["所見：異常なし"], charset="UNICODE UTF-8").encode()
    assert parse_report(raw).text == "所見：異常なし"
    latin = oru("C3", "P1", "ACC1", "20190301", ["Befund: unauffällig"]).encode("iso8859-1")
    assert parse_report(latin).text == "Befund: unauffällig"  # no MSH-18: the site's default, 8859/1


def test_a_pdf_in_obx_5():
    pdf = tiny_pdf("Report")
    r = parse_report(oru("C1", "P1", "ACC1", "20190301", pdf=pdf).encode())
    assert r.pdf == pdf and r.text == ""


@pytest.mark.parametrize(
    ("raw", "segment"),
    [
        (b"garbage", "MSH"),
        (oru("C1", "P1", "ACC1", "20190301", ["x"]).replace("ORU^R01", "ADT^A08").encode(), "MSH"),
        (oru("C1", "P1", "ACC1", "20190301", ["x"], charset="KLINGON").encode(), "MSH"),
        (oru("C1", "P1", "ACC1", "20190301", ["Заключение"], charset="UNICODE UTF-8").encode("iso8859-5"), "MSH"),
        (oru("C1", "", "ACC1", "20190301", ["x"]).encode(), "PID"),
        (oru("C1", "P1", "", "20190301", ["x"]).encode(), "OBR"),
        (oru("C1", "P1", "ACC1", "not-a-date", ["x"]).encode(), "OBR"),
        (oru("C1", "P1", "ACC1", "20190301", ["x"], status="X").encode(), "OBR"),
        (oru("C1", "P1", "ACC1", "20190301", []).encode(), "OBX"),
        (oru("C1", "P1", "ACC1", "20190301", pdf=b"not a pdf").encode(), "OBX"),
        (_without("PID", oru("C1", "P1", "ACC1", "20190301", ["x"])), "PID"),
    ],
)  # fmt: skip
def test_what_cannot_be_read_names_its_segment(raw, segment):
    with pytest.raises(ParseError) as exc:
        parse_report(raw)
    assert exc.value.reason == f"HL7_PARSE_ERROR:{segment}"
    assert "P1" not in str(exc.value) and "ACC1" not in str(exc.value)  # never quotes the message


def test_basic_text_sr_is_valid_and_names_what_it_supersedes(tmp_path):
    first = parse_report(oru("C1", "P1", "ACC1", "20190301101500", ["Preliminary: nodule"], status="P").encode())
    amended = parse_report(oru("C2", "P1", "ACC1", "20190301101500", ["Amended:\\.br\\no nodule", "Stable"],
                               status="C", reported="20190302090000").encode())  # fmt: skip
    before = dicom.text_sr(first, STUDY, "a" * 64, 1, None)
    pred = dicom.Predecessor(STUDY["StudyInstanceUID"], dicom.series_uid(STUDY["StudyInstanceUID"], "SR"),
                             dicom.BASIC_TEXT_SR, dicom.sop_uid("a" * 64, "SR"))  # fmt: skip
    after = dicom.text_sr(amended, STUDY, "b" * 64, 2, pred)
    ds = pydicom.dcmread(io.BytesIO(after))
    assert ds.SOPClassUID == dicom.BASIC_TEXT_SR and ds.VerificationFlag == "VERIFIED"
    assert ds.VerifyingObserverSequence[0].VerifyingObserverName == "HOUSE^GREGORY"
    ref = ds.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == dicom.sop_uid("a" * 64, "SR")
    assert [c.TextValue for c in ds.ContentSequence if c.ValueType == "TEXT"] == ["Amended:\nno nodule\nStable"]
    assert pydicom.dcmread(io.BytesIO(before)).CompletionFlag == "PARTIAL"
    assert dicom.text_sr(amended, STUDY, "b" * 64, 2, pred) == after  # the same message, the same object
    for data in (before, after):
        report = dciodvfy(data, tmp_path)
        assert "Error" not in report, report


def test_encapsulated_pdf_is_valid_and_holds_the_document(tmp_path):
    pdf = tiny_pdf("Report")
    r = parse_report(oru("C1", "P1", "ACC1", "20190301101500", pdf=pdf).encode())
    data = dicom.encapsulated_pdf(r, STUDY, "c" * 64, 1)
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.Modality == "DOC" and ds.EncapsulatedDocument[: ds.EncapsulatedDocumentLength] == pdf
    report = dciodvfy(data, tmp_path)
    assert "Error" not in report, report


def test_non_latin_text_survives_into_the_sr():
    r = parse_report(oru("C1", "P1", "ACC1", "20190301", ["Заключение: без патологии"], charset="8859/5")
                     .encode("iso8859-5"))  # fmt: skip
    ds = pydicom.dcmread(io.BytesIO(dicom.text_sr(r, STUDY, "d" * 64, 1, None)))
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert ds.ContentSequence[-1].TextValue == "Заключение: без патологии"


def _studies():
    import pandas as pd

    return pd.DataFrame(
        [
            {**STUDY, "IssuerOfPatientID": "HOSP"},
            {**STUDY, "StudyInstanceUID": "1.2.2", "PatientID": "P2", "PatientName": "ROE^RICHARD"},  # same accession
            {**STUDY, "StudyInstanceUID": "1.2.3", "AccessionNumber": "ACC3", "PatientID": "NEW-7"},
            {**STUDY, "StudyInstanceUID": "1.2.4", "AccessionNumber": "ACC4"},
            {**STUDY, "StudyInstanceUID": "1.2.5", "AccessionNumber": "ACC4"},
        ]
    )


def test_a_report_matches_by_accession_number_and_patient():
    from include.pacs_migration.reports.place import match
    from include.pacs_migration.rules.model import Crosswalk

    def m(accession, pid, issuer="HOSP", crosswalk=None):
        report = parse_report(oru("C", pid, accession, "20190301", ["x"], issuer=issuer).encode())
        study, why = match(report, _studies(), crosswalk)
        return (study or {}).get("StudyInstanceUID"), why

    assert m("ACC1", "P1") == (STUDY["StudyInstanceUID"], "")  # the patient tells the two ACC1 studies apart
    assert m("ACC1", "P2", issuer="") == ("1.2.2", "")
    assert m("ACC1", "P1", issuer="OTHER") == (None, "REPORT_NO_MATCHING_STUDY")  # another issuer's P1
    assert m("ACC1", "P9") == (None, "REPORT_NO_MATCHING_STUDY")  # the accession number alone is not enough
    assert m("ACC4", "P1") == (None, "REPORT_AMBIGUOUS_MATCH")
    assert m("ACC3", "OLD-7") == (None, "REPORT_NO_MATCHING_STUDY")
    walk = Crosswalk({("OLD-7", "HOSP"): ("NEW-7", "")})  # the archive holds the crosswalked ID
    assert m("ACC3", "OLD-7", crosswalk=walk) == ("1.2.3", "")


def test_references_of_a_kos_and_a_gsps_but_not_of_procedure_steps():
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from include.pacs_migration.references import is_referencing, referenced_uids

    def ref(uid):
        d = Dataset()
        d.ReferencedSOPClassUID, d.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", uid
        return d

    ds = Dataset()
    ds.SOPInstanceUID = "9.9"
    series = Dataset()
    series.ReferencedImageSequence = Sequence([ref("1.1"), ref("1.2")])
    ds.ReferencedSeriesSequence = Sequence([series])
    item = Dataset()
    item.ReferencedSOPSequence = Sequence([ref("1.3")])
    ds.ContentSequence = Sequence([item])
    ds.ReferencedPerformedProcedureStepSequence = Sequence([ref("5.5")])  # an MPPS, not an archived instance
    ds.ReferencedStudySequence = Sequence([ref("6.6")])
    me = Dataset()
    me.ReferencedSOPSequence = Sequence([ref("9.9")])
    ds.PredecessorDocumentsSequence = Sequence([me])
    assert referenced_uids(ds) == {"1.1", "1.2", "1.3"}
    assert is_referencing("1.2.840.10008.5.1.4.1.1.11.1") and is_referencing("1.2.840.10008.5.1.4.1.1.88.59")
    assert not is_referencing("1.2.840.10008.5.1.4.1.1.2") and not is_referencing(None)
