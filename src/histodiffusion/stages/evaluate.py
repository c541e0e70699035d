"""Stage ``evaluate``: does adding synthetic tiles help a classifier trained on few labels?

Every arm trains the same downstream classifier (same backbone, steps, augmentation, seeds) on
the real labeled subset plus that arm's synthetic tiles, selects its checkpoint on the valid
split, and is scored once on the test split. Seeds pair the arms: seed k uses the same
initialisation and batch randomness in every arm, so the paired difference removes seed noise.
Each (arm, seed) run is written as soon as it finishes; an interrupted stage resumes there.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np

from histodiffusion import io
from histodiffusion.config import ExperimentConfig
from histodiffusion.data.images import read_rgb
from histodiffusion.metrics.classification import classification_metrics
from histodiffusion.metrics.stats import mean_ci, paired_difference_ci
from histodiffusion.models.image_classifier import predict_logits, softmax, train_image_classifier
from histodiffusion.progress import console
from histodiffusion.stages.base import Stage, StageContext, register
from histodiffusion.stages.data import classes_of, split_tiles
from histodiffusion.stages.select import load_synthetic
from histodiffusion.stages.synthesize import read_manifest_rows
from histodiffusion.training.loop import inference_device

METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "ece")


def _from_manifest(path: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    rows = read_manifest_rows(path)
    tiles = np.stack([read_rgb(r["path"]) for r in rows]) if rows else None
    return tiles, np.array([classes.index(r["label"]) for r in rows], dtype=np.int64)


def synthetic_for(arm: str, ctx: StageContext, classes: list[str]) -> tuple[np.ndarray | None, np.ndarray]:
    """The synthetic tiles and labels an arm adds to the real subset (None for 'real')."""
    if arm == "real":
        return None, np.zeros(0, np.int64)
    if arm == "real+synthetic":
        rows, tiles = load_synthetic(ctx.upstream("synthesize") / "guided")
        return tiles, np.array([classes.index(r["label"]) for r in rows], dtype=np.int64)
    generator = "guided" if arm == "real+selected" else "conditional"
    return _from_manifest(ctx.upstream("select") / generator / "accepted.csv", classes)


def summarize(runs: list[dict], arms: list[str]) -> tuple[dict, dict]:
    """Per arm and metric: mean with 95% CI; per arm: paired difference vs 'real' (matched seeds)."""
    by_arm = {a: {r["seed"]: r for r in runs if r["arm"] == a} for a in arms}
    summary, gains = {}, {}
    for arm in arms:
        seeds = sorted(by_arm[arm])
        summary[arm] = {m: mean_ci([by_arm[arm][s]["test"].get(m) for s in seeds]) for m in METRICS
                        if any(by_arm[arm][s]["test"].get(m) is not None for s in seeds)}
        if arm != "real":
            paired = [s for s in seeds if s in by_arm["real"]]
            gains[arm] = {m: paired_difference_ci([by_arm[arm][s]["test"][m] for s in paired],
                                                  [by_arm["real"][s]["test"][m] for s in paired])
                          for m in ("accuracy", "balanced_accuracy", "macro_f1")}
    return summary, gains


def machine() -> str:
    """A one-line description of this machine (for result files)."""
    import os

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()} {os.cpu_count()} CPU cores, {gpu}, torch {torch.__version__}"


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
            clf = train_image_classifier(e.classifier, tiles, labels, valid_tiles, valid_labels, len(classes), seed,
                                         device, description=f"{ctx.budget_name} {arm} seed {seed}")
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


STAGE = register(Stage("evaluate", ("evaluate", "seed"), _upstream, run, per_budget=True,
                       description="downstream classifier per arm and seed, test metrics with CIs"))
