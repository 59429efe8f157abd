"""Two real legacy archives into one (issue 21), the core steps as the DAG's
tasks run them: Orthanc ("south", the first source, unnamed in keys) and DCMTK
``dcmqrscp`` ("north"), each with its own Issuer of Patient ID, holding the
overlapping studies of ``tests/consolidation.py``. Conservation per source and
in total, shared copies stored once, the altered copy a conflict naming both
archives, the split study complete, the colliding patient IDs never merged,
and the assessment's overlap table."""

from __future__ import annotations

import datetime as dt
import io

import pandas as pd
import pydicom
import pytest

from include.pacs_migration import study_index
from include.pacs_migration.assessment import assess, overlap
from include.pacs_migration.config import MigrationConfig, ReportConfig, TargetConfig
from include.pacs_migration.counts import counts_from_frame
from include.pacs_migration.dimse import FindSession
from include.pacs_migration.manifest import PartitionManifests, transferred_partitions
from include.pacs_migration.report import partition_figures, render_html, shared_studies, source_figures
from include.pacs_migration.rollback import Selection
from include.pacs_migration.steps import (
    Services,
    lineage_step,
    record_census,
    roll_back,
    take_date_census,
    transfer_step,
    validate_step,
)
from include.pacs_migration.store import ObjectStore
from tests.conftest import PATIENT_SECRET, TEST_KEYER
from tests.consolidation import COLLIDING_ID, D1, D2, build
from tests.peers import Dcmqrscp, Orthanc, loopback_source

pytestmark = pytest.mark.integration
SOURCES = {"south": "", "north": "north"}  # site -> source name in the config ("" : the first, unnamed)


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("consolidation")
    data = build(root / "files")
    orthanc = Orthanc(root / "orthanc")
    for path in data.south.paths:
        orthanc.upload(path.read_bytes())
    dcmqrscp = Dcmqrscp(root / "dcmqrscp")
    dcmqrscp.load(data.north.paths)
    yield data, orthanc, dcmqrscp
    orthanc.stop()
    dcmqrscp.stop()


def _config(orthanc: Orthanc, dcmqrscp: Dcmqrscp, bucket: str, staging) -> MigrationConfig:
    south = loopback_source(orthanc.dicom_port, orthanc.ae_title).model_copy(update={"issuer_of_patient_id": "SOUTH"})
    north = loopback_source(dcmqrscp.port, dcmqrscp.ae_title).model_copy(
        update={"name": "north", "issuer_of_patient_id": "NORTH"}
    )
    return MigrationConfig(
        source=south,
        sources=(north,),
        target=TargetConfig(bucket=bucket, sse="none"),
        report=ReportConfig(recipients=("compliance@hospital.example",), from_address="pacs@hospital.example"),
        staging_dir=staging,
    )


def _run(services: Services, day: dt.date, run_id: str) -> list:
    """One source's run of a date: census, then per partition transfer, validate, lineage."""
    census = take_date_census(services, day)
    out = []
    for p in census.partitions():
        digest = record_census(services, census, p)
        transfer_step(services, p, run_id, census_sha256=digest)
        result = validate_step(services, p, run_id, digest)
        assert result.success, (p.key, [o.label for o in result.failed])
        lineage_step(services, p, run_id, "pacs_migration")
        out.append(p)
    return out


