"""Command line: ``python -m include.cli trace <SOPInstanceUID> --bucket B``.

Credentials come from the usual AWS chain (environment, profile, role);
``--endpoint-url`` points at an S3-compatible store.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys

from include.pacs_migration.config import TargetConfig
from include.pacs_migration.store import ObjectStore
from include.pacs_migration.trace import NotFound, render_trace, trace_instance


def main(argv: list[str] | None = None) -> int:
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
    args = ap.parse_args(argv)

    import boto3

    client = boto3.client("s3", endpoint_url=args.endpoint_url, region_name=args.region)
    store = ObjectStore(client, TargetConfig(bucket=args.bucket, prefix=args.prefix))
    try:
        result = trace_instance(store, args.sop_instance_uid, args.study_date)
    except NotFound as exc:
        print(exc, file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str) if args.json else render_trace(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
