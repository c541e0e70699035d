"""Stages ``features`` (a histology feature space) and ``generation`` (quality of synthetic tiles).

Distances are measured in (i) a SimCLR encoder trained by the project on the unlabeled pool
(works offline) and (ii) Inception-v3 when its weights are on disk. Every distance comes with
its sample counts and a floor: the same metric between two disjoint halves of the real tiles.
Memorization: each synthetic tile's nearest labeled tile and pool tile; near-copies flagged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from histodiffusion import io
from histodiffusion.data.cache import TileCache
from histodiffusion.data.images import read_rgb
from histodiffusion.metrics import generation as gm
from histodiffusion.models.features import (
    extract_features,
    inception_available,
    inception_features,
    load_encoder,
    save_encoder,
    train_feature_encoder,
)
from histodiffusion.progress import console
from histodiffusion.stages.base import Stage, StageContext, register
from histodiffusion.stages.data import classes_of, split_tiles
from histodiffusion.stages.synthesize import read_manifest_rows
from histodiffusion.training.loop import inference_device
from histodiffusion.viz import labeled_rows, save_image

ENCODER = "encoder"


def run_features(ctx: StageContext) -> dict:
    """Train the SimCLR histology encoder on the pool tiles (labels never used)."""
    g = ctx.cfg.generation
    tiles = TileCache(ctx.upstream("data") / "cache" / "pool")
    pool = tiles.take(np.arange(len(tiles)))
    encoder = train_feature_encoder(pool, g.encoder_steps, g.encoder_batch_size, g.encoder_lr, ctx.cfg.seed,
                                    g.encoder_backbone, inference_device(ctx.cfg.device),
                                    log=ctx.folder / "metrics.jsonl")
    save_encoder(encoder, ctx.folder / ENCODER)
    return {"backbone": g.encoder_backbone, "steps": g.encoder_steps, "n_pool": len(pool)}


def _distances(real: np.ndarray, fake: np.ndarray, kid_subset: int, k: int) -> dict:
    """FD, KID (mean, std) and precision/recall of one synthetic set vs the real reference."""
    out: dict = {"n_real": int(len(real)), "n_synthetic": int(len(fake))}
    if len(fake) < 2 or len(real) < 2:
        return out
    out["fd"] = gm.frechet_distance(real, fake)
    kid, kid_std = gm.kernel_inception_distance(real, fake, subset_size=min(kid_subset, len(real), len(fake)))
    out["kid"], out["kid_std"] = kid, kid_std
    if len(fake) > k and len(real) > k:
        out["precision"], out["recall"] = gm.precision_recall(real, fake, k)
    return out


def _floor(real: np.ndarray, seed: int, kid_subset: int, k: int) -> dict:
    a, b = gm.split_halves(len(real), seed)
    return _distances(real[a], real[b], kid_subset, k)


def synthetic_sets(ctx: StageContext, classes: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """unguided / guided / selected (/ conditional) tiles and their target labels, as available."""
    sets = {}
    synth = ctx.upstream("synthesize")
    for generator in ("unguided", "guided", "conditional"):
        manifest = synth / generator / "manifest.csv"
        if manifest.is_file():
            rows = read_manifest_rows(manifest)
            sets[generator] = (np.stack([read_rgb(synth / generator / r["path"]) for r in rows]),
                               np.array([classes.index(r["label"]) for r in rows]))
    accepted = ctx.upstream("select") / "guided" / "accepted.csv"
    rows = read_manifest_rows(accepted) if accepted.is_file() else []
    if rows:
        sets["selected"] = (np.stack([read_rgb(r["path"]) for r in rows]),
                            np.array([classes.index(r["label"]) for r in rows]))
    return sets


def measure(feats: dict[str, np.ndarray], labels: dict[str, np.ndarray], classes: list[str], cfg) -> dict:
    """Overall and per-class distances of every synthetic set, with real-vs-real floors."""
    g = cfg.generation
    real, y_real = feats["real"], labels["real"]
    out = {"floor": _floor(real, cfg.seed, g.kid_subset_size, g.knn_k), "sets": {}, "per_class": {}}
    for name in feats:
        if name in ("real", "labeled", "pool"):
            continue
        out["sets"][name] = _distances(real, feats[name], g.kid_subset_size, g.knn_k)
    for k, c in enumerate(classes):
        rc = real[y_real == k]
        row = {"floor": _floor(rc, cfg.seed, g.kid_subset_size, g.knn_k) if len(rc) >= 4 else {}}
        for name in out["sets"]:
            row[name] = _distances(rc, feats[name][labels[name] == k], g.kid_subset_size, g.knn_k)
        out["per_class"][c] = row
    return out


def _memorization(feats: dict[str, np.ndarray], tiles: dict[str, np.ndarray], cfg, folder: Path) -> dict:
    out = {}
    for name in ("guided", "selected", "conditional"):
        if name not in feats:
            continue
        mem = gm.memorization(feats[name], feats["labeled"], feats["pool"], reference=feats["real"],
                              quantile=cfg.generation.near_copy_quantile)
        pairs = mem.closest(min(8, len(feats[name])))
        out[name] = {"n_synthetic": int(len(feats[name])), "n_near_copies": mem.n_flagged,
                     "threshold": float(mem.threshold),
                     "median_nn_distance_labeled": float(np.median(mem.nn_dist_train)),
                     "median_nn_distance_pool": float(np.median(mem.nn_dist_pool)),
                     "closest_pairs": [{"synthetic": int(i), "labeled": int(j), "distance": float(d)}
                                       for i, j, d in pairs]}
        if pairs:
            grid = labeled_rows([(f"{name} (closest)", tiles[name][[i for i, _, _ in pairs]]),
                                 ("nearest labeled", tiles["labeled"][[j for _, j, _ in pairs]])], len(pairs), scale=2)
            save_image(grid, folder / f"closest_{name}.png")
    return out


def run_generation(ctx: StageContext) -> dict:
    """Histology-feature (and Inception) distances, per class, floors, precision/recall, near-copies."""
    cfg, g = ctx.cfg, ctx.cfg.generation
    data = ctx.upstream("data")
    classes = classes_of(data)
    device = inference_device(cfg.device)
    tiles, labels = {}, {}
    tiles["real"], labels["real"] = split_tiles(data, "valid", g.max_real, cfg.seed)
    tiles["labeled"], labels["labeled"] = split_tiles(data, f"labeled/{ctx.budget_name}")
    pool = TileCache(data / "cache" / "pool")
    tiles["pool"] = pool.take(np.arange(len(pool)))
    for name, (t, y) in synthetic_sets(ctx, classes).items():
        tiles[name], labels[name] = t, y
    encoder = load_encoder(ctx.upstream("features") / ENCODER, device)
    feats = {name: extract_features(encoder, t, device=device).astype(np.float64) for name, t in tiles.items()}
    result = {"feature_space": f"SimCLR {cfg.generation.encoder_backbone} trained on the pool",
              "histology": measure(feats, labels, classes, cfg),
              "memorization": _memorization(feats, tiles, cfg, ctx.folder)}
    if inception_available(g.inception_weights):
        inc = {name: inception_features(t, g.inception_weights, device=device) for name, t in tiles.items()
               if name not in ("pool", "labeled")}
        result["inception"] = measure(inc, labels, classes, cfg)
    else:
        result["inception"] = None
        console.print("[yellow]Inception-v3 weights (and torch-fidelity) not found: the Inception columns are "
                      "skipped. Set generation.inception_weights or place the weights in the torch hub cache.[/]")
    io.write_json(ctx.folder / "generation.json", result)
    h = result["histology"]
    console.print(f"generation {ctx.budget_name}: FD floor {h['floor'].get('fd', float('nan')):.4f}; " + ", ".join(
        f"{n} FD {s.get('fd', float('nan')):.4f}" for n, s in h["sets"].items()))
    return {"sets": list(h["sets"])}


FEATURES = register(Stage("features", ("generation.encoder_backbone", "generation.encoder_steps",
                                       "generation.encoder_batch_size", "generation.encoder_lr", "seed"),
                          ("data",), run_features, description="histology feature encoder (SimCLR on the pool)"))
GENERATION = register(Stage("generation", ("generation", "seed"), ("data", "labels", "features", "synthesize", "select"),
                            run_generation,
                            per_budget=True, description="generation quality and memorization"))
