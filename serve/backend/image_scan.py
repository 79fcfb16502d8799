"""What an encoded image will cost to decode, read from its structure before any decoder
sees it (the standard library only).

Pillow's decoders are not all proportional to the pixels they make: some parse their
container in Python, a step per marker, chunk, tile or run, so a file of a few kilobytes
can keep one busy for seconds (docs/benchmarks.md "Where the code's constants come
from"). :func:`scan` recognises the served formats by their
first bytes (an allow-list: nothing else reaches a decoder), walks each container with
fixed-cost steps (a bounded number of them), and returns the work the decode will take
(:attr:`Scan.work`, in pixel-passes like ``ImageInfo.work``) counting what makes decoders
slow: JPEG scans and marker segments, PNG chunks and interlacing, GIF blocks before the
first frame, run-length and other compressed BMP, TIFF strips, tiles and pages, lossless
and animated WebP. Structures over the limits are refused with the reason; the server
still decodes every image under a deadline and a memory cap, whatever its estimate
(serve/backend/isolated_decode.py).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from .errors import UserError

# The served formats, by their first bytes (Pillow's format names).
SERVED = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")
SERVED_NAMES = "JPEG, PNG, GIF, BMP, TIFF, WebP"

# Structure limits (far above what real images have: a camera JPEG has ~20 segments and
# ~10 scans, a 40 MP PNG a few thousand IDAT chunks, a tiled TIFF a few thousand tiles).
MAX_JPEG_SEGMENTS = 500  # marker segments, fill and stray bytes (each a step for Pillow)
MAX_JPEG_SCANS = 40  # a progressive JPEG has ~10; each is a pass over the whole image
MAX_PNG_CHUNKS = 20_000
MAX_GIF_BLOCKS = 20_000  # extension blocks and sub-blocks before the first image
MAX_TIFF_PIECES = 100_000  # strips or tiles of the first page
MAX_TIFF_PAGES = 64
MAX_WEBP_CHUNKS = 1_000

# The cost of one parsing step, in pixel-passes (a marker segment, chunk or tile costs
# about what decoding STEP_COST pixels does; docs/benchmarks.md "Where the code's
# constants come from"), and the slowdown of decoders that work in Python or per unit.
STEP_COST = 2_000
RLE_BMP_FACTOR = 16  # Pillow's BMP run-length decoder is Python, per run
LOSSLESS_WEBP_FACTOR = 4
INTERLACED_PNG_FACTOR = 2
JPEG_SCAN_SHARE = 25  # ~25 extra scans of a progressive JPEG cost one more full decode


class ScanError(UserError, ValueError):
    """The bytes are not an image of a served format, or its structure is over a limit."""


@dataclass(frozen=True)
class Scan:
    """What the structure says: the format, the size, the work and what made it."""

    format: str
    width: int
    height: int
    work: int  # estimated decode work, pixel-passes
    why: str = ""  # what raised the work above the pixel count

    def __str__(self) -> str:
        extra = f", {self.why}" if self.why else ""
        return f"{self.format} {self.width}x{self.height}{extra}"


def sniff(data: bytes) -> str:
    """The served format these bytes start with, or :class:`ScanError` naming the
    served ones."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:2] == b"BM":
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    raise ScanError(
        f"not a readable image: not one of the served formats ({SERVED_NAMES}, known by "
        "their first bytes)"
    )


def scan(data: bytes) -> Scan:
    """Format, size and estimated decode work of ``data``, read from its structure in a
    bounded number of steps; :class:`ScanError` for anything else or over a limit."""
    fmt = sniff(data)
    try:
        return _SCANNERS[fmt](data)
    except (struct.error, IndexError) as e:
        raise ScanError(f"{fmt}: a truncated or malformed header ({e})") from None


