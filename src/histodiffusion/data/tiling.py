"""Cut large H&E fields and whole-slide images into fixed-size tissue tiles.

The tissue mask is computed once per image (on a copy downsampled to at most
:data:`MASK_MAX_SIDE` px, or on the slide thumbnail for whole-slide images); a tile's tissue
fraction is the mean of that mask over the tile's footprint. Tiles below ``min_tissue`` are
rejected as background. Outputs are PNGs named ``<stem>_y<Y>_x<X>.png`` (pixel coordinates of
the top-left corner at the level read), written atomically; a tile that already exists is not
rewritten, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import csv
import io as _stdio
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from histodiffusion import io
from histodiffusion.data.images import (
    IMAGE_SUFFIXES,
    ImageReadError,
    _to_rgb,
    _to_uint8,
    is_image_file,
    read_rgb,
    save_png,
)
from histodiffusion.errors import UserError

WSI_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".svslide", ".bif", ".vms", ".vmu")
MASK_MAX_SIDE = 2048
MIN_TILE_SIZE = 8
# Saturation (0-255 scale) that glass never reaches: 0.1 in HSV terms. Blank glass and scanner
# background sit at 0-10; even pale eosin or mucin is above ~20-25.
SAT_FLOOR = 0.1 * 255
NO_DATA_GREY = 16  # greyscale inputs: darker than this is padding, not tissue
MANIFEST_COLUMNS = ("path", "label", "group")
WSI_INSTALL_HINT = "pip install 'histodiffusion[wsi]'"

Format = Literal["imagefolder", "manifest"]


class TilingWarning(UserWarning):
    """Inputs that were skipped (unreadable files) while tiling."""


@dataclass(eq=False)
class Tile:
    """One kept tile: top-left (y, x) in pixels of the image (or slide level) it was cut from."""

    y: int
    x: int
    tissue_fraction: float
    pixels: np.ndarray = field(repr=False)


@dataclass
class TilingSummary:
    """What :func:`tile_files` did. ``n_existing`` (tiles found from an earlier run) is not
    compared, so a resumed run compares equal to the run it completes."""

    n_inputs: int = 0
    n_tiles: int = 0
    n_rejected_background: int = 0
    n_too_small: int = 0
    unreadable: list[str] = field(default_factory=list)
    per_input: dict[str, int] = field(default_factory=dict)
    n_existing: int = field(default=0, compare=False)


# --------------------------------------------------------------------------- tissue mask


def _saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation scaled to 0-255 as uint8 ((max - min) / max; 0 where max is 0)."""
    hi = rgb.max(axis=-1).astype(np.float32)
    lo = rgb.min(axis=-1).astype(np.float32)
    sat = np.divide(hi - lo, hi, out=np.zeros_like(hi), where=hi > 0)
    return np.round(sat * 255.0).astype(np.uint8)


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 ``values`` on a 256-bin histogram: class 0 is ``values <= t``.

    Where several thresholds separate the classes equally well (an empty gap between two
    modes) the middle of that range is returned. A single-valued input returns that value.
    """
    hist = np.bincount(np.asarray(values, dtype=np.uint8).ravel(), minlength=256)
    hist = hist.astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    p = hist / total
    levels = np.arange(256, dtype=np.float64)
    omega = np.cumsum(p)
    mu = np.cumsum(p * levels)
    mu_t = mu[-1]
    denom = omega * (1.0 - omega)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = np.where(denom > 1e-12, (mu_t * omega - mu) ** 2 / denom, 0.0)
    best = between.max()
    if best <= 0:  # one grey level only
        return float(np.flatnonzero(hist)[0])
    ties = np.flatnonzero(between >= best * (1 - 1e-9))
    return float((ties[0] + ties[-1]) / 2.0)


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Tissue pixels by Otsu on HSV saturation: stained tissue is coloured, glass is grey-white.

    Rules that keep Otsu honest when the view is not "glass + tissue":

    * the threshold is at least :data:`SAT_FLOOR` (saturation 0.1), so noise on blank glass
      (an all-white tile) is never split into "tissue";
    * if the class Otsu calls background is itself stained (its mean saturation is above the
      floor: no glass in view, Otsu split pale from dark tissue), the threshold falls back to
      the floor;
    * hence a uniform image is all tissue when its saturation is above the floor, else all
      background. Black pixels (max 0) have saturation 0 and count as background.
    * a greyscale image (R == G == B everywhere) has no saturation to use: its darkness
      (255 - grey level) is thresholded instead, with the same rules; near-black pixels
      (grey < :data:`NO_DATA_GREY`, scanner padding) stay background as they do in colour.

    Accepts (H, W, 3) uint8 (other depths, grey and RGBA are converted); returns (H, W) bool.
    """
    rgb = _to_rgb(_to_uint8(np.asarray(rgb)))
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
        grey = rgb[..., 0]
        signal = np.where(grey < NO_DATA_GREY, 0, 255 - grey).astype(np.uint8)
    else:
        signal = _saturation(rgb)
    t = otsu_threshold(signal)
    below = signal[signal <= t]
    if below.size and float(below.mean()) > SAT_FLOOR:
        t = SAT_FLOOR
    return signal > max(t, SAT_FLOOR)


