"""More than pixels, for the demo archive: presentation states and key
object selections on its CT studies, a second study under a reused
accession number, and the RIS's export of HL7 v2 ORU^R01 reports (with the
quirks of a legacy RIS: repeated OBX lines, ``~`` and ``\\.br\\`` breaks,
escapes, a PDF, a Cyrillic report in ISO 8859-5, an amendment, a report for
a study that never existed, a broken message)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
REPORT_PDF = (
    "Radiology report\nExamination: CR chest, two views\nFindings: lungs clear, no effusion.\n"
    "Heart size normal.\nImpression: no acute cardiopulmonary disease.\nSigned: G. House, MD (final)"
)
KOS = "1.2.840.10008.5.1.4.1.1.88.59"


@dataclass(frozen=True)
class Study:
    folder: str  # e.g. 20190302/CT00
    study_uid: str
    accession: str
    patient_id: str
    patient_name: str
    study_time: str
    series: dict[str, list[tuple[str, str]]]  # series UID -> [(SOP class, SOP instance UID)] in file order


@dataclass
class Clinical:
    """What was added, and what each report message should become."""

    gsps: str = ""  # SOP Instance UIDs
    kos: str = ""
    dangling: str = ""  # a SOP Instance UID the KOS names that no archive holds
    corrupted: str = ""  # the truncated CT instance the GSPS names
    ambiguous_study: str = ""  # the second study under a reused accession number
    messages: dict[str, str] = field(default_factory=dict)  # name -> the expected state or reason code
    files: list[str] = field(default_factory=list)


def studies(root: Path, da: str) -> dict[str, Study]:
    """The archive's studies of one date, by folder name (CT00, MR01...)."""
    out = {}
    for folder in sorted(p for p in (root / da).iterdir() if p.is_dir()):
        series: dict[str, list[tuple[str, str]]] = {}
        first = None
        for path in sorted(folder.rglob("*.dcm")):
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            first = first or ds
            series.setdefault(str(ds.SeriesInstanceUID), []).append((str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
        if first is not None:
            out[folder.name] = Study(
                f"{da}/{folder.name}",
                str(first.StudyInstanceUID),
                str(first.get("AccessionNumber", "")),
                str(first.PatientID),
                str(first.PatientName),
                str(first.get("StudyTime", "")),
                series,
            )
    return out


def _base(study_file: Path, sop_class: str, modality: str, series_uid: str, sop_uid: str) -> Dataset:
    src = pydicom.dcmread(study_file, stop_before_pixels=True, force=True)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
               "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID"):  # fmt: skip
        setattr(ds, kw, src.get(kw))
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = modality, series_uid, 90
    ds.Manufacturer = "LEGACY WORKSTATION"
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = str(src.StudyDate), "120000"
    return ds


def _save(ds: Dataset, path: Path) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.8.498.1")
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _image_ref(sop_class: str, sop_uid: str) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = sop_class, sop_uid
    return ref


def add_gsps(root: Path, study: Study, series_uid: str, seed: str) -> str:
    """A grayscale softcopy presentation state on every image of one series."""
    sop = generate_uid(entropy_srcs=[seed, study.study_uid, "gsps"])
    first = sorted((root / study.folder).rglob("*.dcm"))[0]
    ds = _base(first, GSPS, "PR", generate_uid(entropy_srcs=[seed, study.study_uid, "pr-series"]), sop)
    ds.ContentLabel, ds.ContentDescription = "WINDOW", "Lung window"
    ds.PresentationCreationDate, ds.PresentationCreationTime = ds.ContentDate, ds.ContentTime
    ds.ContentCreatorName = "TECH^LEGACY"
    ref_series = Dataset()
    ref_series.SeriesInstanceUID = series_uid
    ref_series.ReferencedImageSequence = Sequence([_image_ref(c, u) for c, u in study.series[series_uid]])
    ds.ReferencedSeriesSequence = Sequence([ref_series])
    area = Dataset()
    area.DisplayedAreaTopLeftHandCorner, area.DisplayedAreaBottomRightHandCorner = [1, 1], [128, 128]
    area.PresentationSizeMode = "SCALE TO FIT"
    area.PresentationPixelSpacing = [0.66, 0.66]
    ds.DisplayedAreaSelectionSequence = Sequence([area])
    voi = Dataset()
    voi.WindowCenter, voi.WindowWidth = "-600", "1500"
    ds.SoftcopyVOILUTSequence = Sequence([voi])
    ds.PresentationLUTShape = "IDENTITY"
    _save(ds, root / study.folder.replace("/CT", "/PR") / "s1" / "0001.dcm")
    return sop


def add_kos(root: Path, study: Study, picks: list[tuple[str, str, str]], seed: str) -> str:
    """A key object selection ("Of Interest") naming ``picks`` (series UID, SOP class, SOP instance)."""
    sop = generate_uid(entropy_srcs=[seed, study.study_uid, "kos"])
    first = sorted((root / study.folder).rglob("*.dcm"))[0]
    ds = _base(first, KOS, "KO", generate_uid(entropy_srcs=[seed, study.study_uid, "ko-series"]), sop)
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    by_series: dict[str, list[Dataset]] = {}
    for series_uid, cls, uid in picks:
        by_series.setdefault(series_uid, []).append(_image_ref(cls, uid))
    evidence = Dataset()
    evidence.StudyInstanceUID = study.study_uid
    refs = []
    for series_uid, items in by_series.items():
        s = Dataset()
        s.SeriesInstanceUID, s.ReferencedSOPSequence = series_uid, Sequence(items)
        refs.append(s)
    evidence.ReferencedSeriesSequence = Sequence(refs)
    ds.CurrentRequestedProcedureEvidenceSequence = Sequence([evidence])
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.ConceptNameCodeSequence = Sequence([_code("113000", "DCM", "Of Interest")])
    template = Dataset()
    template.MappingResource, template.TemplateIdentifier = "DCMR", "2010"
    ds.ContentTemplateSequence = Sequence([template])
    items = []
    for _series, cls, uid in picks:
        item = Dataset()
        item.RelationshipType, item.ValueType = "CONTAINS", "IMAGE"
        item.ReferencedSOPSequence = Sequence([_image_ref(cls, uid)])
        items.append(item)
    ds.ContentSequence = Sequence(items)
    _save(ds, root / study.folder.replace("/CT", "/KO") / "s1" / "0001.dcm")
    return sop


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


def add_reused_accession(root: Path, study: Study, seed: str) -> str:
    """A second study of the same patient under the same accession number (a RIS that reused one)."""
    new_study = generate_uid(entropy_srcs=[seed, study.study_uid, "reused-accession"])
    target = root / (study.folder + "R")
    for path in sorted((root / study.folder).rglob("*.dcm"))[:2]:
        ds = pydicom.dcmread(path, force=True)
        ds.StudyInstanceUID = new_study
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[new_study, "s1"])
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[new_study, path.name])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyTime = "235900"
        out = target / "s1" / path.name
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out, enforce_file_format=True)
    return new_study