def test_two_archives_into_one(sites, s3_server, bucket, tmp_path):
    data, orthanc, dcmqrscp = sites
    cfg = _config(orthanc, dcmqrscp, bucket, tmp_path / "staging")
    store = ObjectStore(s3_server.client(), cfg.target)
    services = Services(cfg, store, 2, patient_secret=PATIENT_SECRET)
    run_id = "backfill__2019-03-01"
    parts = {site: [] for site in SOURCES}
    for day in (D1, D2):
        for site, name in SOURCES.items():  # south first: its copies are the ones stored
            parts[site] += _run(services.for_source(name), day, f"{run_id}-{day}")

    # Keys: the first source's partitions keep their layout, north's carry source=north.
    assert {p.source for p in parts["south"]} == {""} and {p.source for p in parts["north"]} == {"north"}
    assert any(k.startswith("_manifests/source=north/date=2019-03-01/") for k in store.list_keys("_manifests/"))
    assert set(transferred_partitions(store, D1)) == {p for p in parts["south"] + parts["north"] if p.study_date == D1}

    # Conservation per source: every instance each archive's census names ends in exactly one state.
    def held(site: str) -> dict:  # what each archive holds of the two dates
        return {k: v for k, v in data.expected(site).items() if v[2] <= D2}

    frames = {site: {p: PartitionManifests(store, p).transfer() for p in ps} for site, ps in parts.items()}
    for site, by_part in frames.items():
        rows = pd.concat(by_part.values())
        assert sorted(rows["sop_instance_uid"]) == sorted(held(site)), site
        assert rows["state"].isin(["migrated", "quarantined"]).all() and rows["sop_instance_uid"].is_unique
    # In total: one object per distinct SOP instance; shared copies stored once.
    distinct = set(held("south")) | set(held("north"))
    assert len(list(store.list_keys("studies/"))) == len(distinct)

    south_rows, north_rows = (pd.concat(frames[s].values()).set_index("sop_instance_uid") for s in ("south", "north"))
    shared = [u for u, v in held("north").items() if v[0] in (data.studies["shared"], data.studies["altered"])]
    for uid in shared:
        row = north_rows.loc[uid]
        if uid == data.altered_sop:  # north's copy differs: a conflict naming the archive whose copy is live
            assert (row.state, row.reason, row.other_source) == ("quarantined", "UID_CONFLICT", "default")
            assert south_rows.loc[uid].state == "migrated"
        else:
            assert (row.state, row.load_action, row.other_source) == ("migrated", "already_present", "default")
            assert row.object_key == south_rows.loc[uid].object_key
    assert south_rows["other_source"].isna().all()
    north_d1_ct = next(p for p in parts["north"] if p.key == "north/2019-03-01/CT")
    c = counts_from_frame(frames["north"][north_d1_ct])
    assert (c.expected, c.migrated, c.quarantined, c.shared, c.written) == (15, 14, 1, 12, 2)

    # The live altered object is south's; north's copy is kept in quarantine, by its hash.
    live = pydicom.dcmread(_obj(store, south_rows.loc[data.altered_sop].object_key))
    assert live.PixelData[0] == 1
    assert store.head(north_rows.loc[data.altered_sop].quarantine_key) is not None

    # Patients: the same local ID at both sites stays two patients, each with its site's issuer.
    by_study = {}
    for site in SOURCES:
        for uid, (study, *_rest) in data.expected(site, D1).items():
            if study in (data.studies["collide-s"], data.studies["collide-n"]):
                rows = south_rows if site == "south" else north_rows
                ds = pydicom.dcmread(_obj(store, rows.loc[uid].object_key))
                by_study.setdefault(study, set()).add((ds.PatientID, ds.IssuerOfPatientID, rows.loc[uid].patient_key))
    assert by_study == {
        data.studies["collide-s"]: {(COLLIDING_ID, "SOUTH", TEST_KEYER.key_of(COLLIDING_ID, "SOUTH"))},
        data.studies["collide-n"]: {(COLLIDING_ID, "NORTH", TEST_KEYER.key_of(COLLIDING_ID, "NORTH"))},
    }
    index = pd.concat(study_index.read_partition(store, p) for p in parts["south"] + parts["north"])
    assert index["SOPInstanceUID"].is_unique and len(index) == len(distinct)  # each object indexed once
    issuers = set(index.loc[index["PatientID"] == COLLIDING_ID, "IssuerOfPatientID"])
    assert issuers == {"SOUTH", "NORTH"}

    # The split study ends complete, reported as split; the shared ones as shared.
    every = parts["south"] + parts["north"]
    found = {s.study_instance_uid: s for s in shared_studies(store, every)}
    assert found[data.studies["split"]].kind == "split" and found[data.studies["split"]].complete
    assert found[data.studies["shared"]].kind == "shared" and found[data.studies["shared"]].complete
    assert found[data.studies["altered"]].complete and set(found) == {
        data.studies[k] for k in ("shared", "altered", "split")
    }

    # The report: per-source figures, the conflict naming both archives.
    figures = [partition_figures(store, p, f"{run_id}-{p.study_date}") for p in every]
    table = {r["source"]: r for r in source_figures(figures)}
    assert table["north"]["shared"] == 12 and table["north"]["conflicts"] == 1
    assert table["default"]["shared"] == 0 and table["default"]["written"] == len(held("south"))
    assert sum(r["written"] for r in table.values()) == len(distinct)
    html = render_html(run_id, "2019-03-01 to 2019-03-02", figures, f"s3://{bucket}/", shared=list(found.values()))
    assert f"{data.altered_sop}: the copy from north differs from the copy from default (live)" in html
    assert 'data-source="north"' in html and "split: some series in each" in html

    # Re-running both archives writes nothing.
    for day in (D1, D2):
        for name in SOURCES.values():
            for p in _run(services.for_source(name), day, f"again-{day}"):
                assert counts_from_frame(PartitionManifests(store, p).transfer()).written == 0

    # Rolling back north's partition takes north's rows and objects, not those south's partition stands for.
    live = set(store.list_keys("studies/"))
    norths_own = {k for k in north_rows["object_key"].dropna() if k.split("/")[1] == data.studies["collide-n"]}
    done = roll_back(services, Selection.parse([north_d1_ct.key]), "wrong site", "alice", "rb-north", dry_run=False)
    assert done["state"] == "complete" and done["totals"]["objects"] == len(norths_own) + 1  # + its quarantined copy
    assert set(store.list_keys("studies/")) == live - norths_own and len(norths_own) == 2
    assert PartitionManifests(store, north_d1_ct).transfer_or_none() is None
    south_d1_ct = next(p for p in parts["south"] if p.key == "2019-03-01/CT")
    assert counts_from_frame(PartitionManifests(store, south_d1_ct).transfer()).migrated == 15
    _run(services.for_source("north"), D1, "after-rollback")  # north's copies stand for the same objects again
    c = counts_from_frame(PartitionManifests(store, north_d1_ct).transfer())
    assert (c.migrated, c.shared, c.written) == (14, 12, 2) and set(store.list_keys("studies/")) == live