def _downsample(rgb: np.ndarray, max_side: int = MASK_MAX_SIDE) -> np.ndarray:
    """Box-average ``rgb`` by an integer factor so its longest side is at most ``max_side``."""
    factor = math.ceil(max(rgb.shape[:2]) / max_side)
    if factor <= 1:
        return rgb
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).reduce(factor))


# --------------------------------------------------------------------------- geometry


def tile_grid(height: int, width: int, size: int, stride: int) -> list[tuple[int, int]]:
    """Top-left (y, x) of every full ``size`` x ``size`` tile at ``stride``, row by row."""
    if size < 1 or stride < 1:
        raise ValueError(f"size and stride must be positive, got size={size}, stride={stride}")
    if height < size or width < size:
        return []
    ys = range(0, height - size + 1, stride)
    xs = range(0, width - size + 1, stride)
    return [(y, x) for y in ys for x in xs]


class _MaskIndex:
    """Mean of a (possibly lower-resolution) mask over rectangles given in image pixels."""

    def __init__(self, mask: np.ndarray, height: int, width: int):
        mask = np.asarray(mask)
        if mask.ndim != 2 or mask.size == 0:
            raise ValueError(f"mask must be a non-empty 2-D array, got shape {mask.shape}")
        self.mh, self.mw = mask.shape
        self.sy, self.sx = self.mh / height, self.mw / width
        # Summed-area table with a zero row/column in front: O(1) per rectangle.
        sat = np.zeros((self.mh + 1, self.mw + 1), dtype=np.int64)
        sat[1:, 1:] = np.cumsum(np.cumsum(mask.astype(bool), axis=0, dtype=np.int64), axis=1)
        self.table = sat

    def fraction(self, y: int, x: int, h: int, w: int) -> float:
        y0 = min(int(round(y * self.sy)), self.mh - 1)
        x0 = min(int(round(x * self.sx)), self.mw - 1)
        y1 = min(max(int(round((y + h) * self.sy)), y0 + 1), self.mh)
        x1 = min(max(int(round((x + w) * self.sx)), x0 + 1), self.mw)
        t = self.table
        count = t[y1, x1] - t[y0, x1] - t[y1, x0] + t[y0, x0]
        return float(count) / float((y1 - y0) * (x1 - x0))


def _check_params(size: int, stride: int, min_tissue: float) -> None:
    if not isinstance(size, (int, np.integer)) or size < MIN_TILE_SIZE:
        raise UserError(f"tile size must be an integer of at least {MIN_TILE_SIZE} px, "
                        f"got --size {size}")
    if not isinstance(stride, (int, np.integer)) or stride < 1:
        raise UserError(f"stride must be a positive integer (pixels between tile corners), "
                        f"got --stride {stride}")
    if not (0.0 <= float(min_tissue) <= 1.0):
        raise UserError(f"--min-tissue is a fraction of the tile and must lie in [0, 1], "
                        f"got {min_tissue}")


