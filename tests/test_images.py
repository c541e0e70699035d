"""Image decoding: grayscale, RGBA, palette, 16-bit and corrupt files; the tile cache skips bad ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from histodiffusion.data.cache import TileCache, build_cache
from histodiffusion.data.images import ImageReadError, read_rgb, resize_square
from histodiffusion.data.sources import Record
from histodiffusion.errors import UserError
from histodiffusion.viz import compact_png, save_image


def test_grayscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    gray = (np.arange(64 * 48) % 256).astype(np.uint8).reshape(48, 64)
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    rgb = read_rgb(tmp_path / "g.png")
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
    assert (rgb[..., 0] == gray).all() and (rgb[..., 1] == gray).all() and (rgb[..., 2] == gray).all()


def test_rgba_is_composited_over_white(tmp_path: Path) -> None:
    arr = np.zeros((8, 8, 4), np.uint8)
    arr[..., 0] = 200  # red tissue
    arr[:4, :, 3] = 255  # opaque top half
    arr[4:, :, 3] = 0  # transparent bottom half: background glass is white
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    rgb = read_rgb(tmp_path / "a.png")
    assert (rgb[:4] == [200, 0, 0]).all()
    assert (rgb[4:] == 255).all()


def test_palette_image(tmp_path: Path) -> None:
    Image.fromarray(np.full((8, 8, 3), (120, 40, 160), np.uint8)).convert("P").save(tmp_path / "p.png")
    assert read_rgb(tmp_path / "p.png").shape == (8, 8, 3)


def test_16bit_grayscale_png_is_rescaled(tmp_path: Path) -> None:
    arr = np.array([[0, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    Image.fromarray(arr).save(tmp_path / "g16.png")
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
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "t.jpg")
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="t.jpg"):
        read_rgb(tmp_path / "t.jpg")


def test_resize_square_crops_centre_then_resizes() -> None:
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, 20:60] = 255  # the centre square is white
    out = resize_square(arr, 16)
    assert out.shape == (16, 16, 3) and (out == 255).all()


def _write_tiles(folder: Path, n: int) -> list[Record]:
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        p = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(p)
        records.append(Record(str(p), "a"))
    return records


def test_cache_skips_bad_files_and_reports_them(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    records = _write_tiles(tmp_path, 9)
    (tmp_path / "broken.png").write_bytes(b"garbage")
    records.append(Record(str(tmp_path / "broken.png"), "a"))
    summary = build_cache(records, 8, tmp_path / "cache", shard_size=4, max_bad_fraction=0.2, progress=False)
    assert summary.n_kept == 9 and len(summary.bad) == 1 and "broken.png" in summary.bad[0]
    err = " ".join(capsys.readouterr().err.split())
    assert "warning:" in err and "skipped 1 unreadable file(s) of 10" in err and "broken.png" in err
    cache = TileCache(tmp_path / "cache")
    assert len(cache) == 9 and cache[8].shape == (8, 8, 3)
    assert not cache.contains(str(tmp_path / "broken.png"))
    # Row lookup returns the same pixels as a fresh decode.
    row = cache.rows([records[5].path])[0]
    assert (cache[row] == resize_square(read_rgb(records[5].path), 8)).all()


def test_cache_fails_above_bad_fraction(tmp_path: Path) -> None:
    records = _write_tiles(tmp_path, 3)
    (tmp_path / "x.png").write_bytes(b"garbage")
    records.append(Record(str(tmp_path / "x.png"), "a"))
    with pytest.raises(UserError, match=r"(?s)1 of 4 files .*x\.png.*max_bad_fraction"):
        build_cache(records, 8, tmp_path / "cache", max_bad_fraction=0.1, progress=False)


def test_cache_resumes_from_finished_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records = _write_tiles(tmp_path, 10)
    build_cache(records, 8, tmp_path / "c", shard_size=4, progress=False)
    (tmp_path / "c" / "index.json").unlink()  # as if interrupted before the index was written
    calls = []
    import histodiffusion.data.cache as cache_mod

    real = cache_mod._write_shard
    monkeypatch.setattr(cache_mod, "_write_shard", lambda *a: calls.append(a) or real(*a))
    build_cache(records, 8, tmp_path / "c", shard_size=4, progress=False)
    assert calls == []  # all three shards were reused
    assert len(TileCache(tmp_path / "c")) == 10


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
