"""Images that are cheap to send and expensive to decode: one per class of decoder that
is slow per byte, per marker or per small unit rather than per pixel (the tests' and
``make bench``'s corpus against the image endpoint; Pillow and NumPy only).

Each is a few hundred bytes to a few tens of kilobytes, within every size limit of the
served formats, and decodes to a valid picture: what a stranger would send to hold the
decoders. :func:`corpus` names them; serve/backend/image_scan.py is what must see through
them.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

from PIL import Image


def rle8_bmp(side: int = 4000) -> bytes:
    """A run-length (RLE8) BMP of ``side`` x ``side`` pixels in a few kilobytes: runs of
    255 pixels, decoded by Pillow's Python RLE decoder run by run."""
    row = b"\xff\x01" * (side // 255) + bytes([side % 255, 1]) + b"\x00\x00"
    pixels = row * side + b"\x00\x01"
    palette = b"".join(bytes([i, i, i, 0]) for i in range(256))
    info = struct.pack("<IiiHHIIiiII", 40, side, side, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    offset = 14 + len(info) + len(palette)
    head = b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset)
    return head + info + palette + pixels


def rle_eol_bmp(width: int = 4_000_000, height: int = 10) -> bytes:
    """A run-length BMP of a few dozen bytes: each row one pixel and an end-of-line escape,
    which Pillow's Python decoder pads to the row's width a pixel at a time (extreme aspect
    ratios are served, so a row may be millions of pixels wide)."""
    pixels = b"\x01\x05\x00\x00" * height + b"\x00\x01"
    palette = b"".join(bytes([i, i, i, 0]) for i in range(256))
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    offset = 14 + len(info) + len(palette)
    head = b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset)
    return head + info + palette + pixels


def rle4_bmp(side: int = 4000) -> bytes:
    """The same in RLE4 (two pixels per run byte, the same Python decoder)."""
    row = b"\xff\x12" * (side // 255) + bytes([side % 255, 0x12]) + b"\x00\x00"
    pixels = row * side + b"\x00\x01"
    palette = b"".join(bytes([i * 16, i * 16, i * 16, 0]) for i in range(16))
    info = struct.pack("<IiiHHIIiiII", 40, side, side, 1, 4, 2, len(pixels), 2835, 2835, 16, 0)
    offset = 14 + len(info) + len(palette)
    head = b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset)
    return head + info + palette + pixels


def marker_jpeg(segments: int = 3000) -> bytes:
    """A small baseline JPEG with ``segments`` empty APP marker segments before its frame
    (Pillow parses each one in Python)."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 150)).save(buf, "JPEG")
    data = buf.getvalue()
    return data[:2] + b"\xff\xe5\x00\x02" * segments + data[2:]


def progressive_jpeg(side: int = 6000, scans: int = 40) -> bytes:
    """A flat ``side`` x ``side`` progressive JPEG whose last scan repeats up to ``scans``
    (~0.2 MB; each scan is another pass over the whole image)."""
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (120, 130, 140)).save(buf, "JPEG", progressive=True)
    data = buf.getvalue()
    last, end = data.rfind(b"\xff\xda"), data.rfind(b"\xff\xd9")
    extra = max(0, scans - data.count(b"\xff\xda"))
    return data[:end] + data[last:end] * extra + data[end:]


def lossless_webp(side: int = 6000) -> bytes:
    """A flat ``side`` x ``side`` lossless WebP: a few hundred bytes."""
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (10, 200, 30)).save(buf, "WEBP", lossless=True, quality=0)
    return buf.getvalue()


def interlaced_png(side: int = 6000) -> bytes:
    """A flat ``side`` x ``side`` Adam7-interlaced PNG (Pillow decodes seven passes)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    raw = bytearray()
    for y0, x0, dy, dx in (
        (0, 0, 8, 8),
        (0, 4, 8, 8),
        (4, 0, 8, 4),
        (0, 2, 4, 4),
        (2, 0, 4, 2),
        (0, 1, 2, 2),
        (1, 0, 2, 1),
    ):
        cols = len(range(x0, side, dx))
        for _ in range(y0, side, dy):
            raw += b"\x00" + b"\x80\x40\x20" * cols
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 1)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(bytes(raw), 9))
        + chunk(b"IEND", b"")
    )


def chunked_png(side: int = 512, chunk_bytes: int = 1) -> bytes:
    """A ``side`` x ``side`` PNG whose compressed data is split into IDAT chunks of
    ``chunk_bytes`` (Pillow reads chunk by chunk in Python)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    raw = (b"\x00" + b"\x10\x20\x30" * side) * side
    data = zlib.compress(raw, 9)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    idats = b"".join(
        chunk(b"IDAT", data[i : i + chunk_bytes]) for i in range(0, len(data), chunk_bytes)
    )
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idats + chunk(b"IEND", b"")


def tiled_tiff(side: int = 4096, tile: int = 16) -> bytes:
    """A ``side`` x ``side`` deflate TIFF in ``tile`` x ``tile`` tiles that all share one
    compressed tile (a table of offsets and one tile: one decoder call per tile)."""
    tiles = (side // tile) ** 2
    data = zlib.compress(b"\x40\x80\xc0" * tile * tile, 9)
    entries = [  # tag, type (3 SHORT, 4 LONG), count, value or offset
        (256, 4, 1, side),
        (257, 4, 1, side),
        (258, 3, 3, None),
        (259, 3, 1, 8),  # Adobe deflate
        (262, 3, 1, 2),  # RGB
        (277, 3, 1, 3),
        (284, 3, 1, 1),
        (322, 4, 1, tile),
        (323, 4, 1, tile),
        (324, 4, tiles, None),  # TileOffsets
        (325, 4, tiles, None),  # TileByteCounts
    ]
    ifd_at = 8
    extra_at = ifd_at + 2 + 12 * len(entries) + 4
    bits_at, offsets_at = extra_at, extra_at + 6
    counts_at = offsets_at + 4 * tiles
    data_at = counts_at + 4 * tiles
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        if value is None:
            value = {258: bits_at, 324: offsets_at, 325: counts_at}[tag]
        packed = (
            struct.pack("<H", value) + b"\0\0"
            if kind == 3 and count == 1
            else struct.pack("<I", value)
        )
        ifd += struct.pack("<HHI", tag, kind, count) + packed
    ifd += struct.pack("<I", 0)
    body = struct.pack("<HHH", 8, 8, 8)
    body += struct.pack("<I", data_at) * tiles + struct.pack("<I", len(data)) * tiles
    return b"II*\x00" + struct.pack("<I", ifd_at) + ifd + body + data


def gif_blocks(blocks: int = 5000) -> bytes:
    """A small GIF with ``blocks`` comment extensions before its image (each parsed in
    Python)."""
    buf = io.BytesIO()
    Image.new("P", (16, 16), 1).save(buf, "GIF")
    data = buf.getvalue()
    at = data.index(b"\x2c")  # the image descriptor
    return data[:at] + b"\x21\xfe\x01x\x00" * blocks + data[at:]


def corpus() -> dict[str, Callable[[], bytes]]:
    """Every class by name, each a function making its image."""
    return {
        "rle8-bmp": rle8_bmp,
        "rle-eol-bmp": rle_eol_bmp,
        "rle4-bmp": rle4_bmp,
        "marker-jpeg": marker_jpeg,
        "progressive-jpeg": progressive_jpeg,
        "lossless-webp": lossless_webp,
        "interlaced-png": interlaced_png,
        "chunked-png": chunked_png,
        "tiled-tiff": tiled_tiff,
        "gif-blocks": gif_blocks,
    }