def _check_size(fmt: str, width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise ScanError(f"{fmt}: {width}x{height} has no pixels")


# ---------------------------------------------------------------------------- JPEG
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
# after a scan's entropy-coded data: the next marker (FF followed by neither 00, a
# restart marker nor another FF)
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def _jpeg(data: bytes) -> Scan:
    i, n = 2, len(data)
    segments = scans = 0
    width = height = 0
    progressive = False
    while i < n:
        if data[i] != 0xFF:  # stray bytes before a marker: Pillow skips them one by one
            j = data.find(b"\xff", i)
            segments += (n if j < 0 else j) - i
            i = n if j < 0 else j
            if segments > MAX_JPEG_SEGMENTS:
                break
            continue
        j = i
        while j < n and data[j] == 0xFF:  # fill bytes: each one a step for Pillow
            j += 1
        segments += j - i
        if j >= n or segments > MAX_JPEG_SEGMENTS:
            break
        marker = data[j]
        i = j + 1
        if marker == 0xD9:  # EOI
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            continue
        (length,) = struct.unpack(">H", data[i : i + 2])
        if length < 2:
            raise ScanError(f"JPEG: a segment of length {length}")
        if marker in _SOF:
            height, width = struct.unpack(">HH", data[i + 3 : i + 7])
            progressive = progressive or marker in (0xC2, 0xC6, 0xCA, 0xCE)
        i += length
        if marker == 0xDA:  # SOS: skip the entropy-coded data to the next marker
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise ScanError(
                    f"JPEG: over {MAX_JPEG_SCANS} scans (progressive JPEGs have about 10)"
                )
            m = _NEXT_MARKER.search(data, i)
            i = m.start() if m else n
    if segments > MAX_JPEG_SEGMENTS:
        raise ScanError(f"JPEG: over {MAX_JPEG_SEGMENTS} marker segments (real JPEGs have ~20)")
    if not width:
        raise ScanError("JPEG: no frame header (SOF) before the end")
    _check_size("JPEG", width, height)
    pixels = width * height
    work = int(pixels * (1 + scans / JPEG_SCAN_SHARE)) + segments * STEP_COST
    why = f"{scans} scans, {segments} segments" if scans > 1 or segments > 64 else ""
    if progressive and not why:
        why = f"progressive, {scans} scans"
    return Scan("JPEG", width, height, work, why)


# ----------------------------------------------------------------------------- PNG
def _png(data: bytes) -> Scan:
    i, n = 8, len(data)
    chunks = 0
    width = height = interlace = 0
    while i + 8 <= n:
        length, kind = struct.unpack(">I4s", data[i : i + 8])
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise ScanError(f"PNG: over {MAX_PNG_CHUNKS} chunks")
        if kind == b"IHDR":
            width, height = struct.unpack(">II", data[i + 8 : i + 16])
            interlace = data[i + 20]
        if kind == b"IEND":
            break
        i += 12 + length
    if not width:
        raise ScanError("PNG: no IHDR chunk")
    _check_size("PNG", width, height)
    factor = INTERLACED_PNG_FACTOR if interlace else 1
    work = width * height * factor + chunks * STEP_COST
    why = ", ".join(
        w
        for w in ("interlaced" if interlace else "", f"{chunks} chunks" if chunks > 64 else "")
        if w
    )
    return Scan("PNG", width, height, work, why)


# ----------------------------------------------------------------------------- GIF
def _gif(data: bytes) -> Scan:
    width, height, flags = struct.unpack("<HHB", data[6:11])
    i = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    blocks = 0
    while True:
        blocks += 1
        if blocks > MAX_GIF_BLOCKS:
            raise ScanError(f"GIF: over {MAX_GIF_BLOCKS} blocks before the first image")
        kind = data[i]
        if kind == 0x2C:  # the first image: its own size may exceed the screen's
            w, h = struct.unpack("<HH", data[i + 5 : i + 9])
            width, height = max(width, w), max(height, h)
            break
        if kind != 0x21:
            raise ScanError(f"GIF: unexpected block 0x{kind:02x} before the first image")
        i += 2
        while data[i]:  # the extension's sub-blocks
            i += 1 + data[i]
            blocks += 1
        i += 1
    _check_size("GIF", width, height)
    why = f"{blocks} blocks before the image" if blocks > 16 else ""
    return Scan("GIF", width, height, width * height + blocks * STEP_COST, why)


# ----------------------------------------------------------------------------- BMP
_BMP_COMPRESSION = {0: "", 1: "RLE8", 2: "RLE4", 3: "", 6: ""}  # 3, 6: bit fields


def _bmp(data: bytes) -> Scan:
    (header,) = struct.unpack("<I", data[14:18])
    if header == 12:  # OS/2 core header
        width, height = struct.unpack("<HH", data[18:22])
        compression = 0
    else:
        width, height = struct.unpack("<ii", data[18:26])
        (compression,) = struct.unpack("<I", data[30:34])
    height = abs(height)
    if compression not in _BMP_COMPRESSION:
        raise ScanError(f"BMP: compression {compression} is not served (uncompressed or RLE)")
    _check_size("BMP", width, height)
    rle = _BMP_COMPRESSION[compression]
    factor = RLE_BMP_FACTOR if rle else 1
    return Scan("BMP", width, height, width * height * factor, rle and f"{rle} (decoded in Python)")


# ---------------------------------------------------------------------------- TIFF
def _tiff(data: bytes) -> Scan:
    order = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", data[4:8])
    width = height = 0
    pieces = pages = 0
    while ifd and pages < MAX_TIFF_PAGES + 1:
        pages += 1
        if pages > MAX_TIFF_PAGES:
            raise ScanError(f"TIFF: over {MAX_TIFF_PAGES} pages")
        (count,) = struct.unpack(order + "H", data[ifd : ifd + 2])
        if count > 1000:
            raise ScanError(f"TIFF: {count} tags in one directory")
        for k in range(count):
            at = ifd + 2 + 12 * k
            tag, kind, n = struct.unpack(order + "HHI", data[at : at + 8])
            value = data[at + 8 : at + 12]
            small = struct.unpack(
                order + ("H" if kind == 3 else "I"), value[: 2 if kind == 3 else 4]
            )[0]
            if pages == 1:
                if tag == 256:
                    width = small
                elif tag == 257:
                    height = small
                elif tag in (273, 324):  # StripOffsets, TileOffsets: one per piece
                    pieces = max(pieces, n)
        (ifd,) = struct.unpack(order + "I", data[ifd + 2 + 12 * count : ifd + 6 + 12 * count])
    if pieces > MAX_TIFF_PIECES:
        raise ScanError(f"TIFF: {pieces} strips or tiles (over {MAX_TIFF_PIECES})")
    _check_size("TIFF", width, height)
    why = ", ".join(
        w
        for w in (
            f"{pieces} strips/tiles" if pieces > 256 else "",
            f"{pages} pages" if pages > 1 else "",
        )
        if w
    )
    return Scan("TIFF", width, height, width * height + (pieces + pages) * STEP_COST, why)


# ---------------------------------------------------------------------------- WebP
def _webp(data: bytes) -> Scan:
    i, n = 12, len(data)
    chunks = frames = 0
    width = height = 0
    lossless = False
    while i + 8 <= n:
        kind, length = struct.unpack("<4sI", data[i : i + 8])
        chunks += 1
        if chunks > MAX_WEBP_CHUNKS:
            raise ScanError(f"WebP: over {MAX_WEBP_CHUNKS} chunks")
        body = data[i + 8 : i + 8 + min(length, 32)]
        if kind == b"VP8X":
            w = int.from_bytes(body[4:7], "little") + 1
            h = int.from_bytes(body[7:10], "little") + 1
            width, height = max(width, w), max(height, h)
        elif kind == b"VP8 " and not width:
            w, h = struct.unpack("<HH", body[6:10])
            width, height = w & 0x3FFF, h & 0x3FFF
        elif kind == b"VP8L":
            lossless = True
            if not width:
                bits = int.from_bytes(body[1:5], "little")
                width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        elif kind == b"ANMF":
            frames += 1
            lossless = lossless or data[i + 8 + 16 : i + 8 + 20] == b"VP8L"
        i += 8 + length + (length & 1)
    _check_size("WEBP", width, height)
    factor = LOSSLESS_WEBP_FACTOR if lossless else 1
    work = width * height * factor + (chunks + frames) * STEP_COST
    why = ", ".join(
        w for w in ("lossless" if lossless else "", f"{frames} frames" if frames > 1 else "") if w
    )
    return Scan("WEBP", width, height, work, why)


_SCANNERS = {"JPEG": _jpeg, "PNG": _png, "GIF": _gif, "BMP": _bmp, "TIFF": _tiff, "WEBP": _webp}
