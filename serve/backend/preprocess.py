"""Image decoding and the eval geometry, with Pillow and NumPy only (no torch; of this
project only its own package: it runs inside Triton's preprocess model as it runs in the
client and the training data loader).

Reproduces the training eval transform exactly - torchvision's PIL path of
``Resize(resize)`` (shorter side, Pillow's resampling) and ``CenterCrop(crop)`` - and
returns float32 0..255 RGB pixels, CHW: exported models normalize inside.

The work per image is bounded before anything big is allocated: only the formats we
serve are decoded (``SERVED_FORMATS``, recognised by their first bytes); the encoded size
and the source pixels are checked from the header; :func:`inspect` reads an image's
structure without Pillow (serve/backend/image_scan.py: JPEG scans and segments, PNG chunks,
TIFF strips and pages, run-length BMP, lossless WebP - what makes decoders slow per byte
rather than per pixel) and refuses what is over its limits; a tiled image's tiles (TIFF)
may not be much larger than the image (a 64x64 TIFF with one 26500x26500 deflate tile
decodes 2 GB); 16/32-bit images are scaled to 8 bits in row blocks of float32 (no float64
copy of the whole image). Any aspect ratio is served: where ``Resize`` would make an
image over ``max_resized_pixels`` (a 1x65535 GIF would become 256 x 16.7 M), only the
center crop's source region is resampled (Pillow's ``resize(box=...)``, the same filter
weights), so the work is bounded by the crop.

Time and memory are bounded in the server: every image is decoded out of process under a
deadline and a memory cap (serve/backend/isolated_decode.py): a cheap one (estimated work up
to ``max_fast_work``, default a 16 MP baseline JPEG, ~0.4 s here) in the instance's
reused decoder process, an expensive one in a forked child killed at
``decode_deadline_s`` and only in one of a few ``SlowLane`` slots shared by all of a
model's instances, so expensive images never occupy every instance: when the lane is
full, the next one is refused at once as "server busy" and the normal images go on. A
request's images are bounded in total too (``max_request_work``, ``request_deadline_s``).
Every failure - a missing file, a corrupt or truncated stream, a bad EXIF
block, a decoder error of any type - becomes an :class:`ImageError` that names the input
and the reason.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import image_scan as scanning
from .errors import UsageError, UserError

# Limits (the server-side preprocess model reads them from its config parameters).
MAX_IMAGE_BYTES = 64 << 20  # encoded bytes per image
MAX_PIXELS = 40_000_000  # source pixels (width x height) per image
MAX_ASPECT_RATIO = 0.0  # longer side / shorter side; 0: any (served by crop-before-resize)
MAX_TILE_RATIO = 4.0  # a tile's pixels / the image's pixels (beyond a 1 MP floor)
ROW_BLOCK_PIXELS = 1 << 20  # 16/32-bit -> 8-bit conversion works on blocks this big
MAX_RESIZED_PIXELS = 8_000_000  # pixels of the resized image, before the crop
MAX_FAST_WORK = 16_000_000  # estimated decode work decoded in place (ImageInfo.work)
DECODE_DEADLINE_S = 5.0  # an expensive image's decode is killed after this long
DECODE_MEMORY_BYTES = 1 << 30  # a decoder process's address space beyond its start
MAX_REQUEST_WORK = 256_000_000  # estimated decode work of one request's images (~6 s)
REQUEST_DEADLINE_S = 10.0  # one request's images decoded within this, in all
SLOW_LANE_SLOTS = 1  # expensive decodes at once, across all instances of a model
# An isolated (expensive) decode runs at this nice value: the cores go to cheap requests
# first and the expensive image gets what is left, within its deadline
DECODE_NICE = 10
DEFAULT_MAX_PIXELS = MAX_PIXELS  # older name

# Pillow format names decoded here (EPS, FITS, PSD, ... are never reached).
SERVED_FORMATS = scanning.SERVED
# File extensions read from image folders (the same formats).
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")

DEFAULT_INTERPOLATION = "bilinear"
RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

ImageSource = str | Path | bytes


class ImageError(UserError, ValueError):
    """An input that is not a usable image; the message names the input and the problem."""


class DecodeBusy(UserError, RuntimeError):
    """No slow-lane slot is free for an expensive image: retry later (not a bad image)."""


@dataclass(frozen=True)
class ResizeCrop:
    """The eval geometry of a model: shorter side to ``resize``, then a centered ``crop``."""

    resize: int
    crop: int
    interpolation: str = DEFAULT_INTERPOLATION

    def __post_init__(self) -> None:
        if self.interpolation not in RESAMPLING:
            raise UsageError(
                f"unknown interpolation {self.interpolation!r}; known: {', '.join(RESAMPLING)}"
            )
        if not (0 < self.crop <= self.resize):
            raise UsageError(f"need 0 < crop ({self.crop}) <= resize ({self.resize})")

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(w, h) after ``Resize(resize)``: the shorter side becomes ``resize``."""
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.resize, int(self.resize * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)


