"""WADO-RS (PS3.18 10.4) pieces: multipart/related bodies streamed part by
part, metadata as DICOM JSON, frames, and rendered images."""

from __future__ import annotations

import io
import secrets
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import UID

DICOM = "application/dicom"
OCTETS = "application/octet-stream"
INLINE_BULK = 1 << 20  # binary values up to this size go inline (base64) in metadata


class NotAcceptable(ValueError):
    """The client asked for a representation the service does not produce (406)."""


def boundary() -> str:
    return f"pacs-{secrets.token_hex(12)}"


def content_type(part_type: str, mark: str) -> str:
    return f'multipart/related; type="{part_type}"; boundary={mark}'


def multipart(parts: Iterable[tuple[str, Iterable[bytes]]], mark: str) -> Iterator[bytes]:
    """A multipart/related body; each part's bytes are passed through as they come."""
    for part_type, chunks in parts:
        yield f"--{mark}\r\nContent-Type: {part_type}\r\n\r\n".encode()
        yield from chunks
        yield b"\r\n"
    yield f"--{mark}--\r\n".encode()


def check_accept(accept: str | None, wanted: str) -> None:
    """Accept ``wanted`` in multipart/related (or anything); the stored
    transfer syntax is what is sent (``transfer-syntax=*`` or none asked)."""
    if not accept or "*/*" in accept:
        return
    for item in accept.split(","):
        media = item.split(";")[0].strip().lower()
        params = {
            p.split("=", 1)[0].strip().lower(): p.split("=", 1)[1].strip().strip('"')
            for p in item.split(";")[1:]
            if "=" in p
        }
        if media in ("multipart/related", "multipart/*") and params.get("type", wanted) in (wanted, "*/*"):
            return
        if media == wanted:
            return
    raise NotAcceptable(f'this service sends multipart/related; type="{wanted}" (asked: {accept})')


def metadata(ds: Dataset, transfer_syntax: str | None) -> dict[str, Any]:
    """One instance's metadata as DICOM JSON: every attribute but the pixel
    data, large binary values inline, its transfer syntax as available."""
    ds = ds.copy()
    for tag in (0x7FE00010, 0x7FE00008, 0x7FE00009):
        if tag in ds:
            del ds[tag]
    if transfer_syntax:
        ds.AvailableTransferSyntaxUID = transfer_syntax
    return ds.to_json_dict(bulk_data_threshold=INLINE_BULK, suppress_invalid_tags=True)


def frames(data: bytes, numbers: list[int]) -> tuple[str, list[bytes]]:
    """(transfer syntax, the frames asked for, 1-based) of a Part 10 object."""
    ds = pydicom.dcmread(io.BytesIO(data))
    ts = UID(str(ds.file_meta.TransferSyntaxUID))
    n = int(ds.get("NumberOfFrames", 1) or 1)
    bad = [f for f in numbers if not 1 <= f <= n]
    if bad:
        raise LookupError(f"frame {bad[0]} does not exist (the instance has {n})")
    if "PixelData" not in ds:
        raise LookupError("the instance has no pixel data")
    if ts.is_encapsulated:
        every = list(generate_frames(ds.PixelData, number_of_frames=n))
        return str(ts), [every[f - 1] for f in numbers]
    size = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8
    pixels = ds.PixelData
    return str(ts), [pixels[(f - 1) * size : f * size] for f in numbers]


def rendered(data: bytes, frame: int = 1, media: str = "image/png", size: int | None = None) -> bytes:
    """One frame as a PNG or JPEG, windowed as the object says (or min-max), for thumbnails."""
    from PIL import Image
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(io.BytesIO(data))
    arr = ds.pixel_array
    n = int(ds.get("NumberOfFrames", 1) or 1)
    if n > 1:
        arr = arr[frame - 1]
    if int(ds.get("SamplesPerPixel", 1)) == 1:
        arr = apply_modality_lut(arr, ds)
        arr = apply_voi_lut(arr, ds) if "WindowCenter" in ds else arr
        arr = arr.astype(np.float64)
        low, high = float(arr.min()), float(arr.max())
        arr = (arr - low) / (high - low or 1.0) * 255.0
        if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
            arr = 255.0 - arr
        image = Image.fromarray(arr.astype(np.uint8))  # 2-D uint8: L
    else:
        image = Image.fromarray(np.asarray(arr, dtype=np.uint8))  # rows x columns x 3: RGB
    if size:
        image.thumbnail((size, size))
    out = io.BytesIO()
    image.save(out, format="JPEG" if media == "image/jpeg" else "PNG")
    return out.getvalue()
