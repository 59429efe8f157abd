"""The MLLP listener, with python-hl7's own asyncio client as the RIS: each
message kept in the inbox before it is acknowledged (AA, AE, AR), a broken
or oversized one answered and the listener still serving."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib

import boto3
import pytest
from botocore.config import Config
from hl7.mllp import open_hl7_connection

from include.pacs_migration.config import TargetConfig
from include.pacs_migration.reports.ledger import ReportLedger
from include.pacs_migration.reports.mllp import MllpListener
from include.pacs_migration.store import ObjectStore
from peers.ports import free_port
from tests.ris import oru

DAY = dt.date(2019, 3, 2)
GOOD = oru("C1", "P1", "ACC1", "20190302101500", ["No acute findings"]).encode()
NO_STATUS = oru("C2", "P1", "ACC1", "20190302101500", ["x"], status="Z").encode()
NOT_HL7 = b"this is not an HL7 message at all\r"


async def _exchange(port: int, blocks: list[bytes]) -> list[tuple[str, str, str]]:
    """Send each block on one connection; (MSA-1, MSA-2, MSA-3) of each answer."""
    reader, writer = await open_hl7_connection("127.0.0.1", port)
    out = []
    try:
        for block in blocks:
            writer.writeblock(block)
            await writer.drain()
            ack = await asyncio.wait_for(reader.readmessage(), 10)
            msa = ack.segment("MSA")
            out.append((str(msa[1]), str(msa[2]), str(msa[3]) if len(msa) > 3 else ""))
    finally:
        writer.close()
    return out


def _store(s3_server, bucket: str) -> ObjectStore:
    return ObjectStore(s3_server.client(), TargetConfig(bucket=bucket, sse="none"))


@pytest.fixture
def listener(s3_server, bucket):
    server = MllpListener(_store(s3_server, bucket), max_bytes=64 << 10, idle_seconds=5).start()
    yield server
    server.stop()


def test_each_message_is_kept_then_acknowledged(listener, s3_server, bucket):
    answers = asyncio.run(_exchange(listener.port, [GOOD, NO_STATUS, NOT_HL7, GOOD]))
    assert answers[0] == ("AA", "C1", "")
    assert answers[1] == ("AE", "C2", "HL7_PARSE_ERROR:OBR")  # kept, not readable as a report
    assert answers[2][0] == "AE" and answers[2][2] == "HL7_PARSE_ERROR:MSH"
    assert answers[3] == ("AA", "C1", "")  # sent again: acknowledged, kept once
    ledger = ReportLedger(_store(s3_server, bucket), DAY)
    kept = {sha for _key, sha, _raw in ledger.messages()}
    assert kept == {hashlib.sha256(GOOD).hexdigest(), hashlib.sha256(NO_STATUS).hexdigest()}
    today = ReportLedger(_store(s3_server, bucket), dt.datetime.now(dt.UTC).date())
    assert hashlib.sha256(NOT_HL7).hexdigest() in {sha for _k, sha, _r in today.messages()}  # undated: the day it came
    assert (listener.stats.accepted, listener.stats.errors, listener.stats.rejected) == (2, 2, 0)


def test_broken_blocks_never_stop_the_listener(listener):
    async def oversized() -> tuple[str, bool]:
        reader, writer = await open_hl7_connection("127.0.0.1", listener.port)
        writer.writeblock(GOOD[:-1] + b"x" * (70 << 10) + b"\r")
        await writer.drain()
        ack = await asyncio.wait_for(reader.readmessage(), 10)
        closed = await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        return str(ack.segment("MSA")[1]), closed

    async def no_start_byte() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(GOOD + b"\x1c\r")  # the block's <VT> is missing
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return data

    assert asyncio.run(oversized()) == ("AR", True)  # too big: refused, the RIS must split or resend
    assert asyncio.run(no_start_byte()) == b""  # not MLLP: the connection is closed, nothing answered
    assert asyncio.run(_exchange(listener.port, [GOOD])) == [("AA", "C1", "")]  # and the next sender is served


def test_an_archive_that_does_not_answer_is_a_reject(s3_server):
    dead = f"http://127.0.0.1:{free_port()}"
    client = boto3.client(
        "s3", endpoint_url=dead, region_name="us-east-1", aws_access_key_id="t", aws_secret_access_key="t",
        config=Config(connect_timeout=1, read_timeout=1, retries={"max_attempts": 1}),
    )  # fmt: skip
    server = MllpListener(ObjectStore(client, TargetConfig(bucket="nowhere", sse="none"))).start()
    try:
        assert asyncio.run(_exchange(server.port, [GOOD])) == [("AR", "C1", "not stored; send again")]
        assert server.stats.rejected == 1
    finally:
        server.stop()