@dataclass(frozen=True)
class Limits:
    """Per-image bounds (see the module constants)."""

    max_bytes: int = MAX_IMAGE_BYTES
    max_pixels: int = MAX_PIXELS
    max_aspect_ratio: float = MAX_ASPECT_RATIO
    max_resized_pixels: int = MAX_RESIZED_PIXELS
    max_fast_work: int = MAX_FAST_WORK
    decode_deadline_s: float = DECODE_DEADLINE_S
    decode_memory_bytes: int = DECODE_MEMORY_BYTES
    max_request_work: int = MAX_REQUEST_WORK
    request_deadline_s: float = REQUEST_DEADLINE_S


DEFAULT_LIMITS = Limits()


def describe(source: ImageSource) -> str:
    """A short name for an input in error messages."""
    return f"<{len(source)} bytes>" if isinstance(source, bytes | bytearray) else str(source)


def _reason(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _open(source: ImageSource, name: str, limits: Limits) -> Image.Image:
    if isinstance(source, bytes | bytearray):
        if not source:
            raise ImageError(f"{name}: empty input")
        if len(source) > limits.max_bytes:
            raise ImageError(
                f"{name}: {len(source)} bytes is over the {limits.max_bytes} byte limit"
            )
        try:
            scanning.sniff(bytes(source[:16]))
        except scanning.ScanError as e:
            raise ImageError(f"{name}: {e}") from None
        fp: io.BytesIO | Path = io.BytesIO(source)
    else:
        fp = Path(source)
        try:
            size = fp.stat().st_size
        except OSError:
            raise ImageError(f"{name}: no such file") from None
        if not fp.is_file():
            raise ImageError(f"{name}: not a file")
        if size == 0:
            raise ImageError(f"{name}: empty file")
        if size > limits.max_bytes:
            raise ImageError(f"{name}: {size} bytes is over the {limits.max_bytes} byte limit")
    try:
        with warnings.catch_warnings():
            # Our own limits (checked next) are lower; Pillow's hard limit still raises.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(fp, formats=SERVED_FORMATS)
    except UnidentifiedImageError:
        raise ImageError(
            f"{name}: not a readable image (unknown format or corrupt data; "
            f"served formats: {', '.join(SERVED_FORMATS)})"
        ) from None
    except Exception as e:  # noqa: BLE001 - any decoder failure names the input
        raise ImageError(f"{name}: not a readable image ({_reason(e)})") from e


def check_size(name: str, width: int, height: int, limits: Limits) -> None:
    """Refuse a source whose pixel count or aspect ratio is over the limits."""
    if width < 1 or height < 1:
        raise ImageError(f"{name}: {width}x{height} has no pixels")
    if width * height > limits.max_pixels:
        raise ImageError(
            f"{name}: {width}x{height} = {width * height / 1e6:.1f} MP is over the "
            f"{limits.max_pixels / 1e6:.0f} MP limit"
        )
    ratio = max(width, height) / min(width, height)
    if limits.max_aspect_ratio and ratio > limits.max_aspect_ratio:
        raise ImageError(
            f"{name}: {width}x{height} has an extreme aspect ratio ({ratio:.0f}:1, over "
            f"the {limits.max_aspect_ratio:g}:1 limit)"
        )


def check_work(name: str, im: Image.Image, limits: Limits) -> None:
    """Refuse what is small to send but expensive to decode that the structure scan
    cannot see: tiles far larger than the image."""
    width, height = im.size
    allowed = max(MAX_TILE_RATIO * width * height, 1 << 20)
    for tile in getattr(im, "tile", None) or []:
        x0, y0, x1, y1 = tile[1]
        if (x1 - x0) * (y1 - y0) > allowed:
            raise ImageError(
                f"{name}: a {x1 - x0}x{y1 - y0} tile in a {width}x{height} image "
                "(far larger than the image it holds)"
            )


def inspect(source: ImageSource, limits: Limits = DEFAULT_LIMITS) -> scanning.Scan:
    """Read the structure only (serve/backend/image_scan.py, no decoder): format, size and
    estimated decode work; refuse what is not a served format or over the limits. A few
    steps per marker, chunk or tile, bounded in number."""
    name = describe(source)
    if isinstance(source, bytes | bytearray):
        data = bytes(source)
    else:
        try:
            data = Path(source).read_bytes()
        except OSError:
            raise ImageError(f"{name}: no such file") from None
    if not data:
        raise ImageError(f"{name}: empty input")
    if len(data) > limits.max_bytes:
        raise ImageError(f"{name}: {len(data)} bytes is over the {limits.max_bytes} byte limit")
    try:
        info = scanning.scan(data)
    except scanning.ScanError as e:
        raise ImageError(f"{name}: {e}") from None
    check_size(name, info.width, info.height, limits)
    return info


def _to_8bit(im: Image.Image) -> Image.Image:
    """16/32-bit grayscale -> 8 bits (scaled, not clipped at 255), in float32 row blocks."""
    arr = np.asarray(im)
    scale = 255.0 / 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 1.0
    out = np.empty(arr.shape, np.uint8)
    rows = max(1, ROW_BLOCK_PIXELS // max(1, arr.shape[1]))
    for i in range(0, arr.shape[0], rows):
        block = arr[i : i + rows].astype(np.float32) * np.float32(scale)
        out[i : i + rows] = np.clip(block, 0, 255).astype(np.uint8)
    return Image.fromarray(out, "L")


def load_image(
    source: ImageSource,
    max_pixels: int | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Image.Image:
    """Decode a file or bytes, apply EXIF orientation, convert any mode to RGB.

    Raises ImageError (missing file, empty, too big, unknown format, corrupt, truncated,
    bad EXIF, too many pixels, extreme aspect ratio).
    """
    if max_pixels is not None:
        limits = replace(limits, max_pixels=max_pixels)
    name = describe(source)
    inspect(source, limits)  # the structure first: what no decoder should be given
    im = _open(source, name, limits)
    try:
        with im:
            check_size(name, *im.size, limits)
            check_work(name, im, limits)
            im = ImageOps.exif_transpose(im)
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                im = _to_8bit(im)
            return im.convert("RGB")
    except ImageError:
        raise
    except Exception as e:  # noqa: BLE001 - struct.error, MemoryError, OSError, ...
        raise ImageError(f"{name}: cannot decode ({_reason(e)})") from e


def resize_crop(
    image: Image.Image, geometry: ResizeCrop, limits: Limits = DEFAULT_LIMITS, name: str = ""
) -> np.ndarray:
    """torchvision ``Resize`` + ``CenterCrop`` on a PIL image -> float32 [3, crop, crop].
    Where the resized image would be over ``limits.max_resized_pixels`` (extreme aspect
    ratios), only the crop's source region is resampled, straight to the crop size."""
    w, h = image.size
    new_w, new_h = geometry.resized_size(w, h)
    c = geometry.crop
    top = int(round((new_h - c) / 2.0))
    left = int(round((new_w - c) / 2.0))
    try:
        if new_w * new_h > limits.max_resized_pixels:
            sx, sy = w / new_w, h / new_h  # the scale Resize would use on each axis
            box = (left * sx, top * sy, (left + c) * sx, (top + c) * sy)
            image = image.resize((c, c), RESAMPLING[geometry.interpolation], box=box)
        else:
            if (new_w, new_h) != (w, h):
                image = image.resize((new_w, new_h), RESAMPLING[geometry.interpolation])
            image = image.crop((left, top, left + c, top + c))
        return np.asarray(image, dtype=np.float32).transpose(2, 0, 1).copy()
    except Exception as e:  # noqa: BLE001 - MemoryError, ValueError, ... name the input
        raise ImageError(f"{name or f'{w}x{h} image'}: cannot resize ({_reason(e)})") from e


def preprocess(
    source: ImageSource,
    geometry: ResizeCrop,
    max_pixels: int | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> np.ndarray:
    """Load one image and turn it into the model's input pixels [3, crop, crop]."""
    if max_pixels is not None:
        limits = replace(limits, max_pixels=max_pixels)
    return resize_crop(load_image(source, limits=limits), geometry, limits, describe(source))
