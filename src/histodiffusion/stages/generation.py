"""Stage ``generation``: generation quality of the synthetic tiles of one label budget.

Distances are measured in (i) the SimCLR encoder of stage ``features``, trained on the unlabeled
pool (works offline) and (ii) Inception-v3 when its weights are on disk. Every distance comes with
its sample counts and a floor: the same metric between two disjoint halves of the real tiles.
Memorization: each synthetic tile's nearest labeled tile and pool tile; near-copies flagged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from histodiffusion import io
from histodiffusion.data.prepared import classes_of, load_synthetic, pool_tiles, split_tiles
from histodiffusion.devices import inference_device
from histodiffusion.metrics import generation as gm
from histodiffusion.models.feature_encoder import (
    ENCODER,
    extract_features,
    inception_available,
    inception_features,
    load_encoder,
)
from histodiffusion.pipeline import Stage, StageContext, register
from histodiffusion.progress import console
from histodiffusion.viz import labeled_rows, save_image


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
    manifests = {source: ctx.upstream("synthesize") / source / "manifest.csv"
                 for source in ("unguided", "guided", "conditional")}
    manifests["selected"] = ctx.upstream("select") / "guided" / "accepted.csv"
    sets = {}
    for name, manifest in manifests.items():
        if manifest.is_file():
            _, tiles, labels = load_synthetic(manifest, classes)
            if len(labels):
                sets[name] = (tiles, labels)
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
    pool = pool_tiles(data)
    tiles["pool"] = pool.take(np.arange(len(pool)))
    for name, (t, y) in synthetic_sets(ctx, classes).items():
        tiles[name], labels[name] = t, y
    encoder = load_encoder(ctx.upstream("features") / ENCODER, device)
    feats = {name: extract_features(encoder, t, device=device).astype(np.float64) for name, t in tiles.items()}
    result = {"feature_space": f"SimCLR {cfg.features.backbone} trained on the pool",
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


STAGE = register(Stage("generation", "evaluate-generation", ("generation", "seed"),
                       ("data", "labels", "features", "synthesize", "select"), run_generation, per_budget=True,
                       description="generation quality and memorization"))
