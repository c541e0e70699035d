"""Stage ``data``: read the sources, split the target, check the guards, write the manifests of pool,
train, valid and test, and their tile caches.

The label budgets' subsets are the stage ``labels`` (``labels.py``), so that the pool-only stages
(autoencoder, latents, pretrain) do not depend on them: adding a budget to a finished run draws its
subset and runs only the per-budget stages.
"""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from histodiffusion import io
from histodiffusion.config import ExperimentConfig, SourceCfg
from histodiffusion.data import fingerprint as fp
from histodiffusion.data import splits as sp
from histodiffusion.data.cache import TileCache, build_cache
from histodiffusion.data.images import image_size
from histodiffusion.data.sources import (
    NPZ_SEP,
    SPLIT_ALIASES,
    Record,
    data_root,
    label_folder,
    label_folders,
    read_csv_manifest,
    read_source,
    write_manifest,
)
from histodiffusion.errors import UserError
from histodiffusion.pipeline import Stage, StageContext, register
from histodiffusion.progress import console, print_counts, warn

EVAL_SPLITS = ("train", "valid", "test")
LARGE_FACTOR = 8
"""A target image more than this many times data.resolution on its short side is flagged: it would
shrink to one tile."""
OUTPUTS = ("*.csv", "classes.json", "counts.json", "cache/*/*")


def _read(src: SourceCfg, cfg: ExperimentConfig, root: Path, target: bool = False) -> list[Record]:
    records = read_source(src.dataset, src.path, src.format, root, cfg.data.resolution, src.name)
    records, repeated = sp.dedupe(records, src.name, strict=target)
    if repeated:
        warn(f"source '{src.name}': {len(repeated)} row(s) list a file again; each file is used once: "
             + ", ".join(repeated[:5]) + (" ..." if len(repeated) > 5 else ""))
    if src.splits:
        wanted = {SPLIT_ALIASES.get(s.lower(), s) for s in src.splits}
        records = [r for r in records if r.split in wanted]
        if not records:
            raise UserError(f"source '{src.name}': no images in splits {src.splits}")
    if src.labels:
        missing = sorted(set(src.labels) - {r.label for r in records})
        if missing:
            raise UserError(f"source '{src.name}': labels {missing} not found (it has {sorted({str(r.label) for r in records})})")
        records = [r for r in records if r.label in set(src.labels)]
    return [r.with_(source=src.name, weight=src.weight) for r in records]


def _tiled(src: SourceCfg, records: list[Record], folder: Path) -> list[Record]:
    """Cut the source's images into tiles (tissue only) under ``folder/tiles/<source>``."""
    from histodiffusion.data.tiling import tile_files

    out = folder / "tiles" / (label_folder(src.name) or "source")
    tile = src.tile
    summary = tile_files([Path(r.path) for r in records], out, tile.size, tile.stride, tile.min_tissue,
                         "manifest", label="unlabeled", progress=False)
    console.print(f"  tiled {src.name}: {summary.n_inputs} image(s) -> {summary.n_tiles} tiles "
                  f"({summary.n_rejected_background} background, {summary.n_too_small} too small)")
    if summary.n_tiles == 0:
        raise UserError(f"source '{src.name}': tiling at size {tile.size} kept no tiles; lower "
                        "tile.size or tile.min_tissue")
    tiles = read_csv_manifest(out / "manifest.csv", source=src.name)
    return [r.with_(label=None, weight=src.weight) for r in tiles]


