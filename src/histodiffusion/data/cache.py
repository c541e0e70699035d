"""Tile cache: every image decoded once into uint8 arrays at the experiment's resolution.

A cache is a folder of ``.npy`` shards (N, R, R, 3) read back memory-mapped, plus ``index.json``
holding the kept paths in order and the unreadable ones. Shards are written atomically one by
one, so an interrupted build resumes at the first missing shard. No training epoch decodes an
image file again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histodiffusion import io
from histodiffusion.data.images import ImageReadError
from histodiffusion.data.sources import Record, load_record
from histodiffusion.errors import UserError
from histodiffusion.progress import progress_bar, warn

INDEX = "index.json"


def _key(paths: Sequence[str], resolution: int) -> str:
    h = hashlib.sha256(f"{resolution}\n".encode())
    for p in paths:
        h.update(p.encode() + b"\n")
    return h.hexdigest()[:16]


def _decode(args: tuple[str, int]) -> np.ndarray | str:
    path, resolution = args
    try:
        return load_record(path, resolution)
    except ImageReadError as err:
        return str(err)


@dataclass
class CacheSummary:
    """What a cache build found: kept tiles and unreadable files with their reasons."""

    n_total: int
    n_kept: int
    bad: list[str]

    @property
    def bad_fraction(self) -> float:
        return len(self.bad) / max(self.n_total, 1)


def build_cache(records: Sequence[Record], resolution: int, folder: Path, shard_size: int = 4096,
                max_bad_fraction: float = 0.01, num_workers: int = 0, name: str = "",
                progress: bool = True) -> CacheSummary:
    """Decode ``records`` into shards under ``folder`` (resuming); fail on too many bad files."""
    paths = [r.path for r in records]
    key = _key(paths, resolution)
    index_file = folder / INDEX
    if index_file.is_file():
        index = json.loads(index_file.read_text())
        if index.get("key") == key:
            return CacheSummary(len(paths), len(index["paths"]), index["bad"])
    folder.mkdir(parents=True, exist_ok=True)
    kept: list[str] = []
    bad: list[str] = []
    shards: list[dict] = []
    starts = range(0, len(paths), shard_size)
    pool = ProcessPoolExecutor(num_workers) if num_workers > 0 else None
    try:
        with progress_bar(f"caching {name or folder.name}", total=len(paths), enabled=progress) as advance:
            for s, start in enumerate(starts):
                chunk = paths[start : start + shard_size]
                shard_file = folder / f"shard-{s:05d}-{key}.npy"
                meta_file = shard_file.with_suffix(".json")
                if shard_file.is_file() and meta_file.is_file():  # finished by an earlier run
                    meta = json.loads(meta_file.read_text())
                else:
                    meta = _write_shard(chunk, resolution, shard_file, meta_file, pool)
                kept += meta["kept"]
                bad += meta["bad"]
                shards.append({"file": shard_file.name, "n": len(meta["kept"])})
                advance(len(chunk))
    finally:
        if pool is not None:
            pool.shutdown()
    summary = CacheSummary(len(paths), len(kept), bad)
    if bad:
        shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        warn(f"{name or folder}: skipped {len(bad)} unreadable file(s) of {len(paths)}:\n  {shown}")
    if summary.bad_fraction > max_bad_fraction:
        raise UserError(
            f"{name or folder}: {len(bad)} of {len(paths)} files ({summary.bad_fraction:.1%}) could not be "
            f"read, more than data.max_bad_fraction={max_bad_fraction}. First ones:\n  "
            + "\n  ".join(bad[:10]) + "\nReplace or remove these files (or raise data.max_bad_fraction)."
        )
    io.write_json(index_file, {"key": key, "resolution": resolution, "shards": shards,
                               "paths": kept, "bad": bad})
    return summary


def _write_shard(chunk: list[str], resolution: int, shard_file: Path, meta_file: Path,
                 pool: ProcessPoolExecutor | None) -> dict:
    jobs = [(p, resolution) for p in chunk]
    results = pool.map(_decode, jobs, chunksize=32) if pool else map(_decode, jobs)
    tiles, kept, bad = [], [], []
    for path, result in zip(chunk, results, strict=False):
        if isinstance(result, str):
            bad.append(result)
        else:
            tiles.append(result)
            kept.append(path)
    arr = np.stack(tiles) if tiles else np.zeros((0, resolution, resolution, 3), np.uint8)
    with io.atomic_path(shard_file) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr)
    meta = {"kept": kept, "bad": bad}
    io.write_json(meta_file, meta)
    return meta


class TileCache:
    """Read-only view of a built cache: ``cache[i]`` is an (R, R, 3) uint8 tile (memory-mapped)."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        index_file = folder / INDEX
        if not index_file.is_file():
            raise UserError(f"tile cache {folder} is missing or unfinished; rerun `histodiffusion data prepare`")
        index = json.loads(index_file.read_text())
        self.folder = folder
        self.resolution: int = index["resolution"]
        self.paths: list[str] = index["paths"]
        self.bad: list[str] = index["bad"]
        self._shards = [np.load(folder / s["file"], mmap_mode="r") for s in index["shards"]]
        sizes = [len(s) for s in self._shards]
        self._offsets = np.cumsum([0] + sizes)
        self._row = {p: i for i, p in enumerate(self.paths)}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = int(np.searchsorted(self._offsets, i, side="right") - 1)
        return self._shards[s][i - self._offsets[s]]

    def rows(self, paths: Sequence[str]) -> np.ndarray:
        """Row indices of ``paths`` in this cache (KeyError names a path that is not cached)."""
        try:
            return np.array([self._row[p] for p in paths], dtype=np.int64)
        except KeyError as err:
            raise UserError(f"{err.args[0]} is not in the tile cache {self.folder}; rerun data prepare") from err

    def take(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Stack the tiles at ``rows`` into an (N, R, R, 3) uint8 array."""
        return np.stack([self[int(i)] for i in rows]) if len(rows) else \
            np.zeros((0, self.resolution, self.resolution, 3), np.uint8)

    def contains(self, path: str) -> bool:
        """True when ``path`` was decoded into the cache."""
        return path in self._row
