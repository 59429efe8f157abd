"""Command line:

``python -m include.cli trace <SOPInstanceUID> --bucket B`` traces one instance;
``python -m include.cli dry-run --rules R.yaml PATH...`` (or ``--pacs host:port
--called-ae AE --partition 2019-03-01/CT``) reports what a rule set would change;
``python -m include.cli rollback --bucket B --partition 2019-03-01/CT --reason R``
lists what a rollback would take (``--execute`` carries it out, ``--id`` resumes
one); ``python -m include.cli purge <rollback id> --bucket B --reason R``
deletes a rollback's copies once its retention has passed.

Credentials come from the usual AWS chain (environment, profile, role);
``--endpoint-url`` points at an S3-compatible store.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

from include.pacs_migration.config import TargetConfig
from include.pacs_migration.store import ObjectStore
from include.pacs_migration.trace import NotFound, render_trace, trace_instance


def main(argv: list[str] | None = None) -> int:
    from include.pacs_migration.logs import configure_logging

    configure_logging()
    ap = argparse.ArgumentParser(prog="pacs-migration")
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("trace", help="trace one instance: source, rules applied, target, checksum, validation")
    t.add_argument("sop_instance_uid")
    t.add_argument("--bucket", required=True)
    t.add_argument("--prefix", default="")
    t.add_argument("--endpoint-url", default=None)
    t.add_argument("--region", default=None)
    t.add_argument("--study-date", type=dt.date.fromisoformat, default=None, help="narrow the search (YYYY-MM-DD)")
    t.add_argument("--json", action="store_true", help="machine-readable output")
    t.add_argument("--reason", required=True, help="why you look (recorded in the audit trail, 110103)")
    t.add_argument("--user", default=None, help="who looks (default: your login name)")
    a = sub.add_parser("audit", help="the audit trail: verify its chain, or who touched a study or patient")
    a.add_argument("action", choices=["verify", "find"])
    a.add_argument("--bucket", required=True)
    a.add_argument("--prefix", default="")
    a.add_argument("--endpoint-url", default=None)
    a.add_argument("--region", default=None)
    a.add_argument("--study", action="append", default=[], help="Study Instance UID (find)")
    a.add_argument("--patient-id", default=None, help="PatientID (find; keyed with $PACS_PATIENT_KEY_SECRET)")
    a.add_argument("--issuer", default="", help="IssuerOfPatientID, with --patient-id")
    a.add_argument("--json", action="store_true")
    a.add_argument("--user", default=None, help="who reads the trail (default: your login name; recorded, 110101)")
    d = sub.add_parser("dry-run", help="what a rule set would change, writing nothing (counts only)")
    d.add_argument("--rules", required=True, type=Path, help="rule-set YAML file")
    d.add_argument("--source-ae", default=None, help="source AE title, for rule conditions")
    d.add_argument("--json", action="store_true")
    d.add_argument("paths", nargs="*", type=Path, help="DICOM files or folders")
    d.add_argument("--pacs", default=None, help="host:port: dry-run a partition fetched from this PACS")
    d.add_argument("--called-ae", default=None)
    d.add_argument("--calling-ae", default="PACSMIGRATE")
    d.add_argument("--partition", default=None, help="YYYY-MM-DD/MODALITY, with --pacs")
    c = sub.add_parser(
        "check-config", help="validate the YAML, rule set, crosswalk and TLS files; optionally the peers"
    )
    c.add_argument(
        "config", type=Path, nargs="?", default=None, help="default: $AIRFLOW_VAR_PACS_MIGRATION_CONFIG_PATH"
    )
    c.add_argument("--host", default=None, help="the PACS host (else a placeholder: it comes from the Connection)")
    c.add_argument("--port", type=int, default=None)
    c.add_argument("--echo", action="store_true", help="C-ECHO the PACS (needs --host and --port)")
    c.add_argument("--head-bucket", action="store_true", help="HEAD the bucket (AWS credentials from the environment)")
    c.add_argument("--endpoint-url", default=None)
    sub.add_parser("sync-roles", help="create or update the three roles in Airflow's FAB auth manager")
    r = sub.add_parser("rollback", help="take runs' writes out of the live layout (dry run unless --execute)")
    _bucket_args(r)
    r.add_argument("--partition", action="append", default=[], help="YYYY-MM-DD/MODALITY (repeat)")
    r.add_argument("--study", action="append", default=[], help="Study Instance UID (repeat)")
    r.add_argument("--run", action="append", default=[], help="a run id whose writes to undo (repeat)")
    r.add_argument("--reason", required=True, help="why (recorded in the rollback record and the audit trail)")
    r.add_argument("--user", default=None, help="who asks (default: your login name)")
    r.add_argument("--id", default=None, help="resume this rollback (default: a new id)")
    r.add_argument("--execute", action="store_true", help="carry it out (default: a dry run, writing nothing)")
    r.add_argument("--config", type=Path, default=None, help="default: $AIRFLOW_VAR_PACS_MIGRATION_CONFIG_PATH")
    r.add_argument("--json", action="store_true")
    p = sub.add_parser("purge", help="delete a rollback's copies after its retention (audited)")
    _bucket_args(p)
    p.add_argument("rollback_id")
    p.add_argument("--reason", required=True)
    p.add_argument("--user", default=None)
    p.add_argument("--config", type=Path, default=None)
    ls = sub.add_parser("rollbacks", help="every rollback of the bucket: id, state, when, who, why, objects")
    _bucket_args(ls)
    x = sub.add_parser("index-rebuild", help="make the dashboard's coverage index again from the manifests")
    _bucket_args(x)
    si = sub.add_parser("study-index-rebuild", help="make the study index again from the manifests and objects")
    _bucket_args(si)
    w = sub.add_parser("where", help="where a study is now: legacy only, migrated, partly, quarantined, rolled back")
    w.add_argument("value", help="a StudyInstanceUID, an accession number or a patient ID")
    _bucket_args(w)
    w.add_argument("--pacs", default=None, help="host:port of the legacy PACS (else the index and manifests only)")
    w.add_argument("--called-ae", default="ANY-SCP")
    w.add_argument("--calling-ae", default="PACSMIGRATE")
    w.add_argument("--reason", required=True, help="why you look (recorded in the audit trail, 110103)")
    w.add_argument("--user", default=None, help="who looks (default: your login name)")
    w.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.command == "study-index-rebuild":
        from include.pacs_migration import study_index

        result = study_index.rebuild(_store(args))
        print(
            f"study index: {result['instances']} instance(s) of {result['partitions']} partition(s), "
            f"{result['removed']} stale file(s) removed"
        )
        return 0
    if args.command == "where":
        return _where(args)
    if args.command == "rollbacks":
        from include.pacs_migration.rollback import list_records

        for r in list_records(_store(args)):
            plan, t = r["plan"], r["plan"]["totals"]
            what = f"{plan['requested_by']}: {t['objects']} object(s) of {t['partitions']} partition(s)"
            print(f"{r['rollback_id']}  {r['state']:<11} {r['started_at'][:19]}  {what}; {plan['reason']}")
        return 0
    if args.command == "index-rebuild":
        from include.pacs_migration import coverage

        print(f"coverage index: {coverage.rebuild(_store(args))} partition(s)")
        return 0
    if args.command in ("rollback", "purge"):
        return _rollback(args)
    if args.command == "sync-roles":
        from include.pacs_migration_airflow import sync_roles

        for name, n in sync_roles().items():
            print(f"role {name}: {n} permission(s)")
        return 0
    if args.command == "dry-run":
        return _dry_run(args)
    if args.command == "check-config":
        return _check_config(args)

    store = _store(args)
    if args.command == "audit":
        return _audit(args, store)
    try:
        result = trace_instance(store, args.sop_instance_uid, args.study_date)
    except NotFound as exc:
        print(exc, file=sys.stderr)
        return 2
    _record_access(store, args, result)
    print(json.dumps(result, indent=2, default=str) if args.json else render_trace(result))
    return 0


def _bucket_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bucket", required=True)
    p.add_argument("--prefix", default="")
    p.add_argument("--endpoint-url", default=None)
    p.add_argument("--region", default=None)


def _rollback(args: argparse.Namespace) -> int:
    """``rollback`` and ``purge`` from the command line, as the pacs_rollback DAG does them."""
    import datetime as dt
    import getpass

    from include.pacs_migration.check import PLACEHOLDER_SOURCE
    from include.pacs_migration.config import ConfigError, deep_merge, load_config, read_yaml
    from include.pacs_migration.rollback import PurgeRefused, RollbackRefused, Selection, SelectionError, rollback_id
    from include.pacs_migration.steps import Services, purge_rolled_back, roll_back
    from include.pacs_migration_dags import config_path

    who = args.user or getpass.getuser()
    path = args.config or config_path()
    try:
        target = {"bucket": args.bucket, "prefix": args.prefix}
        cfg = load_config(deep_merge(read_yaml(path), {"source": PLACEHOLDER_SOURCE, "target": target}), path.parent)
    except ConfigError as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 2
    store = _store(args)
    io = Services(cfg.model_copy(update={"target": store.target}), store, 1, actor=f"cli:{who}")
    try:
        if args.command == "purge":
            print(json.dumps(purge_rolled_back(io, args.rollback_id, who, args.reason)))
            return 0
        selection = Selection.parse(args.partition, args.study, args.run)
        rid = args.id or rollback_id(f"cli/{who}/{dt.datetime.now(dt.UTC).isoformat()}", dt.datetime.now(dt.UTC))
        result = roll_back(io, selection, args.reason, who, rid, dry_run=not args.execute)
    except (SelectionError, RollbackRefused, PurgeRefused) as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    head = "DRY RUN (nothing written): " if result["dry_run"] else f"{result.get('state')}: "
    print(f"{head}rollback {result['rollback_id']}")
    for p in result["partitions"]:
        scope = "whole" if p["whole"] else "part"
        figures = f"{p['instances']:>7} instance(s) {p['objects']:>7} object(s) {p['bytes']:>12} bytes"
        print(f"  {p['partition']:<16} {scope:<5} {figures}")
    t = result["totals"]
    print(f"  total            {t['instances']:>13} instance(s) {t['objects']:>7} object(s) {t['bytes']:>12} bytes")
    print(f"  digest {t['digest']}")
    return 0


def _store(args: argparse.Namespace) -> ObjectStore:
    import boto3

    target = TargetConfig(bucket=args.bucket, prefix=args.prefix)
    client = boto3.client("s3", endpoint_url=args.endpoint_url, region_name=args.region, config=target.client_config())
    return ObjectStore(client, target)


def _record_access(store: ObjectStore, args: argparse.Namespace, result: dict) -> None:
    """A trace is an access to a patient's images: 110103, with who asked and why."""
    import getpass

    from include.pacs_migration.audit import AuditTrail
    from include.pacs_migration.config import AuditConfig

    who = args.user or getpass.getuser()
    trail = AuditTrail(store, AuditConfig(), None, f"cli:{who}")
    studies = [result["study_instance_uid"]] if result.get("study_instance_uid") else []
    trail.accessed(who, args.reason, studies, [result["patient_key"]] if result.get("patient_key") else [])
    trail.flush()