def _scored_grid(height: int, width: int, size: int, stride: int,
                 mask: np.ndarray) -> Iterator[tuple[int, int, float]]:
    index = _MaskIndex(mask, height, width)
    for y, x in tile_grid(height, width, size, stride):
        yield y, x, index.fraction(y, x, size, size)


def tile_image(rgb: np.ndarray, size: int, stride: int, min_tissue: float,
               mask: np.ndarray | None = None) -> list[Tile]:
    """Tiles of ``rgb`` whose tissue fraction is at least ``min_tissue`` (pixels are views).

    ``mask`` (bool, any resolution with the image's aspect ratio) defaults to
    :func:`tissue_mask` of a copy downsampled to at most :data:`MASK_MAX_SIDE` px.
    """
    _check_params(size, stride, min_tissue)
    rgb = np.asarray(rgb)
    height, width = rgb.shape[:2]
    if height < size or width < size:
        return []
    if mask is None:
        mask = tissue_mask(_downsample(rgb))
    return [
        Tile(y, x, frac, rgb[y : y + size, x : x + size])
        for y, x, frac in _scored_grid(height, width, size, stride, mask)
        if frac >= min_tissue
    ]


# --------------------------------------------------------------------------- inputs


def _is_wsi_suffix(path: Path) -> bool:
    return path.suffix.lower() in WSI_SUFFIXES


def _is_tiling_input(path: Path) -> bool:
    return is_image_file(path) or _is_wsi_suffix(path)


def _is_pyramidal_tiff(path: Path) -> bool:
    """A TIFF with more than one resolution level (a whole-slide image saved as TIFF)."""
    if path.suffix.lower() not in (".tif", ".tiff"):
        return False
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                return False
            series = tif.series[0]
            return bool(getattr(series, "is_pyramidal", False) or len(series.levels) > 1)
    except Exception:  # unreadable TIFFs are reported by read_rgb
        return False


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder)
        return True
    except ValueError:
        return False


def _collect_inputs(inputs: list[Path], out_dir: Path) -> list[Path]:
    """Image files named or found (recursively) in ``inputs``; hidden files and ``out_dir`` skipped."""
    out_resolved = out_dir.resolve()
    found: list[Path] = []
    seen: set[Path] = set()
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise UserError(f"input {path} does not exist; pass image files or folders of images")
        if path.is_dir():
            files = sorted(
                p for p in path.rglob("*")
                if p.is_file() and _is_tiling_input(p)
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
                and not _inside(p, out_resolved)
            )
            if not files:
                raise UserError(
                    f"input folder {path} holds no image files (looked recursively for "
                    f"{', '.join(sorted(set(_suffixes())))})"
                )
        else:
            if not _is_tiling_input(path):
                raise UserError(f"input {path} is not a supported image "
                                f"({', '.join(sorted(set(_suffixes())))})")
            files = [path]
        for f in files:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                found.append(f)
    return found


def _suffixes() -> tuple[str, ...]:
    return IMAGE_SUFFIXES + WSI_SUFFIXES


def _unique_stems(files: list[Path]) -> list[str]:
    """File stems, made unique where two inputs share one by prefixing parent folder names."""
    stems = [f.stem for f in files]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    out: list[str] = []
    used: set[str] = set()
    for f, s in zip(files, stems, strict=True):
        name = s
        if counts[s] > 1:
            parents = [p.name for p in f.resolve().parents if p.name]
            for depth in range(1, len(parents) + 1):
                name = "_".join(reversed(parents[:depth])) + "_" + s
                if name not in used:
                    break
            k = 2
            while name in used:
                name, k = f"{s}_{k}", k + 1
        used.add(name)
        out.append(name)
    return out


def _open_slide(path: Path):
    try:
        import openslide
    except ImportError as err:
        raise UserError(
            f"{path} is a whole-slide image and needs openslide, which is not installed. "
            f"Install it with: {WSI_INSTALL_HINT}"
        ) from err
    try:
        return openslide.OpenSlide(str(path))
    except Exception as err:  # OpenSlideError, OpenSlideUnsupportedFormatError, OSError
        raise ImageReadError(f"{path}: openslide cannot open it ({err})") from err


