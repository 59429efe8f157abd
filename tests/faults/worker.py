"""``python -m tests.faults.worker '<json>'``: one run of the date in a
process of its own, for a fault scenario to SIGKILL at a chosen point."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from tests.faults.harness import migration_config, object_store, run_date


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("great_expectations", "botocore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = json.loads(argv[0])
    cfg = migration_config(args["pacs_port"], args["bucket"], Path(args["staging"]), **args.get("target", {}))
    outcome = run_date(cfg, object_store(cfg, args["endpoint"]), args["run_id"])
    print(json.dumps({"verdict": outcome.verdict.value}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