def _where(args: argparse.Namespace) -> int:
    """The locator from the command line (the DICOMweb service answers ``/where/<value>``)."""
    from include.pacs_migration.config import SourceConfig
    from include.pacs_migration.dicomweb.catalog import IndexSearch, StudyCatalog
    from include.pacs_migration.dicomweb.legacy import LegacyArchive, LegacySearch
    from include.pacs_migration.locator import locate, resolve

    store = _store(args)
    index = IndexSearch(StudyCatalog(store, refresh_seconds=3600))
    legacy = None
    if args.pacs:
        host, _, port = args.pacs.rpartition(":")
        source = SourceConfig(
            host=host, port=int(port), called_ae_title=args.called_ae, calling_ae_title=args.calling_ae
        )
        legacy = LegacySearch(LegacyArchive(source))
    found = [locate(store, uid, index, legacy) for uid in resolve(args.value, index, legacy)]
    for loc in found:
        _record_access(store, args, {"study_instance_uid": loc.study_instance_uid})
    if not found:
        print("no study found for that value", file=sys.stderr)
        return 2
    print(json.dumps([f.to_json() for f in found], indent=2) if args.json else "\n".join(f.render() for f in found))
    return 0


def _audit(args: argparse.Namespace, store: ObjectStore) -> int:
    import os

    from include.pacs_migration.audit import chain
    from include.pacs_migration.privacy import MissingSecret, PatientKeyer

    if args.action == "verify":
        result = chain.verify(store, chain.schema_validator())
        _log_used(store, args, f"audit verify: {result.links} link(s), {'intact' if result.ok else 'BROKEN'}")
        print(
            f"audit log: {result.links} link(s), {result.messages} message(s), "
            + ("chain intact" if result.ok else "BROKEN")
        )
        for problem in result.problems:
            print(f"  {problem}")
        return 0 if result.ok else 1
    ids = set(args.study)
    if args.patient_id:
        try:
            ids.add(
                PatientKeyer.from_secret(os.environ.get("PACS_PATIENT_KEY_SECRET")).key_of(args.patient_id, args.issuer)
                or ""
            )
        except MissingSecret as exc:
            print(f"{exc} (here: the environment variable PACS_PATIENT_KEY_SECRET)", file=sys.stderr)
            return 2
    if not ids:
        print("find needs --study or --patient-id", file=sys.stderr)
        return 2
    events = chain.find(store, ids)
    _log_used(store, args, f"audit find: {len(events)} event(s) for {len(ids)} identifier(s)")
    if args.json:
        print(json.dumps(events, indent=2))
    for e in [] if args.json else events:
        kind = f" / {e['type']}" if e["type"] else ""
        print(f"{e['at']}  {e['event']}{kind}  outcome {e['outcome']}  link {e['link']}")
        for who in e["participants"]:
            print(f"    {who}")
        if e["description"]:
            print(f"    {e['description']}")
    return 0