def _target(cfg: ExperimentConfig, root: Path) -> tuple[dict[str, list[Record]], list[Record], str, list[str]]:
    t = cfg.data.target
    records = _read(t, cfg, root, target=True)
    unlabeled = [r for r in records if not r.label]
    if unlabeled:
        raise UserError(f"target '{t.name}': {len(unlabeled)} image(s) have no label (e.g. {unlabeled[0].path}); "
                        "the target needs <label>/<file> folders or a label column")
    if t.classes:
        missing = sorted(set(t.classes) - {r.label for r in records})
        if missing:
            raise UserError(f"data.target.classes: {missing} not found in '{t.name}' "
                            f"(it has {sorted({r.label for r in records})})")
        records = [r for r in records if r.label in set(t.classes)]
    classes = list(t.classes) if t.classes else sorted({r.label for r in records})  # type: ignore[misc]
    sp.check_two_classes(classes, t.name)
    label_folders(classes)  # synthetic tiles go to tiles/<label>/: refuse labels no folder can hold
    splits, used = sp.split_target(records, t.split_by, t.split_fractions, t.split_seed, t.valid_fraction)
    if t.max_per_class:
        for s in EVAL_SPLITS:
            splits[s] = sp.cap_per_class(splits[s], t.max_per_class, cfg.seed, f"cap-{s}")
    return splits, records, used, classes


def _disjoint_splits(src: SourceCfg, cfg: ExperimentConfig) -> bool:
    """True when pool and target take disjoint, named splits of the same dataset."""
    t = cfg.data.target
    if not src.splits or not t.splits:
        return False
    norm = lambda names: {SPLIT_ALIASES.get(n.lower(), n) for n in names}  # noqa: E731
    return not norm(src.splits) & norm(t.splits)


def _pool(cfg: ExperimentConfig, root: Path, folder: Path, target_all: list[Record],
          originals: list[str]) -> list[Record]:
    """The pre-training pool's records; the files of tiled sources are added to ``originals``."""
    target_name = cfg.data.target.name
    pool: list[Record] = []
    for src in cfg.data.pool:
        if src.dataset is not None and src.dataset == cfg.data.target.dataset and not _disjoint_splits(src, cfg):
            raise UserError(f"data.pool: '{src.dataset}' is the target dataset; the pre-training pool must "
                            "exclude the target (that is the point of the protocol). Only disjoint splits of "
                            "one dataset may serve both, e.g. pool splits: [train], target splits: [test]")
        records = _read(src, cfg, root)
        if src.tile is not None:
            originals += [r.path for r in records]
            records = _tiled(src, records, folder)
        if src.max_images:
            records = sp.weighted_sample(records, src.max_images, cfg.seed)
        pool += [r.with_(label=None, group=None) for r in records]
    sp.check_pool_disjoint(pool, target_all, target_name)
    if cfg.data.pool_max:
        pool = sp.weighted_sample(pool, cfg.data.pool_max, cfg.seed)
    return pool


def target_train_unlabeled(cfg: ExperimentConfig, train: list[Record]) -> list[Record]:
    """The practical protocol's pool addition: the target's train tiles in no label budget's subset
    (drawn as stage ``labels`` draws them), labels and case ids dropped."""
    t = cfg.data.target
    labeled = {r.path for b in t.budgets for r in sp.labeled_subset(train, b, cfg.seed)}
    return [r.with_(label=None, group=None, split=None, source=f"{t.name} train, unlabeled", weight=1.0)
            for r in train if r.path not in labeled]


def _cached(records: list[Record], name: str, ctx: StageContext) -> list[Record]:
    d = ctx.cfg.data
    build_cache(records, d.resolution, ctx.folder / "cache" / name, d.cache_shard_size, d.max_bad_fraction,
                d.num_workers, name=name)
    cache = TileCache(ctx.folder / "cache" / name)
    return [r for r in records if cache.contains(r.path)]