def tiny_pdf(text: str) -> bytes:
    """A one-page PDF showing ``text`` (ASCII; one line per ``\\n``)."""
    lines = text.split("\n")
    shown = " ".join(f"({line}) Tj 0 -26 Td" for line in lines)
    stream = zlib.compress(f"BT /F1 18 Tf 72 720 Td {shown} ET".encode())
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = b"%PDF-1.4\n"
    offsets = []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return out


def oru_message(
    control_id: str,
    patient_id: str,
    accession: str,
    observed: str,
    lines: list[str] | None = None,
    status: str = "F",
    issuer: str = "HOSP",
    charset: str = "",
    reported: str | None = None,
    interpreter: str = "4711&HOUSE&GREGORY",
    pdf: bytes | None = None,
    name: str = "DOE^JANE",
    procedure: str = "CTCHEST^CT chest with contrast",
    segment_end: str = "\r",
) -> str:
    """One ORU^R01 as a legacy RIS writes it; ``lines``: OBX-5 text values (each may
    hold ``~`` repetitions or ``\\.br\\``), ``pdf``: an ED observation in base64."""
    reported = reported or observed
    msh = ["MSH", "^~\\&", "RIS", "HOSP", "PACSMIG", "HOSP", reported, "", "ORU^R01", control_id, "P", "2.5"]
    msh += [""] * 5 + [charset]  # MSH-13..17, then MSH-18
    segs = [
        "|".join(msh),
        f"PID|1||{patient_id}^^^{issuer}^MR||{name}||19600101|F",
        f"OBR|1|PL{control_id}|{accession}|{procedure}|||{observed}|||||||||||||||{reported}|||{status}"
        f"|||||||{interpreter}",
    ]
    for i, text in enumerate(lines or [], 1):
        segs.append(f"OBX|{i}|TX|GDT^Report text||{text}||||||{status}")
    if pdf is not None:
        data = base64.b64encode(pdf).decode()
        segs.append(f"OBX|{len(segs) - 2}|ED|PDF^Report PDF||^application^pdf^Base64^{data}||||||{status}")
    return segment_end.join(segs) + segment_end


def oru(
    control_id: str,
    study: Study,
    lines: list[str] | None = None,
    status: str = "F",
    charset: str = "",
    reported: str | None = None,
    pdf: bytes | None = None,
    accession: str | None = None,
) -> str:
    """One ORU^R01 for ``study`` of the demo archive (examined at its StudyTime, reported that evening)."""
    da = study.folder.split("/")[0]
    return oru_message(
        control_id,
        study.patient_id,
        study.accession if accession is None else accession,
        f"{da}{study.study_time[:6]}",
        lines,
        status,
        "",
        charset,
        reported or f"{da}235000",
        pdf=pdf,
        name=study.patient_name,
        procedure="CT^Imaging study",
    )