def _log_used(store: ObjectStore, args: argparse.Namespace, description: str) -> None:
    """Reading the audit trail is itself recorded (110101), with who read it."""
    import getpass

    from include.pacs_migration.audit import AuditTrail
    from include.pacs_migration.config import AuditConfig

    who = args.user or getpass.getuser()
    trail = AuditTrail(store, AuditConfig(), None, f"cli:{who}")
    trail.log_used(who, description)
    trail.flush()


def _check_config(args: argparse.Namespace) -> int:
    from include.pacs_migration.check import check_config
    from include.pacs_migration.dimse import echo
    from include.pacs_migration_dags import config_path

    if args.echo and not (args.host and args.port):
        print("--echo needs --host and --port (in Airflow they come from the pacs_source Connection)", file=sys.stderr)
        return 2
    overrides = {"source": {k: v for k, v in (("host", args.host), ("port", args.port)) if v}}

    def head(cfg):
        import boto3

        client = boto3.client("s3", endpoint_url=args.endpoint_url, config=cfg.target.client_config())
        client.head_bucket(Bucket=cfg.target.bucket)

    checks = check_config(
        args.config or config_path(),
        overrides,
        echo=(lambda cfg: echo(cfg.source)) if args.echo else None,
        head_bucket=head if args.head_bucket else None,
    )
    for check in checks:
        print(check.line())
    return 0 if all(c.ok for c in checks) else 1


