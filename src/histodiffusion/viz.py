"""Image grids for previews and reports."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from histodiffusion.io import atomic_path


def grid(tiles: np.ndarray, ncol: int | None = None, pad: int = 2, fill: int = 255) -> np.ndarray:
    """(N, H, W, 3) uint8 tiles -> one (rows*H, ncol*W, 3) image with ``pad`` px gutters."""
    n, h, w, _ = tiles.shape
    ncol = ncol or max(1, math.ceil(math.sqrt(n)))
    nrow = max(1, math.ceil(n / ncol))
    out = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), fill, np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = tiles[i]
    return out


def labeled_rows(rows: list[tuple[str, np.ndarray]], ncol: int, label_width: int = 180,
                 scale: int = 1) -> np.ndarray:
    """Stack several grids, each headed by a text label on its left (e.g. 'real TUM', 'synthetic TUM')."""
    parts = []
    for label, tiles in rows:
        g = grid(tiles[:ncol], ncol=ncol)
        if scale > 1:
            g = np.kron(g, np.ones((scale, scale, 1), np.uint8))
        canvas = Image.new("RGB", (label_width + g.shape[1], g.shape[0]), "white")
        canvas.paste(Image.fromarray(g), (label_width, 0))
        ImageDraw.Draw(canvas).text((6, g.shape[0] // 2 - 6), label, fill=(0, 0, 0))
        parts.append(np.asarray(canvas))
    width = max(p.shape[1] for p in parts)
    return np.concatenate([np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0)), constant_values=255)
                           for p in parts])


def save_image(arr: np.ndarray, path: str | Path, scale: int = 1) -> Path:
    """Write an (H, W, 3) uint8 image as PNG atomically, optionally enlarged (nearest) by ``scale``."""
    img = Image.fromarray(arr)
    if scale > 1:
        img = img.resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.Resampling.NEAREST)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)


def pool_grid(cache, path: str | Path, n: int = 36, seed: int = 0) -> Path:
    """A grid of ``n`` random tiles of a tile cache (the real pool tiles beside the pre-training
    sample grids, laid out like them)."""
    rows = np.sort(np.random.default_rng(seed).choice(len(cache), size=min(n, len(cache)), replace=False))
    return save_image(grid(cache.take(rows)), path, scale=2)


def compact_png(path: str | Path, max_bytes: int = 1_000_000) -> Path:
    """Re-encode a PNG larger than ``max_bytes`` with a 256-colour palette (median cut, no dithering).

    For copies of figures kept in a repository: H&E grids look the same to the eye at about 40% of
    the size. Smaller files are left untouched.
    """
    path = Path(path)
    if path.stat().st_size <= max_bytes:
        return path
    img = Image.open(path).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", optimize=True)
    return path