def _rgba_to_rgb(img: Image.Image) -> np.ndarray:
    """PIL image (RGBA from openslide: transparent outside the scanned area) to RGB over white."""
    return _to_rgb(_to_uint8(np.asarray(img)))


# --------------------------------------------------------------------------- tiling


def _tile_name(stem: str, y: int, x: int) -> str:
    return f"{stem}_y{y}_x{x}.png"


class _Writer:
    def __init__(self, out_dir: Path, fmt: Format, label: str):
        self.out_dir, self.fmt, self.label = out_dir, fmt, label
        self.folder = out_dir / (label if fmt == "imagefolder" else "tiles")
        self.rows: list[tuple[str, str, str]] = []
        self.n_existing = 0

    def target(self, stem: str, y: int, x: int) -> Path:
        return self.folder / _tile_name(stem, y, x)

    def keep(self, stem: str, y: int, x: int, pixels) -> None:
        """Write the tile unless it exists; ``pixels`` is an array or a zero-argument reader."""
        path = self.target(stem, y, x)
        if path.is_file():
            self.n_existing += 1
        else:
            arr = pixels() if callable(pixels) else pixels
            save_png(path, np.ascontiguousarray(arr))
        self.rows.append((path.relative_to(self.out_dir).as_posix(), self.label, stem))

    def drop_group(self, stem: str) -> None:
        self.rows = [r for r in self.rows if r[2] != stem]

    def write_manifest(self, groups: set[str]) -> None:
        """Write ``manifest.csv``, keeping rows of earlier runs for sources not tiled now."""
        manifest = self.out_dir / "manifest.csv"
        rows = list(self.rows)
        if manifest.is_file():
            try:
                with open(manifest, newline="", encoding="utf-8") as f:
                    old = [r for r in csv.DictReader(f)]
            except (OSError, csv.Error, UnicodeDecodeError):
                old = []
            for r in old:
                if (r.get("group") not in groups and r.get("path")
                        and (self.out_dir / r["path"]).is_file()):
                    rows.append((r["path"], r.get("label", ""), r["group"]))
        buf = _stdio.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        writer.writerows(sorted(set(rows), key=lambda r: (r[2], r[0])))
        io.write_text(manifest, buf.getvalue())


def _tile_plain(path: Path, stem: str, size: int, stride: int, min_tissue: float,
                level: int, writer: _Writer) -> tuple[int, int, bool]:
    """Tile a plain image; returns (kept, rejected as background, too small)."""
    if level != 0:
        raise UserError(f"{path} has a single resolution level; --level {level} applies to "
                        "whole-slide images only (use --level 0)")
    rgb = read_rgb(path)
    height, width = rgb.shape[:2]
    if height < size or width < size:
        return 0, 0, True
    n_grid = len(tile_grid(height, width, size, stride))
    kept = tile_image(rgb, size, stride, min_tissue)
    for tile in kept:
        writer.keep(stem, tile.y, tile.x, tile.pixels)
    return len(kept), n_grid - len(kept), False


def _tile_slide(path: Path, stem: str, size: int, stride: int, min_tissue: float,
                level: int, writer: _Writer) -> tuple[int, int, bool]:
    """Tile one level of a whole-slide image region by region; mask from the thumbnail."""
    slide = _open_slide(path)
    try:
        if not 0 <= level < slide.level_count:
            raise UserError(f"{path} has levels 0..{slide.level_count - 1}; --level {level} "
                            "does not exist")
        width, height = slide.level_dimensions[level]
        if height < size or width < size:
            return 0, 0, True
        downsample = float(slide.level_downsamples[level])
        scale = min(1.0, MASK_MAX_SIDE / max(width, height))
        thumb_size = (max(1, round(width * scale)), max(1, round(height * scale)))
        try:
            thumb = _rgba_to_rgb(slide.get_thumbnail(thumb_size))
        except Exception as err:
            raise ImageReadError(f"{path}: cannot read the slide thumbnail ({err})") from err
        mask = tissue_mask(thumb)
        kept = rejected = 0
        for y, x, frac in _scored_grid(height, width, size, stride, mask):
            if frac < min_tissue:
                rejected += 1
                continue

            def read(y=y, x=x):
                loc = (int(round(x * downsample)), int(round(y * downsample)))
                try:
                    return _rgba_to_rgb(slide.read_region(loc, level, (size, size)))
                except Exception as err:
                    raise ImageReadError(f"{path}: cannot read region at level {level} "
                                         f"y={y} x={x} ({err})") from err

            writer.keep(stem, y, x, read)
            kept += 1
        return kept, rejected, False
    finally:
        slide.close()


