"""Figures (viz.py): large PNGs are palette-encoded, small ones left alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from histodiffusion.viz import compact_png, save_image


def test_compact_png_palette_encodes_only_large_files(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    big = save_image(noise, tmp_path / "big.png")
    before = big.stat().st_size
    assert before > 1_000_000
    compact_png(big)
    assert Image.open(big).mode == "P" and big.stat().st_size < 1_000_000
    small = save_image(noise[:50, :50], tmp_path / "small.png")
    data = small.read_bytes()
    compact_png(small)
    assert small.read_bytes() == data
