"""`make trace UID=<SOPInstanceUID>`: trace an instance of the demo's bucket
(restored from .demo/s3-snapshot into a moto server for the occasion)."""

from __future__ import annotations

import sys

from demo.run import BUCKET, STATE
from peers.s3 import S3Server


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: make trace UID=<SOPInstanceUID>", file=sys.stderr)
        return 2
    s3 = S3Server()
    try:
        s3.create_bucket(BUCKET)
        if not s3.restore(BUCKET, STATE / "s3-snapshot"):
            print("no demo bucket yet: run `make demo` first", file=sys.stderr)
            return 2
        from include.cli import main as cli

        return cli(
            [
                "trace",
                argv[0],
                "--bucket",
                BUCKET,
                "--endpoint-url",
                s3.endpoint_url,
                "--region",
                "us-east-1",
                *argv[1:],
            ]
        )
    finally:
        s3.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
