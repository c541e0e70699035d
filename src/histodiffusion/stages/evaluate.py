"""Stage ``evaluate``: does adding synthetic tiles help a classifier trained on few labels?

Every arm trains the same downstream classifier (same backbone, steps, augmentation, seeds) on
the real labeled subset plus that arm's synthetic tiles, selects its checkpoint on the valid
split, and is scored once on the test split. Seeds pair the arms: seed k uses the same
initialisation and batch randomness in every arm, so the paired difference removes seed noise.
Each (arm, seed) run is written as soon as it finishes; an interrupted stage resumes there.
"""

from __future__ import annotations

import json
import time

import numpy as np

from histodiffusion import io
from histodiffusion.config import ExperimentConfig
from histodiffusion.data.prepared import classes_of, load_synthetic, split_tiles
from histodiffusion.devices import inference_device, machine
from histodiffusion.metrics.arms import summarize
from histodiffusion.metrics.classification import classification_metrics
from histodiffusion.models.tile_classifier import predict_logits, softmax
from histodiffusion.progress import console
from histodiffusion.stages.registry import Stage, StageContext, register
from histodiffusion.training.tile_classifier import train_tile_classifier


def synthetic_for(arm: str, ctx: StageContext, classes: list[str]) -> tuple[np.ndarray | None, np.ndarray]:
    """The synthetic tiles and labels an arm adds to the real subset (None for 'real' or an empty set)."""
    if arm == "real":
        return None, np.zeros(0, np.int64)
    if arm == "real+synthetic":
        manifest = ctx.upstream("synthesize") / "guided" / "manifest.csv"
    else:
        manifest = ctx.upstream("select") / ("guided" if arm == "real+selected" else "conditional") / "accepted.csv"
    _, tiles, labels = load_synthetic(manifest, classes)
    return (tiles if len(labels) else None), labels


def run(ctx: StageContext) -> dict:
    """Train and test every (arm, seed); write runs/*.json and summary.json."""
    cfg, e = ctx.cfg, ctx.cfg.evaluate
    data = ctx.upstream("data")
    classes = classes_of(data)
    device = inference_device(cfg.device)
    real_tiles, real_labels = split_tiles(data, f"labeled/{ctx.budget_name}")
    valid_tiles, valid_labels = split_tiles(data, "valid", e.classifier.eval_max, cfg.seed)
    test_tiles, test_labels = split_tiles(data, "test")
    runs, real_runs = [], {}
    for arm in sorted(e.arms, key=lambda a: a != "real"):  # real first: an arm with no tiles reuses its runs
        syn_tiles, syn_labels = synthetic_for(arm, ctx, classes)
        tiles = real_tiles if syn_tiles is None else np.concatenate([real_tiles, syn_tiles])
        labels = np.concatenate([real_labels, syn_labels])
        same_as_real = arm != "real" and syn_tiles is None and "real" in e.arms
        if same_as_real:
            console.print(f"[yellow]{ctx.budget_name} {arm}: the selection accepted no synthetic tiles, so this arm "
                          "trains on the real subset alone, exactly like 'real' (same seeds); reusing its runs[/]")
        for seed in e.seeds:
            out = ctx.folder / "runs" / f"{arm}-seed{seed}.json"
            if out.is_file():
                runs.append(json.loads(out.read_text()))
                if arm == "real":
                    real_runs[seed] = runs[-1]
                continue
            if same_as_real:
                record = {**real_runs[seed], "arm": arm, "same_as": "real", "seconds": 0.0}
                io.write_json(out, record)
                runs.append(record)
                continue
            t0 = time.time()
            clf = train_tile_classifier(tiles, labels, valid_tiles, valid_labels, len(classes), seed,
                                        **e.classifier.model_dump(exclude={"eval_max"}), device=device,
                                        description=f"{ctx.budget_name} {arm} seed {seed}")
            probs = softmax(predict_logits(clf.model, test_tiles, device, precision=e.classifier.precision))
            record = {"arm": arm, "seed": seed, "n_real": int(len(real_labels)), "n_synthetic": int(len(syn_labels)),
                      "best_step": clf.best_step, "valid": clf.best_valid,
                      "test": classification_metrics(probs, test_labels, classes),
                      "seconds": round(time.time() - t0, 1)}
            io.write_json(out, record)
            runs.append(record)
            if arm == "real":
                real_runs[seed] = record
            console.print(f"{ctx.budget_name} {arm} seed {seed}: test accuracy {record['test']['accuracy']:.4f}, "
                          f"balanced {record['test']['balanced_accuracy']:.4f} ({record['seconds']}s)")
    arms, gains = summarize(runs, list(e.arms))
    result = {"task": cfg.experiment, "label_budget": ctx.budget_name, "n_seeds": len(e.seeds), "arms": arms,
              "paired_gain_vs_real": gains, "n_test": int(len(test_labels)),
              "n_synthetic": {a: next(r["n_synthetic"] for r in runs if r["arm"] == a) for a in e.arms},
              "machine": machine()}
    io.write_json(ctx.folder / "summary.json", result)
    return {"summary": "summary.json", "accuracy": {a: arms[a]["accuracy"]["mean"] for a in e.arms}}


def _upstream(cfg: ExperimentConfig) -> tuple[str, ...]:
    return ("data", "labels", "synthesize", "select") if set(cfg.evaluate.arms) - {"real"} else ("data", "labels")


STAGE = register(Stage("evaluate", "evaluate", ("evaluate", "seed"), _upstream, run, per_budget=True,
                       description="downstream classifier per arm and seed, test metrics with CIs"))
