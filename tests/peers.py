"""Real DICOM peers for tests: an Orthanc (Debian package `orthanc`) started
on free loopback ports with its own configuration and storage folder, and a
generator of many studies on one date."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from include.pacs_migration.config import SourceConfig
from peers.ports import free_port


def loopback_source(port: int, called: str = "LEGACYPACS", **overrides: float) -> SourceConfig:
    """A source on loopback with the tests' short timeouts."""
    settings = {"acse_timeout": 5, "dimse_timeout": 30, "network_timeout": 30, **overrides}
    return SourceConfig(host="127.0.0.1", port=port, called_ae_title=called, calling_ae_title="PACSMIGRATE", **settings)


def require_binary(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} (Debian package {package}) is required in CI; .ci/run installs it")
        pytest.skip(f"{name} not installed (Debian package {package})")
    return path


def _wait_ready(proc: subprocess.Popen, probe, seconds: float = 10.0) -> bool:
    """Poll ``probe`` (raises OSError until the peer answers); False if the
    process died or the bound passed."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            probe()
            return True
        except OSError:
            if proc.poll() is not None:
                return False
            time.sleep(0.1)
    return False


def _stop(proc: subprocess.Popen, log) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    log.close()


class Orthanc:
    """One Orthanc process; ``calling_aes`` are registered as DICOM modalities."""

    def __init__(
        self, folder: Path, calling_aes: dict[str, int] | None = None, *, tcp_nodelay: bool = False, **options
    ) -> None:
        """``tcp_nodelay``: DCMTK's TCP_NODELAY=1 for its DICOM server, as a PACS that answers
        promptly; without it each small write waits for a delayed ACK (~40 ms a C-FIND)."""
        binary = require_binary("Orthanc", "orthanc")
        self.folder = Path(folder)
        (self.folder / "db").mkdir(parents=True, exist_ok=True)
        self.http_port, self.dicom_port = free_port(), free_port()
        self.ae_title = "ORTHANC"
        config = {
            "Name": "test-legacy-pacs",
            "StorageDirectory": str(self.folder / "db"),
            "IndexDirectory": str(self.folder / "db"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.ae_title,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "Plugins": [],
            "DicomModalities": {
                ae.lower(): [ae, "127.0.0.1", port] for ae, port in (calling_aes or {"PACSMIGRATE": 11112}).items()
            },
            **options,
        }
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config))
        self.log = open(self.folder / "orthanc.log", "wb")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, **({"TCP_NODELAY": "1"} if tcp_nodelay else {})}
        self.proc = subprocess.Popen([binary, str(path)], stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{self.http_port}"
        if not _wait_ready(self.proc, lambda: urllib.request.urlopen(f"{self.url}/system", timeout=1).close()):
            self.stop()
            raise RuntimeError(f"Orthanc did not start; see {self.folder / 'orthanc.log'}")

    def upload(self, data: bytes) -> None:
        req = urllib.request.Request(
            f"{self.url}/instances", data=data, method="POST", headers={"Content-Type": "application/dicom"}
        )
        urllib.request.urlopen(req, timeout=30).close()

    def upload_folder(self, root: Path) -> int:
        n = 0
        for path in sorted(Path(root).rglob("*.dcm")):
            try:
                self.upload(path.read_bytes())
                n += 1
            except urllib.error.HTTPError:
                pass  # Orthanc refuses what it cannot parse
        return n

    def stop(self) -> None:
        _stop(self.proc, self.log)


def many_studies(root: Path, n: int, date: str = "20190301", same_time: bool = False) -> list[str]:
    """``n`` one-instance CT studies on one StudyDate, StudyTimes spread over the day."""
    root.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    uids = []
    for i in range(n):
        ds = template.copy()
        ds.StudyInstanceUID = generate_uid(entropy_srcs=["many", date, str(i)])
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=["many-series", date, str(i)])
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["many-sop", date, str(i)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyDate = date
        seconds = 0 if same_time else (i * 86399) // max(1, n - 1)
        ds.StudyTime = "083000" if same_time else f"{seconds // 3600:02d}{seconds % 3600 // 60:02d}{seconds % 60:02d}"
        ds.PatientName = f"CANARY^STUDY{i:03d}"
        ds.PatientID = f"CANARY{i:05d}"
        ds.save_as(root / f"{i:04d}.dcm", enforce_file_format=True)
        uids.append(str(ds.StudyInstanceUID))
    return uids


class Dcmqrscp:
    """One DCMTK ``dcmqrscp`` (Debian package ``dcmtk``): a Query/Retrieve SCP
    with its own configuration and index folder, filled over C-STORE by
    ``storescu``. ``move_destinations`` are its HostTable (C-MOVE targets)."""

    def __init__(self, folder: Path, move_destinations: dict[str, int] | None = None, max_pdu: int = 65536) -> None:
        binary = require_binary("dcmqrscp", "dcmtk")
        self.folder = Path(folder)
        db = self.folder / "db"
        db.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.ae_title = "DCMQRSCP"
        hosts = "\n".join(f"{ae.lower()} = ({ae}, 127.0.0.1, {port})" for ae, port in (move_destinations or {}).items())
        config = (
            f"NetworkTCPPort = {self.port}\nMaxPDUSize = {max_pdu}\nMaxAssociations = 16\n"
            f"HostTable BEGIN\n{hosts}\nHostTable END\n"
            "VendorTable BEGIN\nVendorTable END\n"
            f"AETable BEGIN\n{self.ae_title} {db} RW (500, 1024mb) ANY\nAETable END\n"
        )
        self.config = self.folder / "dcmqrscp.cfg"
        self.config.write_text(config)
        self.log = open(self.folder / "dcmqrscp.log", "wb")  # noqa: SIM115 - closed in stop()
        # TCP_NODELAY=1: DCMTK is ~30x slower on loopback without it.
        self.env = {**os.environ, "TCP_NODELAY": "1"}
        # Default fork mode: --single-process segfaults after the first
        # association in Debian's DCMTK 3.6.7.
        self.proc = subprocess.Popen(
            [binary, "-c", str(self.config), str(self.port)], stdout=self.log, stderr=subprocess.STDOUT, env=self.env
        )
        if not _wait_ready(self.proc, lambda: socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()):
            self.stop()
            raise RuntimeError(f"dcmqrscp did not start; see {self.folder / 'dcmqrscp.log'}")

    def load(self, paths: list[Path]) -> None:
        """C-STORE ``paths`` into the archive with ``storescu``."""
        storescu = require_binary("storescu", "dcmtk")
        for start in range(0, len(paths), 200):  # bounded command lines
            subprocess.run(
                [
                    storescu,
                    "-aec",
                    self.ae_title,
                    "-aet",
                    "LOADER",
                    "-xs",
                    "127.0.0.1",
                    str(self.port),
                    *map(str, paths[start : start + 200]),
                ],
                check=True,
                env=self.env,
                timeout=300,
                capture_output=True,
            )

    def stop(self) -> None:
        _stop(self.proc, self.log)


def series_study(
    root: Path,
    series: int,
    per_series: list[int] | None = None,
    date: str = "20190301",
    modality: str = "CT",
    tag: str = "big",
) -> dict[str, list[str]]:
    """One study of ``series`` series (SeriesTimes spread over the day) holding
    ``per_series[i]`` tiny instances each (8x8 pixels); returns series UID -> SOP UIDs."""
    root.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    template.Rows = template.Columns = 8
    template.PixelData = bytes(8 * 8 * 2)
    template.Modality = modality
    template.StudyInstanceUID = generate_uid(entropy_srcs=[tag, date])
    template.StudyDate, template.StudyTime = date, "101010"
    out: dict[str, list[str]] = {}
    for s in range(series):
        series_uid = generate_uid(entropy_srcs=[tag, date, "series", str(s)])
        seconds = (s * 86399) // max(1, series - 1)
        out[series_uid] = []
        for i in range((per_series or [1] * series)[s]):
            ds = template.copy()
            ds.SeriesInstanceUID = series_uid
            ds.SeriesTime = f"{seconds // 3600:02d}{seconds % 3600 // 60:02d}{seconds % 60:02d}"
            ds.SeriesNumber, ds.InstanceNumber = s + 1, i + 1
            ds.SOPInstanceUID = generate_uid(entropy_srcs=[tag, date, str(s), str(i)])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.save_as(root / f"{s:03d}-{i:05d}.dcm", enforce_file_format=True)
            out[series_uid].append(str(ds.SOPInstanceUID))
    return out


class ConnectionCounter:
    """A TCP relay in front of a peer that counts its open connections (the
    associations a DICOM client holds): ``max_active`` is the most at once, ``total`` all."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.active = self.max_active = self.total = 0
        self._lock = threading.Lock()
        self._ends: dict[socket.socket, Any] = {}  # open client sockets -> their end()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _settle_closed(self) -> None:
        """End now the connections whose client has closed (its EOF waits to be
        read), not when their relay thread gets round to it: a client that
        releases and opens its next association at once held one, not two."""
        with self._lock:
            ends = list(self._ends.items())
        for sock, end in ends:
            try:
                if select.select([sock], [], [], 0)[0] and sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                    end()
            except (OSError, ValueError):  # closed meanwhile by its relay
                end()

    def _relay(self, client: socket.socket) -> None:
        self._settle_closed()
        ended = False

        def end() -> None:  # once: when the client closes, its association is over
            nonlocal ended
            with self._lock:
                if not ended:
                    ended = True
                    self.active -= 1
                    self._ends.pop(client, None)

        with self._lock:
            self.active += 1
            self.total += 1
            self.max_active = max(self.max_active, self.active)
            self._ends[client] = end

        try:
            with client, socket.create_connection(("127.0.0.1", self.target_port)) as upstream:
                for sock in (client, upstream):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                back = threading.Thread(target=_pipe, args=(upstream, client), daemon=True)
                back.start()
                _pipe(client, upstream)
                # Not when the peer gets round to closing its end: a busy single-process
                # peer (dcmqrscp) may close long after the client released and went.
                end()
                back.join(timeout=60)
        except OSError:
            pass
        finally:
            end()

    def stop(self) -> None:
        self._server.close()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(1 << 16):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