def test_assessment_overlap_of_the_two_archives(sites):
    data, orthanc, dcmqrscp = sites
    keys = {}
    for site, (port, ae) in {
        "south": (orthanc.dicom_port, orthanc.ae_title),
        "north": (dcmqrscp.port, dcmqrscp.ae_title),
    }.items():
        with FindSession(loopback_source(port, ae)) as session:
            result = assess(session.find, D1, D2, patient_key=TEST_KEYER.key_of)
        assert len(result.study_keys) == len({v[0] for v in data.expected(site).values() if v[2] <= D2})
        assert all(k is None or k.startswith("h1:") for _u, k in result.study_keys)  # keyed, never clear
        keys[site] = pd.DataFrame(result.study_keys, columns=["study_instance_uid", "patient_key"])
    (row,) = overlap(keys)
    assert row == {
        "source_a": "north",
        "source_b": "south",
        "studies_a": 5,
        "studies_b": 5,
        "studies_in_both": 3,  # shared, altered, split
        "patient_ids_a": 5,
        "patient_ids_b": 5,
        "patient_ids_in_both": 4,  # their three patients, and 12345
        "same_patient_by_shared_study": 3,
        "colliding_patient_ids": 1,  # 12345: two people
    }


def _obj(store: ObjectStore, key: str) -> io.BytesIO:
    return io.BytesIO(store.get(key))


def test_requested_studies_are_looked_for_in_each_archive(sites, s3_server, bucket, tmp_path):
    """A clinician asks for studies by UID: each archive's census takes those it holds,
    skipping the others (with one archive, a study it does not hold fails the census)."""
    from include.pacs_migration.census import StudyNotFound
    from include.pacs_migration.steps import take_studies_census

    data, orthanc, dcmqrscp = sites
    cfg = _config(orthanc, dcmqrscp, bucket, tmp_path / "staging")
    services = Services(cfg, ObjectStore(s3_server.client(), cfg.target), 1, patient_secret=PATIENT_SECRET)
    wanted = (data.studies["south-only"], data.studies["north-only"], data.studies["split"])
    for name, expected in (("", {"south-only", "split"}), ("north", {"north-only", "split"})):
        found = take_studies_census(services.for_source(name), wanted)
        assert {s.study_instance_uid for c in found for s in c.series} == {data.studies[k] for k in expected}
        assert {p.source for c in found for p in c.partitions()} == {name}
    alone = Services(cfg.model_copy(update={"sources": ()}), services.store, 1, patient_secret=PATIENT_SECRET)
    with pytest.raises(StudyNotFound, match=r"study_uids\[1\]"):
        take_studies_census(alone, wanted)
