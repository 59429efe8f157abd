"""Issue 19: one endpoint where clinicians find and open every study, migrated
or not. A DICOMweb client nobody here wrote (dicomweb-client) searches and
retrieves through our service: migrated studies come byte-identical from the
archive, studies not migrated yet come from the legacy PACS by C-GET, within
the fallback's association limit and without touching the archive; the
locator names each study's state; every access is audited."""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from include.demo.archive import build_archive
from include.pacs_migration import study_index
from include.pacs_migration.audit import chain
from include.pacs_migration.dicomweb.catalog import IndexSearch, StudyCatalog
from include.pacs_migration.dicomweb.legacy import LegacyArchive, LegacySearch
from include.pacs_migration.locator import StudyState, locate, resolve
from include.pacs_migration.manifest import PartitionManifests
from include.pacs_migration.partition import Partition
from peers.pacs import SimulatedPACS
from peers.ports import free_port
from tests.dicomweb_rig import DAY1, DAY2, DAY3, break_one_study, migrate, serve
from tests.peers import Orthanc, require_binary

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
    summary = build_archive(tmp_path_factory.mktemp("legacy"), days=3)
    break_one_study(summary.root)
    server = SimulatedPACS(summary.root)
    yield server, summary
    server.stop()


@pytest.fixture(scope="module")
def archive(legacy, s3_server, tmp_path_factory):
    pacs, summary = legacy
    s3_server.create_bucket("dicomweb-archive")
    return migrate(pacs, s3_server, "dicomweb-archive", tmp_path_factory.mktemp("dw"), summary.root)


def _client(svc) -> DICOMwebClient:
    return DICOMwebClient(url=svc.url, headers=svc.headers)


def _dataset_bytes(part10: bytes) -> bytes:
    """A Part 10 object's dataset as encoded (after the file meta group)."""
    ds = pydicom.dcmread(io.BytesIO(part10), stop_before_pixels=False)
    meta_end = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    return part10[meta_end:]


def test_search_merges_the_archive_and_the_legacy_pacs(archive, legacy):
    pacs, _ = legacy
    with serve(archive, pacs.port) as svc:
        client = _client(svc)
        studies = client.search_for_studies(fields=["StudyDescription"])
        by_uid = {s["0020000D"]["Value"][0]: s for s in studies}
        migrated, old = by_uid[archive.migrated_ct], by_uid[archive.legacy_only]
        assert migrated["00080056"]["Value"] == ["ONLINE"] and "00080054" not in migrated
        assert old["00080056"]["Value"] == ["NEARLINE"] and old["00080054"]["Value"] == ["LEGACYPACS"]
        assert old["00081030"]["Value"][0].endswith("[legacy PACS]")
        # a rolled-back or wholly quarantined study is not in the archive: the legacy PACS still has it
        assert by_uid[archive.rolled_back]["00080056"]["Value"] == ["NEARLINE"]
        assert by_uid[archive.quarantined]["00080056"]["Value"] == ["NEARLINE"]
        # 3 days x 12 studies, each once
        assert len(studies) == len(by_uid) == 36

        # standard matching: date range, wildcard on names (case-insensitive), modality, paging
        day1 = client.search_for_studies(search_filters={"StudyDate": "20190301-20190301"})
        assert {s["00080020"]["Value"][0] for s in day1} == {"20190301"} and len(day1) == 12
        ct = client.search_for_studies(search_filters={"ModalitiesInStudy": "CT", "StudyDate": "20190301-"})
        assert {s["00080061"]["Value"][0] for s in ct} == {"CT"} and len(ct) == 9
        name = migrated["00100010"]["Value"][0]["Alphabetic"]
        found = client.search_for_studies(search_filters={"PatientName": name.split("^")[0].lower()[:4] + "*"})
        assert archive.migrated_ct in {s["0020000D"]["Value"][0] for s in found}
        page = client.search_for_studies(limit=5, offset=5)
        assert len(page) == 5 and [s["0020000D"] for s in page] == [s["0020000D"] for s in studies[5:10]]

        # series and instances of a migrated study come from the index, of a legacy study from C-FIND
        series = client.search_for_series(archive.migrated_ct)
        assert len(series) == 2 and all(s["00080060"]["Value"] == ["CT"] for s in series)
        inst = client.search_for_instances(archive.legacy_only)
        assert len(inst) == 8 and all(i["00080056"]["Value"] == ["NEARLINE"] for i in inst)

        # a bad parameter is named
        rsp = requests.get(f"{svc.url}/studies", params={"NoSuchKey": "1"}, headers=svc.headers, timeout=10)
        assert rsp.status_code == 400 and "NoSuchKey" in rsp.text


