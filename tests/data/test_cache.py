"""The tile cache (data/cache.py): bad files skipped and reported, the tolerated fraction, resume by shard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from histodiffusion.data.cache import TileCache, build_cache
from histodiffusion.data.images import read_rgb, resize_square
from histodiffusion.data.sources import Record
from histodiffusion.errors import UserError
from tests.helpers import noise, write_image


def _write_tiles(folder: Path, n: int) -> list[Record]:
    """``n`` noise PNGs of 20 x 20 pixels in ``folder`` as records of class 'a'."""
    rng = np.random.default_rng(0)
    return [Record(str(write_image(folder / f"{i}.png", noise(20, rng))), "a") for i in range(n)]


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
