"""The rule engine: YAML validation, each kind of rule, conditions, and the
provenance every change leaves in the Original Attributes Sequence."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom import config as pydicom_config
from pydicom.data import get_testdata_file

from include.pacs_migration.normalize import normalize
from include.pacs_migration.rules import RuleSetError, load_ruleset, parse_ruleset

RULES = Path(__file__).resolve().parents[2] / "include" / "config" / "rules"


def _file(name="CT_small.dcm", **attrs) -> bytes:
    ds = pydicom.dcmread(get_testdata_file(name))
    for k, v in attrs.items():
        setattr(ds, k, v)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _ruleset(**extra):
    return parse_ruleset({"id": "t", "version": "1", **extra}, RULES)


def _out(result) -> pydicom.Dataset:
    assert result.reason is None, result.reason
    return pydicom.dcmread(io.BytesIO(result.data))


def _original(ds, keyword):
    """Old value of ``keyword`` recorded in the Original Attributes Sequence."""
    for item in ds.OriginalAttributesSequence:
        for mod in item.get("ModifiedAttributesSequence", []):
            if keyword in mod:
                return mod[keyword].value, item
        for nc in item.get("NonconformingModifiedAttributesSequence", []):
            if pydicom.datadict.keyword_for_tag(nc.SelectorAttribute) == keyword:
                return nc.NonconformingDataElementValue.rstrip(b"\x00").decode(), item
    raise AssertionError(f"{keyword} not in OriginalAttributesSequence")


def test_shipped_rule_sets_validate():
    assert load_ruleset(RULES / "site-default.yaml").label == "site-default@1"
    example = load_ruleset(RULES / "example-site.yaml")
    assert example.crosswalk is not None and len(example.rules) == 6


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"id": "t"}, "^version"),
        (
            {"id": "t", "version": 1, "rules": [{"id": "r1", "action": "paint", "tag": "StationName"}]},
            "rule 'r1'.action",
        ),
        (
            {"id": "t", "version": 1, "rules": [{"id": "r1", "action": "set", "tag": "StationNam", "value": "x"}]},
            "rule 'r1'.tag",
        ),
        (
            {"id": "t", "version": 1, "rules": [{"id": "r1", "action": "set", "tag": "SOPInstanceUID", "value": "1"}]},
            "rule 'r1'.tag: SOPInstanceUID may not be changed",
        ),
        (
            {
                "id": "t",
                "version": 1,
                "rules": [{"id": "r1", "action": "regex", "tag": "StationName", "pattern": "(", "replacement": ""}],
            },
            "rule 'r1'.pattern",
        ),
        ({"id": "t", "version": 1, "rules": [{"id": "r1", "action": "set", "tag": "StationName"}]}, "rule 'r1'.value"),
        (
            {
                "id": "t",
                "version": 1,
                "rules": [{"id": "r1", "action": "delete", "tag": "StationName", "when": {"Modalty": "CT"}}],
            },
            "rule 'r1'.when.Modalty",
        ),
        (
            {
                "id": "t",
                "version": 1,
                "rules": [
                    {"id": "r1", "action": "delete", "tag": "StationName"},
                    {"id": "r1", "action": "delete", "tag": "StationName"},
                ],
            },
            "duplicate rule id",
        ),
        ({"id": "t", "version": 1, "private_tags": {"policy": "keep_listed"}}, "private_tags.keep_creators"),
        ({"id": "t", "version": 1, "crosswalk": {"file": "missing.csv"}}, "crosswalk.file"),
        ({"id": "t", "version": 1, "colour": "blue"}, "unknown field"),
    ],
)
def test_invalid_rule_sets_fail_naming_rule_and_field(data, message):
    with pytest.raises(RuleSetError, match=message):
        parse_ruleset(data, RULES)


def test_set_prefix_suffix_regex_delete_with_conditions():
    rs = _ruleset(
        rules=[
            {"id": "inst", "action": "set", "tag": "InstitutionName", "value": "St Elsewhere"},
            {
                "id": "ct-station",
                "when": {"Modality": "CT", "StationName": "re:.*"},
                "action": "prefix",
                "tag": "StationName",
                "value": "SE-",
            },
            {"id": "mr-only", "when": {"Modality": "MR"}, "action": "set", "tag": "StudyDescription", "value": "MR"},
            {
                "id": "acc",
                "when": {"source_ae": "re:LEGACY.*"},
                "action": "suffix",
                "tag": "AccessionNumber",
                "value": "-L",
            },
            {"id": "proto", "action": "regex", "tag": "ProtocolName", "pattern": "\\s+", "replacement": "_"},
            {"id": "op", "action": "delete", "tag": "OperatorsName"},
        ]
    )
    raw = _file(
        StationName="CT01",
        AccessionNumber="A1",
        ProtocolName="head  routine",
        OperatorsName="Op^Erator",
        StudyDescription="orig",
    )
    result = normalize(raw, ruleset=rs, source_ae="LEGACYPACS")
    out = _out(result)
    assert out.InstitutionName == "St Elsewhere"
    assert out.StationName == "SE-CT01"
    assert out.StudyDescription == "orig"  # condition Modality == MR did not hold
    assert out.AccessionNumber == "A1-L"
    assert out.ProtocolName == "head_routine"
    assert "OperatorsName" not in out
    assert _original(out, "StationName")[0] == "CT01"
    old, item = _original(out, "OperatorsName")
    assert str(old) == "Op^Erator"
    assert item.ReasonForTheAttributeModification == "COERCE"
    assert item.ModifyingSystem == "pacs-migration t@1" and item.SourceOfPreviousValues == "LEGACYPACS"
    assert result.rules_applied == ["acc", "ct-station", "inst", "op", "proto"]
    # The source AE condition: another source, no suffix.
    assert _out(normalize(raw, ruleset=rs, source_ae="OTHER")).AccessionNumber == "A1"
    # Pixel data untouched.
    assert result.pixel_sha256_before == result.pixel_sha256_after


def test_reject_rule_quarantines():
    rs = _ruleset(rules=[{"id": "no-test", "when": {"PatientID": "re:^TEST.*"}, "action": "reject"}])
    assert normalize(_file(PatientID="TEST123"), ruleset=rs).reason == "RULE_REJECTED:no-test"
    assert normalize(_file(PatientID="REAL1"), ruleset=rs).reason is None


def test_crosswalk_maps_patient_id_and_issuer(tmp_path):
    (tmp_path / "cw.csv").write_text("old_patient_id,old_issuer,new_patient_id,new_issuer\nOLD1,,MPI-9,HOSP\n")
    rs = parse_ruleset(
        {"id": "t", "version": "1", "crosswalk": {"file": "cw.csv", "on_missing": "quarantine"}}, tmp_path
    )
    out = _out(normalize(_file(PatientID="OLD1"), ruleset=rs))
    assert (out.PatientID, out.IssuerOfPatientID) == ("MPI-9", "HOSP")
    old, item = _original(out, "PatientID")
    assert old == "OLD1" and item.ReasonForTheAttributeModification == "COERCE"
    assert normalize(_file(PatientID="UNKNOWN"), ruleset=rs).reason == "RULE_REJECTED:crosswalk"


@pytest.mark.parametrize("policy", ["remove", "keep_listed"])
def test_private_tag_policies(policy):
    raw = _file()
    ds = pydicom.dcmread(io.BytesIO(raw))
    creators = sorted({str(e.value) for e in ds if e.tag.is_private and 0x10 <= e.tag.element <= 0xFF})
    keep = creators[:1]
    rs = _ruleset(private_tags={"policy": policy, **({"keep_creators": keep} if policy == "keep_listed" else {})})
    result = normalize(raw, ruleset=rs)
    out = _out(result)
    remaining = {str(e.value) for e in out if e.tag.is_private and 0x10 <= e.tag.element <= 0xFF}
    assert remaining == (set() if policy == "remove" else set(keep))
    assert any(c.startswith("private:removed:") for c in result.changes)


def test_retired_sop_class_is_mapped_and_meta_follows():
    raw = _file(SOPClassUID="1.2.840.10008.5.1.4.1.1.6")  # US Image Storage (Retired)
    out = _out(normalize(raw, ruleset=_ruleset()))
    assert out.SOPClassUID == "1.2.840.10008.5.1.4.1.1.6.1"
    assert out.file_meta.MediaStorageSOPClassUID == out.SOPClassUID
    assert _original(out, "SOPClassUID")[0] == "1.2.840.10008.5.1.4.1.1.6"


def test_dates_times_and_over_long_values_are_corrected_and_kept():
    raw = _file(StudyDate="2019/03/01", StudyTime="12:30:45", InstitutionName="X" * 80)
    result = normalize(raw, ruleset=_ruleset())
    out = _out(result)
    assert (out.StudyDate, out.StudyTime, out.InstitutionName) == ("20190301", "123045", "X" * 64)
    assert _original(out, "StudyDate")[0] == "2019/03/01"  # nonconforming: kept as bytes
    assert _original(out, "InstitutionName")[0] == "X" * 80
    # The output, OAS included, passes pydicom's strict validation.
    pydicom_config.settings.reading_validation_mode = pydicom_config.RAISE
    try:
        strict = pydicom.dcmread(io.BytesIO(result.data))
        for elem in strict.iterall():
            _ = elem.value
    finally:
        pydicom_config.settings.reading_validation_mode = pydicom_config.WARN
    assert normalize(raw, ruleset=_ruleset(over_long_values="quarantine")).reason == "RULE_REJECTED:over-long-values"


def test_character_set_repair_and_reencode():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Müller^Jürgen"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    # Mis-declared: UTF-8 bytes under the default repertoire (same length).
    raw = buf.getvalue().replace(b"ISO_IR 192", b"ISO_IR 6  ")
    out = _out(normalize(raw, ruleset=_ruleset()))
    assert out.SpecificCharacterSet == "ISO_IR 192" and str(out.PatientName) == "Müller^Jürgen"
    # Latin-1 declared and encoded, re-encoded as UTF-8 on request.
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Müller^Jürgen"  # a fresh value, encoded with the new declaration
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert "Müller".encode("latin-1") in buf.getvalue()
    result = normalize(buf.getvalue(), ruleset=_ruleset(character_set={"reencode_utf8": True}))
    out = _out(result)
    assert out.SpecificCharacterSet == "ISO_IR 192" and str(out.PatientName) == "Müller^Jürgen"
    assert "Müller".encode() in result.data


def test_invalid_values_quarantined_by_default_kept_on_request():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SeriesNumber = "77"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    raw = buf.getvalue().replace(b"IS\x02\x0077", b"IS\x02\x007A", 1)
    assert b"7A" in raw
    assert normalize(raw, ruleset=_ruleset()).reason == "RULE_REJECTED:invalid-values"
    assert normalize(raw, ruleset=_ruleset(invalid_values="keep")).reason is None


def test_dry_run_counts_without_values(tmp_path):
    import json
    import subprocess
    import sys

    from include.pacs_migration.dryrun import dry_run

    files = [
        _file(PatientID="OLD1", StationName="CT01", OperatorsName="Op^Erator"),
        _file(PatientID="TEST9"),
        b"not dicom",
    ]
    for i, data in enumerate(files):
        (tmp_path / f"{i}.dcm").write_bytes(data)
    rs = load_ruleset(RULES / "example-site.yaml")
    report = dry_run(files, rs, "LEGACYPACS")
    assert (report.files, report.would_migrate) == (3, 1)
    assert report.would_quarantine == {"RULE_REJECTED:reject-test-patients": 1, "NOT_DICOM": 1}
    assert report.rules["drop-operator"] == 1 and report.attributes["institution-name:InstitutionName"] == 1
    # The CLI says the same, and prints no attribute values.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "include.cli",
            "dry-run",
            "--rules",
            str(RULES / "example-site.yaml"),
            "--source-ae",
            "LEGACYPACS",
            "--json",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == report.to_json()
    assert "Op^Erator" not in proc.stdout and "CT01" not in proc.stdout


# ---- the rule passes decode only what can matter: same verdicts as decoding everything


def _decode_everything_verdicts(ds: pydicom.Dataset) -> tuple[str | None, set, set]:
    """What the rule passes would find if every value were decoded (the slow,
    obvious way): first invalid value, over-long candidates, dates to fix."""
    from include.pacs_migration.rules import MAX_LENGTH, is_conformant
    from include.pacs_migration.rules.apply import _normal_date, _normal_time, _values

    invalid = None
    for elem in ds.iterall():
        if elem.tag.is_private or elem.tag.group == 0x0002:
            continue
        if not is_conformant(elem.VR, elem.value):
            invalid = elem.keyword or str(elem.tag)
            break
    over_long, dates = set(), set()
    for elem in ds:
        limit = MAX_LENGTH.get(elem.VR)
        values = _values(elem.value) if elem.VR != "SQ" else []
        if limit is not None and any(
            len(g) > limit for v in values for g in (v.split("=") if elem.VR == "PN" else [v])
        ):
            over_long.add(elem.tag)
        if elem.VR in ("DA", "TM") and any(
            (_normal_date(v) if elem.VR == "DA" else _normal_time(v)) is not None for v in values
        ):
            dates.add(elem.tag)
    return invalid, over_long, dates


def _quirky_files() -> list[str]:
    from pydicom.data import get_testdata_files

    out = []
    for path in sorted(get_testdata_files()):
        try:
            pydicom.dcmread(path, force=True)
        except Exception:
            continue
        out.append(path)
    return out


def test_lazy_rule_passes_agree_with_decoding_everything():
    """On every pydicom test file that reads (vendor quirks, charsets, bad
    values), the first invalid value, the over-long values and the dates to fix
    found from raw bytes are those found by decoding every value; twice, so the
    cache of values found valid is exercised too."""
    from include.pacs_migration.rules import apply as rules

    files = _quirky_files()
    assert len(files) > 100
    found = {"invalid": 0, "over-long": 0, "dates": 0}
    rules._VALID.clear()
    for _round in range(2):
        for path in files:
            expected = _decode_everything_verdicts(pydicom.dcmread(path, force=True))
            ds = pydicom.dcmread(path, force=True)
            try:
                got_invalid = rules.first_invalid_value(ds)
            except Exception as exc:  # the slow way must then have failed too
                pytest.fail(f"{Path(path).name}: {exc!r}")
            lazy = pydicom.dcmread(path, force=True)
            over_tags, dates_tags = rules._to_read(lazy, rules._maybe_over_long, rules._maybe_date_to_fix)
            over, dates = set(over_tags), set(dates_tags)
            assert got_invalid == expected[0], Path(path).name
            assert expected[1] <= over, Path(path).name
            assert expected[2] <= dates, Path(path).name
            found["invalid"] += got_invalid is not None
            found["over-long"] += bool(expected[1])
            found["dates"] += bool(expected[2])
    assert all(found.values()), found  # the corpus holds each kind: the comparison is not vacuous


def _undeclared_latin1() -> bytes:
    """An undeclared Latin-1 name, the usual legacy case (not valid UTF-8)."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Müller^Jürgen"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    raw = buf.getvalue()
    assert "Müller".encode("latin-1") in raw
    ds = pydicom.dcmread(io.BytesIO(raw))
    del ds.SpecificCharacterSet  # values stay raw Latin-1 bytes, now undeclared
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert "SpecificCharacterSet" not in pydicom.dcmread(io.BytesIO(buf.getvalue()))
    return buf.getvalue()