def _files(paths: list[Path]):
    for p in paths:
        for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
            if f.is_file():
                yield f.read_bytes()


def _dry_run(args: argparse.Namespace) -> int:
    from include.pacs_migration.dryrun import dry_run
    from include.pacs_migration.rules import RuleSetError, load_ruleset

    try:
        ruleset = load_ruleset(args.rules)
    except RuleSetError as exc:
        print(f"rule set: {exc}", file=sys.stderr)
        return 2
    if args.pacs:
        if not (args.called_ae and args.partition):
            print("--pacs needs --called-ae and --partition", file=sys.stderr)
            return 2
        report = _dry_run_partition(args, ruleset)
    else:
        report = dry_run(_files(args.paths), ruleset, args.source_ae)
    print(json.dumps(report.to_json(), indent=2) if args.json else report.render())
    return 0


def _dry_run_partition(args: argparse.Namespace, ruleset):
    """Census + C-GET one partition into a temporary folder, then dry-run it."""
    import tempfile

    from include.pacs_migration.census import take_census
    from include.pacs_migration.config import SourceConfig
    from include.pacs_migration.dimse import FindSession, StagingSink, c_get
    from include.pacs_migration.dryrun import dry_run
    from include.pacs_migration.partition import Partition
    from include.pacs_migration.retrieve import retrieve_partition

    host, _, port = args.pacs.rpartition(":")
    source = SourceConfig(host=host, port=int(port), called_ae_title=args.called_ae, calling_ae_title=args.calling_ae)
    partition = Partition.parse(args.partition)
    with FindSession(source) as session:
        census = take_census(session.find, partition.study_date)
    with tempfile.TemporaryDirectory(prefix="dry-run-") as tmp:
        sink = StagingSink(Path(tmp))
        retrieve_partition(
            lambda q, c, s: c_get(source, q, c, s),
            census.for_partition(partition),
            sink,
            source.retrieve_attempts,
            source.max_associations,
        )
        return dry_run((r.path.read_bytes() for r in sink.received.values()), ruleset, args.called_ae)


if __name__ == "__main__":
    sys.exit(main())
