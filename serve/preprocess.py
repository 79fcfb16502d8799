"""Client-side image preprocessing with Pillow and NumPy only (no torch).

Reproduces the training eval transform exactly - torchvision's PIL path of
``Resize(resize)`` (shorter side, Pillow's resampling) and ``CenterCrop(crop)`` -
and returns float32 0..255 RGB pixels, CHW: exported models normalize inside.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000
RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

ImageSource = str | Path | bytes


class ImageError(ValueError):
    """An input that is not a usable image; the message names the input and the problem."""


@dataclass(frozen=True)
class ResizeCrop:
    """The eval geometry of a model: shorter side to ``resize``, then a centered ``crop``."""

    resize: int
    crop: int
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.interpolation not in RESAMPLING:
            raise ValueError(
                f"unknown interpolation {self.interpolation!r}; known: {', '.join(RESAMPLING)}"
            )
        if not (0 < self.crop <= self.resize):
            raise ValueError(f"need 0 < crop ({self.crop}) <= resize ({self.resize})")


def describe(source: ImageSource) -> str:
    """A short name for an input in error messages."""
    return f"<{len(source)} bytes>" if isinstance(source, bytes | bytearray) else str(source)


def load_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode a file or bytes, apply EXIF orientation, convert any mode to RGB.

    Raises ImageError (missing file, empty, not an image, truncated, too many pixels).
    """
    name = describe(source)
    if isinstance(source, bytes | bytearray):
        if not source:
            raise ImageError(f"{name}: empty input")
        fp: io.BytesIO | Path = io.BytesIO(source)
    else:
        fp = Path(source)
        if not fp.is_file():
            raise ImageError(f"{name}: no such file")
        if fp.stat().st_size == 0:
            raise ImageError(f"{name}: empty file")
    try:
        with Image.open(fp) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(
                    f"{name}: {w}x{h} = {w * h / 1e6:.1f} MP is over the "
                    f"{max_pixels / 1e6:.0f} MP limit"
                )
            im = ImageOps.exif_transpose(im)
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16/32-bit grayscale: scale to 8 bits instead of clipping at 255.
                arr = np.asarray(im, dtype=np.float64)
                scale = 255.0 / 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 1.0
                im = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), "L")
            return im.convert("RGB")
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: {e}") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"{name}: not a readable image (unknown format or corrupt data)") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: not a readable image ({e})") from e


def resize_crop(image: Image.Image, geometry: ResizeCrop) -> np.ndarray:
    """torchvision ``Resize`` + ``CenterCrop`` on a PIL image -> float32 [3, crop, crop]."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = geometry.resize, int(geometry.resize * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), RESAMPLING[geometry.interpolation])
    c = geometry.crop
    top = int(round((new_h - c) / 2.0))
    left = int(round((new_w - c) / 2.0))
    image = image.crop((left, top, left + c, top + c))
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1).copy()


def preprocess(
    source: ImageSource, geometry: ResizeCrop, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Load one image and turn it into the model's input pixels [3, crop, crop]."""
    return resize_crop(load_image(source, max_pixels), geometry)