def test_retrieve_is_byte_identical_from_either_archive(archive, legacy):
    pacs, summary = legacy
    store = archive.store
    with serve(archive, pacs.port) as svc:
        client = _client(svc)
        url = f"{svc.url}/studies/{archive.migrated_ct}"
        parts = list(client._http_get_multipart(url))  # the library's multipart parser, bytes as sent
        rows = PartitionManifests(store, Partition(DAY1, "CT")).transfer()
        rows = rows[(rows["study_instance_uid"] == archive.migrated_ct) & (rows["state"] == "migrated")]
        assert sorted(parts) == sorted(store.get(k) for k in rows["object_key"])
        assert len(parts) == 8
        datasets = client.retrieve_study(archive.migrated_ct)  # the library's own parsing
        assert {str(d.SOPInstanceUID) for d in datasets} == set(rows["sop_instance_uid"])

        keys_before = set(store.list_keys(""))
        retrieves = svc.legacy.retrieves
        legacy_parts = list(client._http_get_multipart(f"{svc.url}/studies/{archive.legacy_only}"))
        originals = {
            str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p.read_bytes()
            for p in (summary.root / DAY3.strftime("%Y%m%d") / "CT00").rglob("*.dcm")
        }
        assert len(legacy_parts) == len(originals) == 8
        for part in legacy_parts:
            uid = str(pydicom.dcmread(io.BytesIO(part), stop_before_pixels=True).SOPInstanceUID)
            assert _dataset_bytes(part) == _dataset_bytes(originals[uid])
        assert svc.legacy.retrieves == retrieves + 1
        assert not list(Path(tempfile.gettempdir()).glob("tmp*.dcm"))  # pynetdicom's streamed receive: gone
        assert set(store.list_keys("")) - keys_before <= {k for k in store.list_keys("_audit/")}  # nothing else written

        # metadata (DICOM JSON), frames and a rendered thumbnail, from both
        for study in (archive.migrated_ct, archive.legacy_only):
            meta = client.retrieve_study_metadata(study)
            assert len(meta) == 8 and all("7FE00010" not in m for m in meta)
            series_uid, sop = meta[0]["0020000E"]["Value"][0], meta[0]["00080018"]["Value"][0]
            frames = client.retrieve_instance_frames(study, series_uid, sop, [1])
            assert len(frames[0]) == int(meta[0]["00280010"]["Value"][0]) * int(meta[0]["00280011"]["Value"][0]) * 2
            png = requests.get(
                f"{svc.url}/studies/{study}/series/{series_uid}/instances/{sop}/thumbnail",
                headers={**svc.headers, "Accept": "image/png"},
                timeout=30,
            )
            assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_fallback_holds_its_association_limit(archive, legacy):
    pacs, summary = legacy
    day3 = sorted((summary.root / DAY3.strftime("%Y%m%d")).iterdir())
    studies = [str(pydicom.dcmread(next(d.rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID) for d in day3]
    with serve(archive, pacs.port, legacy_associations=1) as svc:
        pacs.max_active = 0
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            sizes = list(
                pool.map(
                    lambda uid: len(list(_client(svc)._http_get_multipart(f"{svc.url}/studies/{uid}"))),
                    studies[:6],
                )
            )
        assert all(sizes) and pacs.max_active == 1, pacs.max_active


def test_authentication_and_audit(archive, legacy):
    pacs, _ = legacy
    with serve(archive, pacs.port) as svc:
        assert requests.get(f"{svc.url}/studies", timeout=10).status_code == 401
        bad = {"Authorization": "Bearer " + "x" * 32}
        assert requests.get(f"{svc.url}/studies", headers=bad, timeout=10).status_code == 401
        assert requests.get(f"{svc.origin}/healthz", timeout=10).status_code == 200
        _client(svc).retrieve_study_metadata(archive.migrated_ct)
        _client(svc).retrieve_study_metadata(archive.legacy_only)
        _client(svc).search_for_studies(search_filters={"PatientID": "LEG30100001"})
    events = chain.find(archive.store, {archive.migrated_ct, archive.legacy_only})
    accessed = [e for e in events if e["event"] == "DICOM Instances Accessed" and "dr.house" in str(e)]
    origins = {e["description"] for e in accessed}
    assert {"purpose of use: DICOMweb retrieve from the archive"} <= origins, origins
    assert "purpose of use: DICOMweb retrieve from the legacy PACS" in origins
    texts = b"".join(data for _, data in chain.links(archive.store))
    assert b"LEG30100001" not in texts and b"dr.house" in texts


def test_locator_answers_each_state(archive, legacy):
    pacs, summary = legacy
    catalog = StudyCatalog(archive.store, 0)
    index = IndexSearch(catalog)
    source = archive.cfg.source.model_copy(update={"port": pacs.port})
    lsearch = LegacySearch(LegacyArchive(source))
    states = {
        name: locate(archive.store, uid, index, lsearch)
        for name, uid in (
            ("migrated", archive.migrated_ct),
            ("partly", archive.partly),
            ("rolled_back", archive.rolled_back),
            ("legacy_only", archive.legacy_only),
            ("quarantined", archive.quarantined),
        )
    }
    assert states["quarantined"].state is StudyState.QUARANTINED
    assert any(why.startswith("quarantined ") for why in states["quarantined"].missing)
    assert states["migrated"].state is StudyState.MIGRATED
    assert states["migrated"].partitions[0]["verdict"] is True
    assert states["migrated"].partitions[0]["run_id"] == "run-2019-03-01"
    partly = states["partly"]
    assert partly.state is StudyState.PARTLY
    assert any(archive.quarantined_reason in why for why in partly.missing), partly.missing
    assert states["rolled_back"].state is StudyState.ROLLED_BACK
    assert states["rolled_back"].rollbacks[0]["rollback_id"] == "rb-dw-1"
    assert states["legacy_only"].state is StudyState.LEGACY_ONLY and states["legacy_only"].on_legacy
    # by accession number and by patient ID, in the index and on the legacy PACS
    ds = pydicom.dcmread(next((summary.root / DAY3.strftime("%Y%m%d") / "CT00").rglob("*.dcm")), force=True)
    assert resolve(str(ds.AccessionNumber), index, lsearch) == [archive.legacy_only]
    assert archive.legacy_only in resolve(str(ds.PatientID), index, lsearch)
    # the legacy PACS down: the index still answers for what was migrated
    down = LegacySearch(LegacyArchive(source.model_copy(update={"port": 1, "association_attempts": 1})))
    assert locate(archive.store, archive.migrated_ct, index, down).state is StudyState.MIGRATED
    rendered = {k: v.render() for k, v in states.items()}
    assert "PASSED" in rendered["migrated"] and "rb-dw-1" in rendered["rolled_back"]


def test_study_index_rebuilds_after_loss(archive):
    store = archive.store
    before = {p: study_index.read_partition(store, p) for p in study_index.indexed_partitions(store)}
    for p in before:
        store.delete(study_index.index_key(store, p))
    result = study_index.rebuild(store)
    assert result["partitions"] == len(before) and result["instances"] == sum(len(df) for df in before.values())
    for p, df in before.items():
        again = study_index.read_partition(store, p)
        cols = [c for c in df.columns if c != "run_id"]
        assert (
            again.sort_values("SOPInstanceUID")[cols]
            .reset_index(drop=True)
            .equals(df.sort_values("SOPInstanceUID")[cols].reset_index(drop=True))
        )
    # the rolled-back study is not in it; the quarantined instance neither
    rolled = [p for p in before if (before[p]["StudyInstanceUID"] == archive.rolled_back).any()]
    assert rolled == []


def test_validation_indexes_from_its_reread_and_lineage_reads_no_header(archive, monkeypatch):
    """Validate re-reads every object whole; the study index is built from those
    bytes, so lineage's index update reads no object header again (#22)."""
    from include.pacs_migration.steps import Services, lineage_step, validate_step
    from tests.conftest import PATIENT_SECRET

    store, p, run_id = archive.store, Partition(DAY1, "CT"), f"run-{DAY1.isoformat()}"
    before = study_index.read_partition(store, p)
    store.delete(study_index.index_key(store, p))
    reads: list[str] = []
    real = study_index.read_header
    monkeypatch.setattr(study_index, "read_header", lambda s, key: reads.append(key) or real(s, key))
    services = Services(archive.cfg, store, 1, patient_secret=PATIENT_SECRET, actor="test")
    summary = PartitionManifests(store, p).summary()
    assert validate_step(services, p, run_id, summary.census_sha256).success
    after_validate = study_index.read_partition(store, p)
    lineage_step(services, p, run_id, "pacs_migration")
    assert reads == [], f"{len(reads)} headers read again"
    again = study_index.read_partition(store, p)
    assert len(after_validate) == len(before) > 0
    key = "SOPInstanceUID"
    assert again.sort_values(key).reset_index(drop=True).equals(before.sort_values(key).reset_index(drop=True))


def test_orthanc_lists_and_retrieves_a_migrated_study_over_dicomweb(archive, legacy, tmp_path):
    """Orthanc with its DICOMweb plugin (Debian orthanc-dicomweb), our service as its remote server."""
    pacs, _ = legacy
    plugin = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
    if not plugin.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{plugin} (Debian package orthanc-dicomweb) is required in CI; .ci/run installs it")
        pytest.skip("Debian package orthanc-dicomweb not installed")
    with serve(archive, pacs.port) as svc:
        servers = {"migrated": {"Url": svc.url + "/", "HttpHeaders": svc.headers}}
        orthanc = Orthanc(tmp_path / "orthanc", Plugins=[str(plugin)], DicomWeb={"Enable": True, "Servers": servers})
        try:
            listed = _orthanc(
                orthanc,
                "/dicom-web/servers/migrated/get",
                {"Uri": "/studies", "Arguments": {"ModalitiesInStudy": "CT"}},
            )
            uids = {s["0020000D"]["Value"][0] for s in listed}
            assert archive.migrated_ct in uids and archive.legacy_only in uids
            _orthanc(orthanc, "/dicom-web/servers/migrated/retrieve", {"Resources": [{"Study": archive.migrated_ct}]})
            ids = json.loads(urllib.request.urlopen(f"{orthanc.url}/instances", timeout=30).read())
            got = {
                hashlib.sha256(
                    urllib.request.urlopen(f"{orthanc.url}/instances/{i}/file", timeout=30).read()
                ).hexdigest()
                for i in ids
            }
            rows = PartitionManifests(archive.store, Partition(DAY1, "CT")).transfer()
            rows = rows[(rows["study_instance_uid"] == archive.migrated_ct) & (rows["state"] == "migrated")]
            assert got == set(rows["object_sha256"]) and len(ids) == 8
        finally:
            orthanc.stop()


def _orthanc(orthanc, path: str, body: dict):
    req = urllib.request.Request(
        orthanc.url + path, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    return json.loads(urllib.request.urlopen(req, timeout=60).read() or b"null")


VIEWPORT_STATE = """() => {
  const engines = window.cornerstone ? window.cornerstone.getRenderingEngines() : [];
  for (const engine of engines) {
    for (const vp of engine.getViewports()) {
      const id = vp.getCurrentImageId && vp.getCurrentImageId();
      const image = id && window.cornerstone.cache.getImage(id);
      if (!image) continue;
      const pixels = image.getPixelData();
      let low = Infinity, high = -Infinity;
      for (let i = 0; i < pixels.length; i += 7) { low = Math.min(low, pixels[i]); high = Math.max(high, pixels[i]); }
      return {imageId: id, rows: image.rows, columns: image.columns, pixels: pixels.length, low, high,
              images: vp.getImageIds().length};
    }
  }
  return null;
}"""


def _chromium() -> str:
    return require_binary("chromium", "chromium")


def test_ohif_lists_both_origins_and_renders_a_migrated_ct(archive, legacy, tmp_path):
    """The OHIF Viewer (npm @ohif/app dist, fetched by make), from the service's origin, in headless Chromium."""
    from playwright.sync_api import sync_playwright

    pacs, _ = legacy
    viewer = Path(__file__).resolve().parents[2] / ".viewer" / "dist"
    if not (viewer / "index.html").exists():
        if os.environ.get("CI") == "true":
            pytest.fail("the OHIF viewer is missing: make test fetches it (make viewer, npm)")
        pytest.skip("the OHIF viewer is not fetched (make viewer needs npm)")
    shots = Path(os.environ.get("VIEWER_SCREENSHOTS") or tmp_path)
    with serve(archive, pacs.port, viewer=viewer) as svc, sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=_chromium(), args=["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]
        )
        # A reverse proxy or the hospital's SSO would add the token; here the browser does.
        context = browser.new_context(viewport={"width": 1600, "height": 900}, extra_http_headers=svc.headers)
        context.add_init_script("localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']))")
        page = context.new_page()
        errors: list[str] = []
        failed: list[tuple[int, str]] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("response", lambda r: failed.append((r.status, r.url)) if r.status >= 400 else None)

        page.goto(svc.origin + "/", wait_until="networkidle")
        page.get_by_text("[legacy PACS]").first.wait_for(timeout=30_000)
        _hide_banner(page)
        rows = page.locator("tbody tr", has_text="LEG3")  # a study's row shows its MRN
        assert rows.count() == 36
        legacy_rows = [t for t in rows.all_inner_texts() if "[legacy PACS]" in t]
        assert len(legacy_rows) == 14  # day 3's twelve, the rolled-back and the quarantined study
        page.screenshot(path=str(shots / "viewer-study-list.png"))

        for study, name in ((archive.migrated_ct, "viewer-migrated-ct.png"), (archive.legacy_only, None)):
            started = time.monotonic()
            page.goto(f"{svc.origin}/viewer?StudyInstanceUIDs={study}", wait_until="domcontentloaded")
            page.wait_for_function(VIEWPORT_STATE, timeout=60_000)
            state = page.evaluate(VIEWPORT_STATE)
            assert state["rows"] == state["columns"] == 128 and state["pixels"] == 128 * 128, state
            assert state["high"] > state["low"] and state["images"] == 4 and study in state["imageId"], state
            print(f"first image of {'migrated' if name else 'legacy'} study in {time.monotonic() - started:.1f} s")
            if name:
                _hide_banner(page)
                page.wait_for_timeout(1000)
                page.screenshot(path=str(shots / name))
        browser.close()
    assert not failed, failed
    assert not [e for e in errors if "dicomweb" in e.lower() or "error" in e.lower()], errors


def _hide_banner(page) -> None:
    button = page.get_by_role("button", name="Confirm and hide")
    if button.count():
        button.first.click()


def test_the_service_as_make_serve_starts_it(archive, legacy, s3_server, tmp_path):
    """``python -m include.dicomweb_serve`` in its own process: configuration from the
    environment, tokens from a file (a bad line named, never its token), no patient data in its output."""
    pacs, summary = legacy
    tokens = tmp_path / "tokens"
    tokens.write_text("dr.cuddy short\n")
    env = {
        **os.environ,
        "AIRFLOW_CONN_PACS_SOURCE": json.dumps(
            {
                "conn_type": "dicom",
                "host": "127.0.0.1",
                "port": pacs.port,
                "extra": {"called_ae_title": "LEGACYPACS", "calling_ae_title": "PACSMIGRATE"},
            }
        ),  # fmt: skip
        "AIRFLOW_VAR_PACS_MIGRATION_BUCKET": archive.store.bucket,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "PACS_DICOMWEB_TOKENS_FILE": str(tokens),
    }
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "include.dicomweb_serve",
        "--port",
        str(port),
        "--endpoint-url",
        s3_server.endpoint_url,
    ]
    bad = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert bad.returncode == 2 and f"{tokens}:1" in bad.stderr and "short" not in bad.stderr
    token = "t" * 32
    tokens.write_text(f"# who, token\ndr.cuddy {token}\n")
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(f"{url}/healthz", timeout=2).raise_for_status()
                break
            except requests.RequestException:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                time.sleep(0.2)
        name = summary.patient_names[0]
        client = DICOMwebClient(url=f"{url}/dicomweb", headers={"Authorization": f"Bearer {token}"})
        found = client.search_for_studies(search_filters={"PatientName": name})
        assert found and all(s["00100010"]["Value"][0]["Alphabetic"] == name for s in found)
        where = requests.get(
            f"{url}/where/{archive.migrated_ct}", headers={"Authorization": f"Bearer {token}"}, timeout=30
        )
        assert where.json()[0]["state"] == "migrated and verified"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    output = (tmp_path / "serve.log").read_text()
    assert name not in output and name.split("^")[0] not in output and token not in output


def test_a_path_that_is_not_a_uid_is_refused(archive, legacy):
    pacs, _ = legacy
    with serve(archive, pacs.port) as svc:
        for path in ("/studies/1.2.x", f"/studies/{archive.migrated_ct}/series/abc/metadata", "/studies/1..2/metadata"):
            rsp = requests.get(svc.url + path, headers=svc.headers, timeout=10)
            assert rsp.status_code == 400 and "not a valid UID" in rsp.text, (path, rsp.status_code)
        assert svc.legacy.retrieves == 0  # nothing asked of the legacy PACS


def test_a_partly_migrated_study_is_completed_from_the_legacy_pacs(archive, legacy):
    """A clinician sees every image: the instance that was quarantined comes from the legacy PACS."""
    pacs, _ = legacy
    rows = study_index.read_partition(archive.store, Partition(DAY2, "CT"))
    mine = rows[rows["StudyInstanceUID"] == archive.partly]
    assert len(mine) == 7 and set(mine["study_not_migrated"]) == {1}
    with serve(archive, pacs.port) as svc:
        client = _client(svc)
        found = client.search_for_instances(archive.partly)
        marks = sorted(i["00080056"]["Value"][0] for i in found)
        assert marks == ["NEARLINE"] + ["ONLINE"] * 7
        assert len(list(client._http_get_multipart(f"{svc.url}/studies/{archive.partly}"))) == 8
        assert len(client.retrieve_study_metadata(archive.partly)) == 8
        # a study the archive holds whole asks nothing of the legacy PACS
        before = (svc.legacy.retrieves, pacs.find_requests)
        assert len(client.retrieve_study_metadata(archive.migrated_ct)) == 8
        assert len(client.search_for_instances(archive.migrated_ct)) == 8
        assert (svc.legacy.retrieves, pacs.find_requests) == before


def test_where_and_study_index_rebuild_from_the_command_line(archive, legacy, s3_server, monkeypatch, capsys):
    from include import cli

    pacs, summary = legacy
    for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")):
        monkeypatch.setenv(key, value)
    bucket = ["--bucket", archive.store.bucket, "--endpoint-url", s3_server.endpoint_url, "--region", "us-east-1"]
    legacy_args = ["--pacs", f"127.0.0.1:{pacs.port}", "--called-ae", "LEGACYPACS"]
    ds = pydicom.dcmread(next((summary.root / DAY3.strftime("%Y%m%d") / "CT00").rglob("*.dcm")), force=True)
    assert cli.main(["where", str(ds.AccessionNumber), *bucket, *legacy_args, "--reason", "ward round", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert [a["state"] for a in answer] == ["legacy only"] and answer[0]["study_instance_uid"] == archive.legacy_only
    assert cli.main(["where", archive.partly, *bucket, "--reason", "ward round", "--user", "dr.wilson"]) == 0
    out = capsys.readouterr().out
    assert "partly migrated" in out and "missing 1: quarantined" in out
    assert cli.main(["where", "NOBODY", *bucket, "--reason", "x"]) == 2
    events = chain.find(archive.store, {archive.partly})
    assert any(e["event"] == "DICOM Instances Accessed" and "dr.wilson" in str(e) for e in events)
    assert cli.main(["study-index-rebuild", *bucket]) == 0
    assert "study index:" in capsys.readouterr().out
