"""Client-side preprocessing (Pillow + NumPy) matches the training eval transform exactly."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serve.preprocess import ImageError, ResizeCrop, load_image, preprocess
from tests.conftest import ROOT
from train.data import Preprocess, load_rgb


def test_matches_torchvision_eval_transform_on_every_val_image(val_images: list[Path]) -> None:
    pre = Preprocess()
    tf = pre.eval_transform(normalize=False)
    geometry = ResizeCrop(pre.resize, pre.crop, pre.interpolation)
    for path in val_images:
        expected = tf(load_rgb(path)).numpy()
        got = preprocess(path, geometry)
        assert got.dtype == np.float32 and got.shape == (3, 224, 224)
        assert np.array_equal(got, expected), path


@pytest.mark.parametrize("size", [(300, 200), (200, 300), (224, 224), (1000, 257)])
def test_geometry_matches_torchvision_for_odd_sizes(size: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    for pre in (Preprocess(), Preprocess(resize=32, crop=32), Preprocess(resize=40, crop=32)):
        expected = pre.eval_transform(normalize=False)(im).numpy()
        got = preprocess(_png(im), ResizeCrop(pre.resize, pre.crop))
        assert np.array_equal(got, expected)


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def test_exif_orientation_is_applied() -> None:
    im = Image.new("RGB", (60, 30), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif)
    assert load_image(buf.getvalue()).size == (30, 60)


def test_bad_images_raise_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(b"GIF89a garbage")
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "missing.jpg")
    big = Image.new("L", (5000, 3000))
    with pytest.raises(ImageError, match="15.0 MP is over the 10 MP limit"):
        load_image(_png(big), max_pixels=10_000_000)


def test_serve_package_does_not_import_torch() -> None:
    code = (
        "import sys, serve.client, serve.preprocess, serve.cli, serve.triton_server; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
