"""Stage ``select``: keep only synthetic tiles an auxiliary classifier confidently matches to their class.

The auxiliary classifier is trained on the labeled subset only, with the valid split for early
stopping (and, optionally, a temperature fitted on it). A tile is accepted when the predicted
class is its target and the confidence >= tau; optionally its nearest class centroid (features
of the labeled tiles, as in the authors' code) must be the target too. A cap per class (``ratio``
x the real count) keeps the most confident tiles first.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from histodiffusion import io
from histodiffusion.config import ExperimentConfig
from histodiffusion.data.prepared import classes_of, load_synthetic, split_tiles
from histodiffusion.devices import inference_device
from histodiffusion.models.tile_classifier import (
    fit_temperature,
    penultimate_features,
    predict_logits,
    softmax,
)
from histodiffusion.pipeline import Stage, StageContext, register
from histodiffusion.progress import console
from histodiffusion.training.tile_classifier import TrainedClassifier, train_tile_classifier

SELECTABLE = ("guided", "conditional")


def centroid_ok(clf: TrainedClassifier, real_tiles: np.ndarray, real_labels: np.ndarray, tiles: np.ndarray,
                targets: np.ndarray, num_classes: int, device) -> np.ndarray:
    """True where the nearest class centroid (cosine, labeled-tile features) is the target class."""
    real = penultimate_features(clf.model, real_tiles, device)
    real /= np.linalg.norm(real, axis=1, keepdims=True) + 1e-12
    centroids = np.stack([real[real_labels == k].mean(0) for k in range(num_classes)])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True) + 1e-12
    feats = penultimate_features(clf.model, tiles, device)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True) + 1e-12
    return (feats @ centroids.T).argmax(1) == targets


def decide(cfg: ExperimentConfig, probs: np.ndarray, targets: np.ndarray, centroid: np.ndarray | None,
           real_counts: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Accepted mask and a reason per tile ('accepted', 'wrong class', 'low confidence', 'centroid', 'cap')."""
    s = cfg.select
    pred, conf = probs.argmax(1), probs.max(1)
    reasons = np.where(pred != targets, "wrong class", np.where(conf < s.threshold, "low confidence", "accepted"))
    if centroid is not None:
        reasons = np.where((reasons == "accepted") & ~centroid, "centroid", reasons)
    for k in range(probs.shape[1]):
        cap = None if s.ratio is None else int(round(s.ratio * real_counts[k]))
        idx = np.flatnonzero((targets == k) & (reasons == "accepted"))
        if cap is not None and len(idx) > cap:
            order = idx[np.argsort(-probs[idx, k], kind="stable")]
            reasons[order[cap:]] = "cap"
    return reasons == "accepted", reasons.tolist()


def _write(path: Path, rows: list[dict], extra: list[dict]) -> None:
    fields = list(rows[0]) + list(extra[0]) if rows else ["path", "label"]
    with io.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r, e in zip(rows, extra, strict=True):
            writer.writerow({**r, **e})


def run(ctx: StageContext) -> dict:
    """Train the auxiliary classifier, score every synthetic tile, write accepted/rejected manifests."""
    cfg, s = ctx.cfg, ctx.cfg.select
    data = ctx.upstream("data")
    classes = classes_of(data)
    device = inference_device(cfg.device)
    real_tiles, real_labels = split_tiles(data, f"labeled/{ctx.budget_name}")
    valid_tiles, valid_labels = split_tiles(data, "valid", s.classifier.eval_max, cfg.seed)
    clf = train_tile_classifier(real_tiles, real_labels, valid_tiles, valid_labels, len(classes), cfg.seed,
                                **s.classifier.model_dump(exclude={"eval_max"}), device=device,
                                description=f"selection classifier {ctx.budget_name}")
    if s.temperature_scaling:
        clf.temperature = fit_temperature(predict_logits(clf.model, valid_tiles, device), valid_labels)
    io.write_json(ctx.folder / "classifier.json", {"best_step": clf.best_step, "valid": clf.best_valid,
                                                   "temperature": clf.temperature, "history": clf.history})
    real_counts = np.bincount(real_labels, minlength=len(classes))
    summary: dict = {"temperature": clf.temperature, "valid": clf.best_valid}
    for source in (g for g in cfg.synthesize.sources if g in SELECTABLE):
        rows, tiles, targets = load_synthetic(ctx.upstream("synthesize") / source / "manifest.csv", classes)
        probs = softmax(predict_logits(clf.model, tiles, device), clf.temperature)
        centroid = centroid_ok(clf, real_tiles, real_labels, tiles, targets, len(classes), device) \
            if s.centroid_rule else None
        accepted, reasons = decide(cfg, probs, targets, centroid, real_counts)
        extra = [{"confidence": round(float(p.max()), 5), "predicted": classes[int(p.argmax())],
                  "selection": why} for p, why in zip(probs, reasons, strict=True)]
        out = ctx.folder / source
        base = (ctx.upstream("synthesize") / source).resolve()
        rows = [{**r, "path": str(base / r["path"])} for r in rows]  # absolute: usable from anywhere
        _write(out / "accepted.csv", [r for r, a in zip(rows, accepted, strict=True) if a],
               [e for e, a in zip(extra, accepted, strict=True) if a])
        _write(out / "rejected.csv", [r for r, a in zip(rows, accepted, strict=True) if not a],
               [e for e, a in zip(extra, accepted, strict=True) if not a])
        table = acceptance_table(classes, targets, reasons, real_counts)
        io.write_json(out / "acceptance.json", table)
        summary[source] = table
        console.print(f"select {source}: kept {table['total']['accepted']} of {table['total']['generated']} "
                      f"(tau={s.threshold}, T={clf.temperature:.2f})")
    return summary


def acceptance_table(classes: list[str], targets: np.ndarray, reasons: list[str], real_counts: np.ndarray) -> dict:
    """Per class: generated, rejected by each rule, accepted, and the real labeled count."""
    reasons_arr = np.array(reasons)
    table = {}
    for k, c in enumerate(classes + ["total"]):
        mask = targets == k if c != "total" else np.ones(len(targets), bool)
        row = {"real": int(real_counts[k]) if c != "total" else int(real_counts.sum()),
               "generated": int(mask.sum())}
        for why in ("wrong class", "low confidence", "centroid", "cap", "accepted"):
            row[why.replace(" ", "_")] = int(((reasons_arr == why) & mask).sum())
        row["acceptance_rate"] = row["accepted"] / row["generated"] if row["generated"] else None
        table[c] = row
    return table


STAGE = register(Stage("select", "select", ("select", "seed"), ("data", "labels", "synthesize"), run, per_budget=True,
                       description="confidence-based selection of synthetic tiles"))
