"""Reading back what the data stages wrote: classes, split manifests, tile caches, synthetic sets.

``data/`` of a run directory holds ``classes.json``, ``{pool,train,valid,test}.csv`` and
``cache/<split>/``; ``labels/<budget>/labeled.csv`` beside it holds a label budget's subset
(rows of the train cache). A synthetic set is a folder with ``manifest.csv`` (``path`` relative to
the folder, ``label``, ...) and its PNGs.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from histodiffusion import io
from histodiffusion.data import splits as sp
from histodiffusion.data.cache import TileCache
from histodiffusion.data.images import read_rgb
from histodiffusion.data.sources import Record, read_manifest
from histodiffusion.errors import UserError


def classes_of(data_folder: Path) -> list[str]:
    """Class names in label-index order, as written by the data stage."""
    return io.read_json(Path(data_folder) / "classes.json")


def split_records(data_folder: Path, split: str) -> list[Record]:
    """Records of 'train', 'valid', 'test', 'pool' or 'labeled/<budget>'.

    A budget's subset is written by the ``labels`` stage beside ``data`` in the run directory.
    """
    data_folder = Path(data_folder)
    if split.startswith("labeled/"):
        name = split.split("/", 1)[1]
        path = data_folder.parent / "labels" / name / "labeled.csv"
        if not path.is_file():
            raise UserError(f"no labeled subset '{name}' in {data_folder.parent}: run `histodiffusion data prepare "
                            f"CONFIG` with {name} in data.target.budgets")
        return read_manifest(path)
    return read_manifest(data_folder / f"{split}.csv")


def split_rows(data_folder: Path, split: str, cap: int | None = None,
               seed: int = 0) -> tuple[TileCache, np.ndarray, np.ndarray]:
    """A split's tile cache, its rows in that cache and label indices (optionally capped, stratified).

    ``labeled/<budget>`` subsets live in the train split's cache.
    """
    classes = classes_of(data_folder)
    records = split_records(data_folder, split)
    if cap is not None and len(records) > cap:
        records = sp.cap_per_class(records, max(1, cap // len(classes)), seed, f"eval-{split}")
    cache = TileCache(Path(data_folder) / "cache" / ("train" if split.startswith("labeled/") else split))
    rows = cache.rows([r.path for r in records])
    labels = np.array([classes.index(r.label) for r in records], dtype=np.int64)
    return cache, rows, labels


def split_tiles(data_folder: Path, split: str, cap: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, R, R, 3) uint8 tiles and (N,) label indices of a split."""
    cache, rows, labels = split_rows(data_folder, split, cap, seed)
    return cache.take(rows), labels


def pool_tiles(data_folder: Path) -> TileCache:
    """The pre-training pool's tile cache."""
    return TileCache(Path(data_folder) / "cache" / "pool")


def real_examples(data_folder: Path, split: str, classes: list[str], n: int, seed: int) -> dict[str, np.ndarray]:
    """Up to ``n`` real tiles per class of a split (a seeded draw, in cache order)."""
    cache, rows, labels = split_rows(data_folder, split)
    rng = np.random.default_rng(seed)
    out = {}
    for i, c in enumerate(classes):
        members = rows[labels == i]
        out[c] = cache.take(members[np.sort(rng.permutation(len(members))[:n])])
    return out


def labeled_counts(run_root: Path, budgets: list[str]) -> dict[str, dict[str, int]]:
    """Counts per class of each finished budget's labeled subset in a run directory."""
    rows: dict[str, dict[str, int]] = {}
    for name in budgets:
        path = Path(run_root) / "labels" / name / "counts.json"
        if path.is_file():
            rows.update(io.read_json(path))
    return rows


# ---------------------------------------------------------------------------- synthetic sets
def read_manifest_rows(path: Path) -> list[dict]:
    """Rows of a synthetic-set manifest (``manifest.csv``, ``accepted.csv``, ...)."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def load_synthetic(manifest: Path, classes: list[str]) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """Rows, (N, R, R, 3) uint8 tiles and (N,) label indices of a synthetic-set manifest.

    Relative paths are relative to the manifest's folder.
    """
    manifest = Path(manifest)
    rows = read_manifest_rows(manifest)
    paths = [Path(r["path"]) if Path(r["path"]).is_absolute() else manifest.parent / r["path"] for r in rows]
    tiles = np.stack([read_rgb(p) for p in paths]) if rows else np.zeros((0, 1, 1, 3), np.uint8)
    return rows, tiles, np.array([classes.index(r["label"]) for r in rows], dtype=np.int64)