def run(ctx: StageContext) -> dict:
    """Read sources, split, cache tiles, check guards, write manifests (label budgets: stage ``labels``)."""
    cfg = ctx.cfg
    root = data_root(cfg.data.root)
    console.print(f"data root: {root}")
    splits, target_all, mode, classes = _target(cfg, root)
    sp.check_group_leakage(splits)
    seen = [r.path for s in EVAL_SPLITS for r in splits[s]]
    digests = fp.digests(seen, "hashing the target")
    sp.check_duplicate_content(splits, digests, cfg.data.target.name)
    _warn_large(splits, cfg.data.resolution)
    pool = _pool(cfg, root, ctx.folder, target_all, seen)
    digests.update(fp.digests([r.path for r in pool], "hashing the pool"))
    sp.check_pool_content(pool, splits["valid"] + splits["test"], digests, cfg.data.target.name)
    seen += [r.path for r in pool]
    splits = {s: _cached(splits[s], s, ctx) for s in EVAL_SPLITS}
    if cfg.data.pool_target_train:
        pool += target_train_unlabeled(cfg, splits["train"])
    sp.check_pool_excludes(pool, splits["valid"] + splits["test"], cfg.data.target.name)
    pool = _cached(pool, "pool", ctx)
    for s in EVAL_SPLITS:
        write_manifest(ctx.folder / f"{s}.csv", splits[s])
    write_manifest(ctx.folder / "pool.csv", pool)
    table = sp.count_table(splits, classes)
    pool_sources: dict[str, int] = {}
    for r in pool:
        pool_sources[r.source] = pool_sources.get(r.source, 0) + 1
    summary = {"target": cfg.data.target.name, "split_by": mode, "classes": classes, "counts": table,
               "pool": {"total": len(pool), "by_source": pool_sources}, "resolution": cfg.data.resolution}
    io.write_json(ctx.folder / "classes.json", classes)
    io.write_json(ctx.folder / "counts.json", summary)
    fp.write_fingerprint(ctx.folder, fp.input_facts(seen, digests), fp.output_facts(ctx.folder, OUTPUTS))
    print_counts(f"{cfg.experiment}: target '{cfg.data.target.name}' (split by {mode})", table, classes)
    src_table = Table(title="pre-training pool (labels ignored)")
    src_table.add_column("source")
    src_table.add_column("tiles", justify="right")
    for s, n in pool_sources.items():
        src_table.add_row(s, str(n))
    src_table.add_row("[bold]total", f"[bold]{len(pool)}")
    console.print(src_table)
    return summary


def _warn_large(splits: dict[str, list[Record]], resolution: int) -> None:
    """Warn about target images so large that shrinking each to one tile loses its detail."""
    large = []
    for r in (r for s in EVAL_SPLITS for r in splits[s] if NPZ_SEP not in r.path):
        size = image_size(r.path)
        if size is not None and min(size) > LARGE_FACTOR * resolution:
            large.append(f"{r.path} ({size[0]}x{size[1]})")
    if large:
        warn(f"{len(large)} target image(s) are more than {LARGE_FACTOR}x data.resolution ({resolution} px) on "
             f"their short side; each becomes one {resolution} px tile and loses its detail: "
             + ", ".join(large[:5]) + (" ..." if len(large) > 5 else "")
             + ". Cut them into tiles first (`histodiffusion data tile FILES --out DIR --label LABEL`, once per "
             "class, then data.target.path: DIR); a pool source takes `tile: {size: N}` instead.")


def verify(ctx: StageContext) -> None:
    """Refuse to reuse a finished data stage whose input files changed since it ran."""
    found = fp.changed_inputs(ctx.folder)
    if found is None:  # prepared before fingerprints were written
        return
    changed, missing = found
    if changed:
        shown = "\n  ".join(changed[:10]) + (f"\n  ... and {len(changed) - 10} more" if len(changed) > 10 else "")
        raise UserError(
            f"the data changed since stage 'data' ran in {ctx.run_dir.root}: {len(changed)} file(s) it read "
            f"now differ:\n  {shown}\nIts manifests and tile caches, and every later stage, describe the old "
            "data. Rerun with --force data (`histodiffusion run CONFIG --force data`) to prepare the data again "
            "and redo what depends on it, or restore the files."
        )
    if missing:
        warn(f"{len(missing)} file(s) stage 'data' read are no longer where they were (e.g. {missing[0]}); "
             "the run goes on with its tile caches.")


def _exclude(cfg: ExperimentConfig) -> tuple[str, ...]:
    # The budgets only change the pool in the practical protocol (their subsets stay out of it).
    return () if cfg.data.pool_target_train else ("data.target.budgets",)


STAGE = register(Stage("data", "data prepare", ("data", "seed"), (), run, description="manifests and tile caches",
                       exclude=_exclude, verify=verify))