def test_assume_character_set_declares_and_records_it():
    """Point 9: ``character_set.assume`` declares the site's legacy charset
    for undeclared non-ASCII bytes; the absent declaration is recorded."""
    raw = _undeclared_latin1()
    result = normalize(raw, ruleset=_ruleset(character_set={"assume": "ISO_IR 100"}))
    out = _out(result)
    assert out.SpecificCharacterSet == "ISO_IR 100" and str(out.PatientName) == "Müller^Jürgen"
    old, item = _original(out, "SpecificCharacterSet")
    assert old in (None, "") and item.ReasonForTheAttributeModification == "CORRECT"
    assert result.findings == [] and "rule:character-set:SpecificCharacterSet" in result.changes


def test_undeclared_non_ascii_no_option_covers_is_reported():
    raw = _undeclared_latin1()
    result = normalize(raw, ruleset=_ruleset())  # repair only: Latin-1 bytes are not UTF-8
    assert result.reason is None and result.findings == ["charset:undeclared-non-ascii"]
    assert result.data == raw  # kept as received, but not silently
    assert normalize(_file(), ruleset=_ruleset()).findings == []  # plain ASCII: nothing to report


@pytest.mark.parametrize(
    ("charset", "message"),
    [
        ({"assume": "latin-1"}, r"character_set\.assume: must be one of"),
        ({"asume": "ISO_IR 100"}, r"character_set: unknown field"),
    ],
)
def test_character_set_options_are_checked(charset, message):
    with pytest.raises(RuleSetError, match=message):
        _ruleset(character_set=charset)


