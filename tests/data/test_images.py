"""Image decoding (data/images.py): grayscale, RGBA, palette, 16-bit and corrupt files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from histodiffusion.data.images import ImageReadError, read_rgb, resize_square
from tests.helpers import noise, write_image


def test_grayscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    gray = (np.arange(64 * 48) % 256).astype(np.uint8).reshape(48, 64)
    write_image(tmp_path / "g.png", gray)
    rgb = read_rgb(tmp_path / "g.png")
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
    assert (rgb[..., 0] == gray).all() and (rgb[..., 1] == gray).all() and (rgb[..., 2] == gray).all()


def test_rgba_is_composited_over_white(tmp_path: Path) -> None:
    arr = np.zeros((8, 8, 4), np.uint8)
    arr[..., 0] = 200  # red tissue
    arr[:4, :, 3] = 255  # opaque top half
    arr[4:, :, 3] = 0  # transparent bottom half: background glass is white
    write_image(tmp_path / "a.png", arr)
    rgb = read_rgb(tmp_path / "a.png")
    assert (rgb[:4] == [200, 0, 0]).all()
    assert (rgb[4:] == 255).all()


def test_palette_image(tmp_path: Path) -> None:
    write_image(tmp_path / "p.png", np.full((8, 8, 3), (120, 40, 160), np.uint8), mode="P")
    assert read_rgb(tmp_path / "p.png").shape == (8, 8, 3)


def test_16bit_grayscale_png_is_rescaled(tmp_path: Path) -> None:
    arr = np.array([[0, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    write_image(tmp_path / "g16.png", arr)
    rgb = read_rgb(tmp_path / "g16.png")
    assert rgb[0, :, 0].tolist() == [0, 128, 255]


def test_16bit_rgb_tiff_is_rescaled(tmp_path: Path) -> None:
    arr = np.zeros((4, 4, 3), np.uint16)
    arr[..., 0], arr[..., 1], arr[..., 2] = 65535, 257 * 100, 0
    tifffile.imwrite(tmp_path / "c16.tif", arr)
    rgb = read_rgb(tmp_path / "c16.tif")
    assert rgb.dtype == np.uint8 and rgb[0, 0].tolist() == [255, 100, 0]


@pytest.mark.parametrize("content", [b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 20])
def test_corrupt_file_names_the_file(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    with pytest.raises(ImageReadError, match="bad.png"):
        read_rgb(bad)


def test_truncated_jpeg_is_an_error(tmp_path: Path) -> None:
    write_image(tmp_path / "t.jpg", noise(64))
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="t.jpg"):
        read_rgb(tmp_path / "t.jpg")


def test_resize_square_crops_centre_then_resizes() -> None:
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, 20:60] = 255  # the centre square is white
    out = resize_square(arr, 16)
    assert out.shape == (16, 16, 3) and (out == 255).all()
