"""An SMTP server (aiosmtpd) on loopback that keeps every mail as an .eml file."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

from aiosmtpd.controller import Controller


class _KeepAsEml:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._n = itertools.count(1)
        self._lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope) -> str:
        with self._lock:
            n = next(self._n)
            while (path := self.folder / f"mail-{n:04d}.eml").exists():
                n = next(self._n)
            path.write_bytes(envelope.original_content or envelope.content)
        return "250 Message accepted for delivery"


class MailSink:
    def __init__(self, folder: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if port == 0:
            from peers.ports import free_port

            port = free_port()
        self.controller = Controller(_KeepAsEml(self.folder), hostname=host, port=port)
        self.controller.start()
        self.host, self.port = host, port

    def messages(self) -> list[Path]:
        return sorted(self.folder.glob("*.eml"))

    def stop(self) -> None:
        self.controller.stop()