def test_only_nonconforming_old_values_leave_one_empty_modified_item():
    """Point 9: the Modified Attributes Sequence (Type 1) is never empty; each
    nonconforming old value sits in its own Original Attributes item."""
    out = _out(normalize(_file(StudyDate="2019/03/01", StudyTime="12:30:45"), ruleset=_ruleset()))
    items = [i for i in out.OriginalAttributesSequence if "NonconformingModifiedAttributesSequence" in i]
    assert len(items) == 2
    for item in items:
        assert len(item.ModifiedAttributesSequence) == 1 and len(item.ModifiedAttributesSequence[0]) == 0
        assert len(item.NonconformingModifiedAttributesSequence) == 1
        assert "SelectorAttributeVR" not in item.NonconformingModifiedAttributesSequence[0]
    assert _original(out, "StudyDate")[0] == "2019/03/01" and _original(out, "StudyTime")[0] == "12:30:45"


def test_rule_regexes_run_in_linear_time():
    """Issue 15.5: a catastrophic pattern against a hostile value finishes at
    once (RE2); with a backtracking engine it would not finish (bounded here by
    a subprocess timeout)."""
    import subprocess
    import sys

    code = (
        "import io, pydicom; from pydicom.data import get_testdata_file; from pathlib import Path\n"
        "from include.pacs_migration.normalize import normalize\n"
        "from include.pacs_migration.rules import parse_ruleset\n"
        "rs = parse_ruleset({'id': 't', 'version': '1', 'rules': [{'id': 'evil', 'action': 'set', 'tag': 'StationName',"
        " 'value': 'X', 'when': {'StationName': 're:(a+)+$'}}]}, Path('.'))\n"
        "ds = pydicom.dcmread(get_testdata_file('CT_small.dcm')); ds.StationName = 'a' * 40 + '!'\n"
        "buf = io.BytesIO(); ds.save_as(buf, enforce_file_format=True)\n"
        "print(normalize(buf.getvalue(), ruleset=rs).reason)\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0 and done.stdout.strip() == "None", done.stderr[-500:]


def test_a_pattern_re2_cannot_run_names_the_rule():
    with pytest.raises(RuleSetError, match=r"rule 'backref'.pattern: .*RE2"):
        _ruleset(
            rules=[{"id": "backref", "action": "regex", "tag": "StationName", "pattern": r"(CT)\1", "replacement": "x"}]
        )


def test_one_listing_for_the_dates_and_over_long_passes_changes_what_decoding_everything_changes(monkeypatch):
    """The dates and over-long passes list the dataset once, before the dates pass (issue 22):
    on every pydicom test file that reads, and on a date both malformed and over long, the
    changes are those made when both passes read every value (listed after each other)."""
    from pydicom.dataset import Dataset

    from include.pacs_migration.rules import RuleSet
    from include.pacs_migration.rules import apply as rules
    from include.pacs_migration.rules.model import InvalidValuePolicy

    ruleset = RuleSet("t", "1", invalid_values=InvalidValuePolicy.KEEP)  # dates fixed, over-long truncated
    crafted = Dataset()
    crafted.StudyDate, crafted.StudyTime = "2019/03/01", "10:11:12"  # fixable; the date longer than DA allows
    crafted.StudyDescription, crafted.Modality = "x" * 80, "CT"  # over long (LO: 64)
    buf = io.BytesIO()
    crafted.save_as(buf, implicit_vr=False, little_endian=True)
    datasets = [lambda: pydicom.dcmread(io.BytesIO(buf.getvalue()), force=True)]
    datasets += [lambda p=path: pydicom.dcmread(p, force=True) for path in _quirky_files()]

    def changes(ds: Dataset) -> list[tuple]:
        try:
            outcome = rules.apply_ruleset(ruleset, ds)
        except Exception as exc:  # noqa: BLE001 - both ways must fail alike
            return [type(exc).__name__]
        return [(c.tag, c.rule_id, str(c.old), str(c.new)) for c in outcome.changes] + [outcome.rejected_by]

    lean = [changes(read()) for read in datasets]
    monkeypatch.setattr(rules, "_maybe_date_to_fix", lambda vr, value: True)
    monkeypatch.setattr(rules, "_maybe_over_long", lambda vr, value: True)
    assert lean == [changes(read()) for read in datasets]
    assert {c[1] for c in lean[0][:-1]} == {"dates-times", "over-long-values"}, lean[0]  # not vacuous
