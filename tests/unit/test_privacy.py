"""PHI hygiene of the core: values invalid for their VR never reach a log, the
patient key is keyed, staging is private, pynetdicom's temporaries never stay."""

from __future__ import annotations

import hashlib
import io
import logging
import os

import pydicom
import pytest
from pydicom.data import get_testdata_file

from include.pacs_migration.dimse.staging import StagingSink
from include.pacs_migration.logs import configure_logging
from include.pacs_migration.normalize import normalize
from include.pacs_migration.privacy import MissingSecret, PatientKeyer, identity_digest
from include.pacs_migration.rules import parse_ruleset
from include.pacs_migration.staging import StagingNotPrivate, attempt_folder, private_root
from include.pacs_migration.steps import Services

AGE, BIRTH = "093 years", "19x70229"  # invalid for AS and DA: pydicom's WARN mode would quote them


def _ct() -> bytes:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientID = "4711006"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_a_rule_setting_a_value_invalid_for_its_vr_logs_no_value(caplog, capfd, recwarn):
    """A site rule sets PatientAge and PatientBirthDate to values invalid for
    their VR: pydicom (writing validation in WARN mode) logged them before."""
    configure_logging()
    rules = parse_ruleset(
        {
            "id": "canary",
            "version": 1,
            "invalid_values": "keep",
            "over_long_values": "truncate",
            "rules": [
                {"id": "age", "action": "set", "tag": "PatientAge", "value": AGE},
                {"id": "birth", "action": "set", "tag": "PatientBirthDate", "value": BIRTH},
            ],
        }
    )
    caplog.set_level(logging.DEBUG)
    logging.getLogger("pydicom").setLevel(logging.DEBUG)  # even when someone turns it up again...
    try:
        result = normalize(_ct(), ruleset=rules)
    finally:
        configure_logging()
    out, err = capfd.readouterr()
    text = "\n".join(r.getMessage() for r in caplog.records) + out + err + "".join(str(w.message) for w in recwarn)
    assert result.reason is None and result.data is not None
    assert pydicom.dcmread(io.BytesIO(result.data)).PatientAge.strip() == "093"  # truncated to AS's 4 characters
    assert "093" not in text and BIRTH not in text


def test_the_patient_key_is_keyed_and_needs_its_secret():
    digest = identity_digest("4711006", "")
    a, b = PatientKeyer.from_secret("a" * 32), PatientKeyer.from_secret("b" * 32)
    assert digest == hashlib.sha256(b"4711006\x1f").hexdigest()  # what brute force would search for
    assert a.key(digest) != digest and a.key(digest).startswith("h1:")
    assert a.key(digest) != b.key(digest)  # without the secret the key says nothing
    assert a.key_of(" 4711006 ") == a.key(digest)
    with pytest.raises(MissingSecret, match="pacs_patient_key_secret"):
        PatientKeyer.from_secret(None)
    with pytest.raises(MissingSecret, match="shorter than 16 bytes"):
        PatientKeyer.from_secret("short")
    with pytest.raises(MissingSecret, match="pacs_patient_key_secret"):
        Services(config=None, store=None, max_associations=1).keyer()  # type: ignore[arg-type]


def test_a_normalized_instance_carries_no_unkeyed_patient_key():
    result = normalize(_ct())
    assert not hasattr(result, "patient_key")  # only the digest, keyed by the load into the manifest
    assert result.patient_digest == identity_digest("4711006", "")


def test_staging_is_private(tmp_path):
    configure_logging()
    root = tmp_path / "staging"
    with attempt_folder(root, "date=2019-03-01/modality=CT", "run-1") as folder:
        (folder / "00000001.dcm").write_bytes(b"x")
        assert oct(root.stat().st_mode & 0o777) == "0o700"
        assert oct(folder.stat().st_mode & 0o777) == "0o700"
        assert oct((folder / "00000001.dcm").stat().st_mode & 0o777) == "0o600"
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    assert oct(private_root(shared).stat().st_mode & 0o777) == "0o700"  # our own: narrowed
    link = tmp_path / "link"
    link.symlink_to(shared)
    with pytest.raises(StagingNotPrivate, match="symlink"):
        private_root(link)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to make a folder another user owns")
def test_a_staging_folder_of_another_user_is_refused(tmp_path):
    planted = tmp_path / "planted"
    planted.mkdir()
    os.chown(planted, 65534, 65534)
    with pytest.raises(StagingNotPrivate, match="owned by uid 65534"):
        private_root(planted)


@pytest.mark.parametrize("failure", ["success", "duplicate", "open", "write", "full", "network"])
def test_a_streamed_store_leaves_no_partial_file_on_any_path(tmp_path, failure, caplog, monkeypatch):
    """C-GET streams an instance into staging as it arrives: whatever happens
    (an identical re-arrival, staging cannot open or write the file, the disk
    fills, the association breaks mid-instance) no partial file stays; every
    fragment is taken, so the association stays in step; the log names no value."""
    import errno

    import include.pacs_migration.dimse.staging as staging_module
    from include.pacs_migration.dimse import DicomNetworkError

    sink = StagingSink(tmp_path / "staged")
    data = _ct()
    taken: list[int] = []

    def chunks(broken: bool = False):
        for at in range(0, len(data), 1000):
            taken.append(at)
            if broken and at >= 2000:
                raise DicomNetworkError("the association broke")
            yield memoryview(data)[at : at + 1000]

    store = lambda c: sink.store_stream("1.2.3", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", c)  # noqa: E731
    if failure == "duplicate":
        assert store(chunks()) == 0
    if failure == "open":
        monkeypatch.setattr(sink, "_next_path", lambda: tmp_path / "gone" / "00000001.dcm")
    if failure in ("write", "full"):
        code = errno.EIO if failure == "write" else errno.ENOSPC

        class Failing(io.FileIO):
            def write(self, b):  # the first fragment lands, the second fails
                if self.tell():
                    raise OSError(code, os.strerror(code))
                return super().write(b)

        monkeypatch.setattr(staging_module, "open", Failing, raising=False)
    taken.clear()
    if failure == "network":
        with pytest.raises(DicomNetworkError):
            store(chunks(broken=True))
    else:
        assert store(chunks()) == (0xA700 if failure in ("open", "write", "full") else 0)
        assert len(taken) == -(-len(data) // 1000)  # every fragment taken
    leftovers = sorted(p.name for p in (tmp_path / "staged").iterdir())
    assert not [n for n in leftovers if n.endswith(".part")]
    assert leftovers == (["00000001.dcm"] if failure in ("success", "duplicate") else [])
    assert sink.full == (failure == "full")
    if failure == "success":
        got = sink.received["1.2.3"]
        assert (
            got.path.read_bytes() == data and got.sha256 == hashlib.sha256(data).hexdigest() and got.size == len(data)
        )
    assert "Traceback" not in caplog.text and "4711006" not in caplog.text
