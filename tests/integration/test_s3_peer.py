"""The S3 the tests run against keeps S3's write-once contract under
concurrency: ``If-None-Match: *`` is decided and applied in one step (moto
alone checks, then writes: two concurrent writers of a key could both win)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from botocore.exceptions import ClientError


def test_concurrent_conditional_puts_have_one_winner(s3_server, bucket, monkeypatch):
    import time

    from moto.s3.responses import S3Response

    slow = S3Response._get_checksum

    def checksum_then_wait(self, *args, **kwargs):  # between moto's check and its write: widen the window
        out = slow(self, *args, **kwargs)
        time.sleep(0.05)
        return out

    monkeypatch.setattr(S3Response, "_get_checksum", checksum_then_wait)
    client = s3_server.client()

    def put(i: int) -> bool:
        try:
            client.put_object(Bucket=bucket, Key="one-key", Body=bytes([i]) * 200_000, IfNoneMatch="*")
            return True
        except ClientError as exc:
            assert exc.response["Error"]["Code"] in ("PreconditionFailed", "412")
            return False

    for attempt in range(5):  # bounded: 5 rounds of 12 writers
        client.delete_object(Bucket=bucket, Key="one-key")
        with ThreadPoolExecutor(12) as pool:
            won = [i for i, ok in enumerate(pool.map(put, range(12))) if ok]
        assert len(won) == 1, (attempt, won)
        body = client.get_object(Bucket=bucket, Key="one-key")["Body"].read()
        assert body == bytes([won[0]]) * 200_000