def ris_export(
    root: Path, folder: Path, dates: list[str], quirks: bool = True, quirks_on: str | None = None
) -> dict[str, tuple[str, bytes]]:
    """Reports for the archive's studies of ``dates``, written to ``folder`` as
    a RIS exports them (one file per message, names that say nothing).
    Returns name -> (expected outcome, message bytes): ``migrated``, a reason
    code, for every message (those not written to the folder are for the MLLP
    listener: ``live-*``). With ``quirks``: the unusual ones too, on the date
    ``quirks_on`` (default: the first)."""
    quirks_on = quirks_on or dates[0]
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, tuple[str, bytes]] = {}
    n = 0
    for da in dates:
        found = studies(root, da)
        reused = [s for name, s in found.items() if name.endswith("R")]
        shared = {found[s.folder.split("/")[1][:-1]].study_uid for s in reused}  # under a reused accession number
        plain = [s for name, s in found.items() if name[:2] not in ("PR", "KO") and not name.endswith("R")]
        for i, study in enumerate(plain):
            if i % 7 == 6 or study.study_uid in shared:
                continue  # not every study has its report yet (the assessment lists them)
            n += 1
            text = [f"CLINICAL INDICATION: follow-up {n}\\.br\\FINDINGS:", "No acute findings~Stable appearance",
                    "IMPRESSION: \\T\\ normal study"]  # fmt: skip
            out[f"report-{n:03d}"] = ("migrated", oru(f"MSG{n:05d}", study, text).encode("iso8859-1"))
        if not quirks or not plain or da != quirks_on:
            continue
        first, second = plain[0], plain[1]
        out["amended"] = (
            "migrated",
            oru("MSG-AMD", first, ["ADDENDUM: a 4 mm nodule, right lower lobe~Follow-up CT in 12 months"],
                status="C", reported=f"{da}235500").encode(),
        )  # fmt: skip
        pdf = tiny_pdf(REPORT_PDF)
        out["pdf"] = ("migrated", oru("MSG-PDF", second, pdf=pdf, reported=f"{da}235200").encode())
        cyr = oru("MSG-CYR", plain[2], ["Заключение: патологических изменений не выявлено"], charset="8859/5")
        out["cyrillic"] = ("migrated", cyr.encode("iso8859-5"))
        ghost = Study(first.folder, "", "ACC99999999", "NOBODY0001", "NOBODY^NOONE", "090000", {})
        out["no-study"] = ("REPORT_NO_MATCHING_STUDY", oru("MSG-GHOST", ghost, ["Report without an exam"]).encode())
        broken = oru("MSG-BROKEN", first, ["x"]).replace("|F|||||||4711", "|Z|||||||4711")  # OBR-25 Z: no status
        out["broken"] = ("HL7_PARSE_ERROR:OBR", broken.encode())
        if reused:
            base = found[reused[0].folder.split("/")[1][:-1]]
            out["ambiguous"] = ("REPORT_AMBIGUOUS_MATCH", oru("MSG-AMB", base, ["Which exam?"]).encode())
        out["live-final"] = ("migrated", oru("MSG-LIVE1", plain[3], ["Pushed live: no change"]).encode())
        out["live-malformed"] = ("HL7_PARSE_ERROR:MSH", b"MSH|^~\\&|RIS|HOSP\rthis is not an HL7 message\r")
    for name, (_want, data) in out.items():
        if not name.startswith("live-"):
            (folder / f"{hashlib.sha256(name.encode()).hexdigest()[:12]}.hl7").write_bytes(data)
    return out


def add_clinical(root: Path, da: str, dangling: bool, seed: str = "clinical") -> Clinical:
    """GSPS and KOS on the date's first CT study (the GSPS on its first series,
    which holds the archive's truncated instance on the demo's second day;
    the KOS on its second series, and with ``dangling`` on an instance no
    archive holds), and a study under a reused accession number."""
    found = studies(root, da)
    ct = found["CT00"]
    series = list(ct.series)
    out = Clinical()
    out.gsps = add_gsps(root, ct, series[0], seed)
    picks = [(series[1], c, u) for c, u in ct.series[series[1]][:2]]
    if dangling:
        out.dangling = generate_uid(entropy_srcs=[seed, "never-archived"])
        picks.append((series[1], ct.series[series[1]][0][0], out.dangling))
    out.kos = add_kos(root, ct, picks, seed)
    out.ambiguous_study = add_reused_accession(root, found["CT01"], seed)
    return out


def date_folder(day: dt.date) -> str:
    return day.strftime("%Y%m%d")