def _check_label(label: str, fmt: str) -> None:
    if not label or label in (".", "..") or any(c in label for c in "/\\\0") or label != label.strip():
        raise UserError(f"--label {label!r} must be a plain folder name (no slashes, not empty)")
    if fmt == "manifest" and any(c in label for c in ",\n\r\""):
        raise UserError(f"--label {label!r} must not contain commas, quotes or line breaks")


def tile_files(
    inputs: list[Path],
    out_dir: Path,
    size: int,
    stride: int | None,
    min_tissue: float,
    fmt: Format,
    label: str = "unlabeled",
    level: int = 0,
    progress: bool = True,
) -> TilingSummary:
    """Tile image files and folders of them (recursively) into ``out_dir``.

    ``fmt="imagefolder"`` writes ``out_dir/<label>/<stem>_y<Y>_x<X>.png``; ``fmt="manifest"``
    writes ``out_dir/tiles/<name>.png`` and ``out_dir/manifest.csv`` (``path,label,group``,
    path relative to ``out_dir``, group = source stem so tiles of one field share a split).
    Rows of an existing manifest for sources not tiled in this call are kept. ``stride``
    defaults to ``size``. Whole-slide files (and pyramidal TIFFs) are read with openslide
    (``pip install 'histodiffusion[wsi]'``) at ``level``. Unreadable files are skipped with a
    :class:`TilingWarning` and listed in ``summary.unreadable``; existing tiles are not
    rewritten. Two inputs with the same stem are told apart by their parent folder names.
    """
    stride = size if stride is None else stride
    _check_params(size, stride, min_tissue)
    if fmt not in ("imagefolder", "manifest"):
        raise UserError(f"--format must be 'imagefolder' or 'manifest', got {fmt!r}")
    _check_label(label, fmt)
    if not isinstance(level, (int, np.integer)) or level < 0:
        raise UserError(f"--level must be a non-negative integer, got {level}")
    if not inputs:
        raise UserError("no inputs given: pass image files or folders of images to tile")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a folder; choose another path")

    files = _collect_inputs([Path(p) for p in inputs], out_dir)
    stems = _unique_stems(files)
    summary = TilingSummary(n_inputs=len(files))
    writer = _Writer(out_dir, fmt, label)
    out_dir.mkdir(parents=True, exist_ok=True)

    from histodiffusion.progress import progress_bar

    reasons: list[str] = []
    with progress_bar("tiling", total=len(files), enabled=progress, unit="images") as advance:
        for path, stem in zip(files, stems, strict=True):
            tile_one = _tile_slide if _is_wsi_suffix(path) or _is_pyramidal_tiff(path) else _tile_plain
            try:
                kept, rejected, too_small = tile_one(path, stem, size, stride, min_tissue, level,
                                                     writer)
            except ImageReadError as err:
                summary.unreadable.append(str(path))
                reasons.append(str(err))
                writer.drop_group(stem)  # tiles already written stay on disk for a rerun
            else:
                summary.per_input[stem] = kept
                summary.n_tiles += kept
                summary.n_rejected_background += rejected
                summary.n_too_small += int(too_small)
            advance(1, tiles=summary.n_tiles)

    summary.n_existing = writer.n_existing
    if fmt == "manifest":
        writer.write_manifest(set(stems))
    if files and len(reasons) == len(files):
        raise UserError(f"tiling: none of the {len(files)} input(s) could be read:\n  " + "\n  ".join(reasons[:20])
                        + "\nGive image files (.tif .png .jpg ...) or whole slides (with 'histodiffusion[wsi]').")
    if reasons:
        bad = reasons
        shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        warnings.warn(f"tiling: skipped {len(bad)} unreadable file(s) of {len(files)}:\n  {shown}",
                      TilingWarning, stacklevel=2)
    return summary
