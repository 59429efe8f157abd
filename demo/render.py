"""Render a report e-mail's HTML to PNG with headless Chromium.

`python -m demo.render demo-output/emails/mail-0002.eml docs/report-example.png`
"""

from __future__ import annotations

import email
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def html_of_eml(path: Path) -> str:
    msg = email.message_from_bytes(Path(path).read_bytes())
    for part in msg.walk():
        if part.get_content_type() == "text/html":
            return part.get_payload(decode=True).decode("utf-8")
    raise ValueError(f"{path} has no HTML part")


def png_size(data: bytes) -> tuple[int, int]:
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    return struct.unpack(">II", data[16:24])


def render_html_to_png(html: str, out: Path, width: int = 980, height: int = 760, timeout: float = 60) -> Path:
    """Screenshot ``html`` (a self-contained page) with headless Chromium."""
    binary = chromium_binary()
    if binary is None:
        raise FileNotFoundError("chromium is not installed (Debian package `chromium`)")
    with tempfile.TemporaryDirectory(prefix="render-") as tmp:
        page = Path(tmp) / "report.html"
        page.write_text(html, encoding="utf-8")
        out = Path(out).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            [
                binary,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={tmp}/profile",
                f"--window-size={width},{height}",
                f"--screenshot={out}",
                page.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return out


def main(argv: list[str]) -> int:
    src, dest = Path(argv[0]), Path(argv[1])
    render_html_to_png(html_of_eml(src), dest)
    print(f"{dest}: {png_size(dest.read_bytes())}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
