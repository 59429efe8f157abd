"""Compressed syntaxes over the network, against Orthanc: by default each
instance comes back in the syntax the source stores (no silent
decompression: the encapsulated pixel bytes are identical); with
``request_uncompressed`` only uncompressed syntaxes are accepted, so the
source decompresses, or fails the sub-operation, never sends it compressed.
Also: a large instance is received streamed, with flat memory."""

from __future__ import annotations

import hashlib
import tracemalloc

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from include.pacs_migration.config import SourceConfig
from include.pacs_migration.dimse import UNCOMPRESSED_TRANSFER_SYNTAXES, StagingSink, c_get
from tests.peers import Orthanc

FILES = {
    JPEGBaseline8Bit: "SC_rgb_jpeg_dcmtk.dcm",
    JPEGLSLossless: "MR_small_jpeg_ls_lossless.dcm",
    JPEG2000Lossless: "MR_small_jp2klossless.dcm",
    JPEG2000: "JPEG2000.dcm",
    RLELossless: "MR_small_RLE.dcm",
}


def _study_query(study_uid: str) -> pydicom.Dataset:
    q = pydicom.Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = study_uid
    return q


@pytest.fixture(scope="module")
def compressed_pacs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("syntaxes")
    orthanc = Orthanc(folder / "orthanc")
    stored = {}
    for ts, name in FILES.items():
        ds = get_testdata_file(name, read=True)
        assert ds.file_meta.TransferSyntaxUID == ts
        # Own UIDs: several test files share theirs.
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"{name}"
        ds.save_as(path, enforce_file_format=True)
        orthanc.upload(path.read_bytes())
        stored[ts] = ds
    yield orthanc, stored
    orthanc.stop()


def _source(orthanc: Orthanc, **kw) -> SourceConfig:
    return SourceConfig(
        host="127.0.0.1",
        port=orthanc.dicom_port,
        called_ae_title=orthanc.ae_title,
        calling_ae_title="PACSMIGRATE",
        acse_timeout=5,
        dimse_timeout=30,
        network_timeout=30,
        **kw,
    )


@pytest.mark.parametrize("ts", list(FILES), ids=[FILES[t] for t in FILES])
def test_compressed_instances_come_back_as_stored(ts, compressed_pacs, tmp_path):
    orthanc, stored = compressed_pacs
    original = stored[ts]
    sink = StagingSink(tmp_path / "staging")
    outcome = c_get(_source(orthanc), _study_query(original.StudyInstanceUID), [original.SOPClassUID], sink)
    assert outcome.final_status == 0x0000
    got = sink.received[original.SOPInstanceUID]
    assert got.transfer_syntax_uid == ts
    received = pydicom.dcmread(got.path)
    assert received.file_meta.TransferSyntaxUID == ts
    assert received.PixelData == original.PixelData  # the encapsulated bytes, untouched


@pytest.mark.parametrize("ts", list(FILES), ids=[FILES[t] for t in FILES])
def test_request_uncompressed_never_receives_compressed(ts, compressed_pacs, tmp_path):
    orthanc, stored = compressed_pacs
    original = stored[ts]
    sink = StagingSink(tmp_path / "staging")
    outcome = c_get(
        _source(orthanc, request_uncompressed=True),
        _study_query(original.StudyInstanceUID),
        [original.SOPClassUID],
        sink,
    )
    got = sink.received.get(original.SOPInstanceUID)
    print(f"{FILES[ts]} stored {ts}: received {got.transfer_syntax_uid if got else 'nothing (sub-operation failed)'}")
    if got is None:
        # Orthanc without a JPEG 2000 decoder (no GDCM plugin) fails the
        # sub-operation instead: the instance stays missing, never compressed,
        # and named in the final response's Failed SOP Instance UID List (which
        # DCMTK appends to the command set: pynetdicom returned none).
        assert ts in (JPEG2000, JPEG2000Lossless)
        assert outcome.failed == 1 and outcome.failed_sop_instance_uids == (original.SOPInstanceUID,)
        return
    assert got.transfer_syntax_uid in UNCOMPRESSED_TRANSFER_SYNTAXES
    received = pydicom.dcmread(got.path)
    frames = int(original.get("NumberOfFrames", 1) or 1)
    assert len(received.PixelData) >= (
        original.Rows * original.Columns * original.SamplesPerPixel * original.BitsAllocated // 8 * frames
    )
    if ts == RLELossless:  # decodable here: lossless means identical pixels
        assert np.array_equal(received.pixel_array, original.pixel_array)


def test_large_instance_is_received_streamed(tmp_path):
    """A 48 MB instance through C-GET: Python's peak allocation while it is
    received and staged stays a small fraction of it (each fragment is written
    and hashed as it arrives); reading the staged file whole (the reference,
    same run) peaks above the instance size, so the tracer does see such holds."""
    template = get_testdata_file("CT_small.dcm", read=True)
    ds = template.copy()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta = FileMetaDataset(template.file_meta)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows = ds.Columns = 512
    ds.NumberOfFrames = 96
    ds.PixelData = np.random.default_rng(1).integers(0, 4096, 512 * 512 * 96, dtype=np.uint16).tobytes()
    path = tmp_path / "big.dcm"
    ds.save_as(path, enforce_file_format=True)
    size = path.stat().st_size
    orthanc = Orthanc(tmp_path / "orthanc", MaximumStorageSize=0)
    try:
        orthanc.upload(path.read_bytes())
        sink = StagingSink(tmp_path / "staging")
        tracemalloc.start()
        try:
            c_get(_source(orthanc), _study_query(ds.StudyInstanceUID), [ds.SOPClassUID], sink)
            streamed = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    finally:
        orthanc.stop()
    got = sink.received[ds.SOPInstanceUID]
    assert got.size >= size - 1024 and got.sha256 == hashlib.sha256(got.path.read_bytes()).hexdigest()
    assert pydicom.dcmread(got.path).PixelData == ds.PixelData
    tracemalloc.start()
    try:
        got.path.read_bytes()
        whole = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"instance {size} B; peak traced allocation streamed {streamed} B, whole {whole} B")
    assert whole > size
    assert streamed < size / 8, streamed
