"""Stage ``evaluate``: what are synthetic tiles worth to a classifier trained on few labels?

Every arm trains the same downstream classifier (same backbone, recipe, augmentation, seeds) on
the real labeled subset plus that arm's synthetic tiles, selects its checkpoint on the valid
split, and is scored once on the test split. Seeds pair the arms: seed k uses the same
initialisation and batch randomness in every arm, so the paired difference removes seed noise.

Beside the synthetic arms: a real-label ladder (``real@2x``, ``real@4x``, ``real@all``: real-only
training on nested supersets of the budget's subset) gives every arm a label-equivalent, and the
``ssl`` arms start from the backbone pre-trained self-supervised on the same pool (stage
``features``), the competing use of the unlabeled tiles.

Each (arm, seed) run is written as soon as it finishes; an interrupted stage resumes there.
Under ``accelerate launch`` the runs are shared out among the processes.

Every finished run is also kept in ``<run dir>/evaluate/cache/<key>.json``, where the key is a
digest of everything the training reads (its tiles and labels, the valid and test tiles, the
recipe, the seed, the starting backbone, the code and torch versions). A run whose key is there is
reused instead of trained again: the real-only arms shared by several budgets (``real@all``), by a
re-run after ``--force evaluate`` (say, with one more arm), or by another run directory named in
``evaluate.reuse_from`` (the paper and practical protocols share the target's real-only arms).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import histodiffusion
from histodiffusion import io
from histodiffusion.config import ExperimentConfig, rung_name
from histodiffusion.data import splits as sp
from histodiffusion.data.prepared import (
    classes_of,
    load_synthetic,
    split_records,
    split_rows,
    split_tiles,
)
from histodiffusion.devices import (
    cpu_cores,
    fork_map,
    inference_device,
    machine,
    process_state,
    uses_cpu,
)
from histodiffusion.errors import UserError
from histodiffusion.metrics.arms import arm_summaries, label_equivalents, paired_gains
from histodiffusion.metrics.classification import classification_metrics
from histodiffusion.models.feature_encoder import ENCODER, load_encoder
from histodiffusion.models.tile_classifier import predict_logits, softmax
from histodiffusion.pipeline import Stage, StageContext, register
from histodiffusion.progress import console, progress_bar
from histodiffusion.training.tile_classifier import steps_for, train_tile_classifier


@dataclass
class Arm:
    """What one arm trains on: real tiles (the subset or a ladder rung), synthetic tiles, and the
    backbone it starts from (None: from scratch)."""

    name: str
    tiles: np.ndarray
    labels: np.ndarray
    n_real: int
    n_synthetic: int
    ssl: bool = False
    same_as: str | None = None  # an arm that adds no synthetic tile is this arm, run for run


def rung_budget(budget: int | float, multiple: float) -> int | float:
    """The label budget of a ladder rung: ``multiple`` x a fraction (at most 1) or x a count per class."""
    if isinstance(budget, int):
        return int(round(budget * multiple))
    return min(1.0, budget * multiple)


def ladder_subset(train: list, budget: int | float, multiple: float | None, seed: int) -> list:
    """A rung's labeled records: drawn like the budget's subset (so they contain it), or all of train."""
    return list(train) if multiple is None else sp.labeled_subset(train, rung_budget(budget, multiple), seed)


def _synthetic(ctx: StageContext, arm: str, classes: list[str]) -> tuple[np.ndarray | None, np.ndarray]:
    if arm == "real+synthetic":
        manifest = ctx.upstream("synthesize") / "guided" / "manifest.csv"
    else:
        source = "conditional" if arm == "real+conditional_no_pretrain" else "guided"
        manifest = ctx.upstream("select") / source / "accepted.csv"
    _, tiles, labels = load_synthetic(manifest, classes)
    return (tiles if len(labels) else None), labels


def build_arms(ctx: StageContext, classes: list[str]) -> list[Arm]:
    """Every arm of the config with its training set, ``real`` first."""
    cfg, e = ctx.cfg, ctx.cfg.evaluate
    data = ctx.upstream("data")
    real_tiles, real_labels = split_tiles(data, f"labeled/{ctx.budget_name}")
    arms = []
    for name in sorted(e.arms, key=lambda a: a != "real"):
        ssl = name.startswith("ssl")
        if name in ("real", "ssl"):
            arms.append(Arm(name, real_tiles, real_labels, len(real_labels), 0, ssl))
            continue
        syn_tiles, syn_labels = _synthetic(ctx, name, classes)
        base = "ssl" if ssl else "real"
        if syn_tiles is None:
            arms.append(Arm(name, real_tiles, real_labels, len(real_labels), 0, ssl,
                            same_as=base if base in e.arms else None))
            continue
        arms.append(Arm(name, np.concatenate([real_tiles, syn_tiles]), np.concatenate([real_labels, syn_labels]),
                        len(real_labels), len(syn_labels), ssl))
    if e.rungs():
        cache, _, _ = split_rows(data, "train")
        train = split_records(data, "train")
        for multiple in e.rungs():
            records = ladder_subset(train, ctx.budget, multiple, cfg.seed)
            labels = np.array([classes.index(r.label) for r in records], dtype=np.int64)
            arms.append(Arm(rung_name(multiple), cache.take(cache.rows([r.path for r in records])), labels,
                            len(labels), 0))
    return arms


CACHE = "cache"  # evaluate/cache/<key>.json: finished runs by the digest of their inputs


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def record_key(ctx: StageContext, arm_digest: str, seed: int, valid_digest: str, test_digest: str,
               classes: list[str], backbone: str) -> str:
    """The cache key of one (arm, seed) run: a digest of everything its training and test read."""
    facts = {"record": 1, "histodiffusion": histodiffusion.__version__, "torch": torch.__version__,
             "recipe": ctx.cfg.evaluate.classifier.model_dump(mode="json"), "classes": classes, "seed": seed,
             "train": arm_digest, "valid": valid_digest, "test": test_digest, "backbone": backbone}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:24]


def cache_dirs(ctx: StageContext) -> list[Path]:
    """Where finished runs are looked up: this run directory's cache, then each ``reuse_from``'s."""
    others = []
    for p in ctx.cfg.evaluate.reuse_from:
        root = Path(p).expanduser()
        if not root.is_dir():
            raise UserError(f"evaluate.reuse_from names {p}, which is not a directory: give run directories "
                            "(the --run-dir of earlier runs) or remove the entry")
        others.append(root / "evaluate" / CACHE)
    return [ctx.run_dir.root / "evaluate" / CACHE, *others]


def _cached(dirs: list[Path], key: str) -> tuple[dict, Path] | None:
    for d in dirs:
        path = d / f"{key}.json"
        if path.is_file():
            try:
                record = io.read_json(path)
            except (UserError, UnicodeDecodeError):  # a damaged cache entry is trained again, not trusted
                continue
            if isinstance(record, dict) and isinstance(record.get("test"), dict) and "accuracy" in record["test"]:
                return record, path
    return None


def _run_one(ctx: StageContext, arm: Arm, seed: int, valid: tuple, test: tuple, classes: list[str],
             backbone: dict | None, device, progress: bool = True) -> dict:
    e = ctx.cfg.evaluate
    t0 = time.time()
    clf = train_tile_classifier(arm.tiles, arm.labels, *valid, len(classes), seed,
                                **e.classifier.model_dump(exclude={"eval_max"}),
                                init_backbone=backbone if arm.ssl else None, device=device,
                                description=f"{ctx.budget_name} {arm.name} seed {seed}", progress=progress)
    probs = softmax(predict_logits(clf.model, test[0], device, precision=e.classifier.precision))
    return {"arm": arm.name, "seed": seed, "n_real": arm.n_real, "n_synthetic": arm.n_synthetic,
            "steps": steps_for(len(arm.labels), e.classifier.steps, e.classifier.batch_size, e.classifier.epochs,
                               e.classifier.max_steps),
            "best_step": clf.best_step, "valid": clf.best_valid,
            "test": classification_metrics(probs, test[1], classes), "seconds": round(time.time() - t0, 1),
            "torch_threads": torch.get_num_threads()}


def cpu_processes(cfg: ExperimentConfig, num_processes: int, trainings: int) -> int:
    """How many of this process's ``trainings`` run at once (``evaluate.cpu_processes``, default one
    per core; Linux): 1 on GPUs and under a multi-process launch, which shares the runs out instead."""
    if num_processes > 1 or not uses_cpu(cfg.device) or sys.platform != "linux":
        return 1
    return max(1, min(cfg.evaluate.cpu_processes or cpu_cores(), trainings))


def _train_all(ctx: StageContext, todo: list[tuple[Arm, int]], processes: int, valid: tuple, test: tuple,
               classes: list[str], backbone: dict | None, device, finish: Callable[[Arm, int, dict], None]) -> None:
    """Train and test each (arm, seed) of ``todo``, one after another or ``processes`` at a time in
    forked CPU processes, and hand each record to ``finish`` as it comes (so an interrupted stage
    keeps every finished run)."""
    def one(i: int) -> dict:
        arm, seed = todo[i]
        return _run_one(ctx, arm, seed, valid, test, classes, backbone, device, progress=processes == 1)

    if processes == 1:
        for i, (arm, seed) in enumerate(todo):
            finish(arm, seed, one(i))
        return
    console.print(f"{ctx.budget_name}: {len(todo)} trainings, {processes} at a time, each in its own process with "
                  "one torch thread (evaluate.cpu_processes)")
    try:
        with contextlib.closing(fork_map(one, len(todo), processes)) as results, \
                progress_bar(f"evaluate {ctx.budget_name}", len(todo), unit="trainings") as advance:
            for i, record in results:
                finish(*todo[i], record)
                advance()
    except BrokenProcessPool as e:
        raise UserError(f"evaluate {ctx.budget_name}: a training process died (killed for memory?); the finished "
                        f"runs are kept in {ctx.folder / 'runs'}. Rerun to continue, with fewer at a time "
                        f"(--set evaluate.cpu_processes={max(1, processes // 2)}) if memory is short.") from e


def run_keys(ctx: StageContext, arms: list[Arm], valid: tuple, test: tuple,
             classes: list[str]) -> dict[tuple[str, int], str]:
    """The cache key of every (arm, seed) the stage trains; an ``ssl`` arm's names the weights of
    stage ``features``' encoder it starts from."""
    valid_digest, test_digest = _digest(*valid), _digest(*test)
    ssl_start = io.weights_hash(ctx.upstream("features") / ENCODER) if any(a.ssl for a in arms) else None
    keys = {}
    for arm in arms:
        if arm.same_as is not None:
            continue
        arm_digest = _digest(arm.tiles, arm.labels)
        for seed in ctx.cfg.evaluate.seeds_of(arm.name):
            keys[arm.name, seed] = record_key(ctx, arm_digest, seed, valid_digest, test_digest, classes,
                                              ssl_start if arm.ssl else "scratch")
    return keys


def run(ctx: StageContext) -> dict:
    """Train and test every (arm, seed) (shared out among processes) that is neither done nor in a
    cache; write runs/*.json, the cache entries and summary.json."""
    cfg, e = ctx.cfg, ctx.cfg.evaluate
    state = process_state(cfg.device)
    data = ctx.upstream("data")
    classes = classes_of(data)
    device = state.device if state.num_processes > 1 else inference_device(cfg.device)
    arms = build_arms(ctx, classes)
    by_name = {a.name: a for a in arms}
    valid = split_tiles(data, "valid", e.classifier.eval_max, cfg.seed)
    test = split_tiles(data, "test")
    backbone = None
    if any(a.ssl for a in arms):
        backbone = load_encoder(ctx.upstream("features") / ENCODER).backbone.state_dict()
    keys = run_keys(ctx, arms, valid, test, classes)
    dirs = cache_dirs(ctx)
    runs_dir = ctx.folder / "runs"
    todo, reuse = [], []
    for (name, seed), key in keys.items():
        if (runs_dir / f"{name}-seed{seed}.json").is_file():
            continue
        hit = _cached(dirs, key)
        if hit is None:
            todo.append((by_name[name], seed))
        else:
            reuse.append((by_name[name], seed, *hit))
    state.wait_for_everyone()  # every process lists what is left before any writes: the same list to share out
    if state.is_main_process:
        for arm, seed, record, path in reuse:
            io.write_json(runs_dir / f"{arm.name}-seed{seed}.json",
                          {**record, "arm": arm.name, "n_real": arm.n_real, "n_synthetic": arm.n_synthetic,
                           "reused_from": str(path)})
            console.print(f"{ctx.budget_name} {arm.name} seed {seed}: the same training is in {path}; reused "
                          f"(test accuracy {record['test']['accuracy']:.4f})")
        # runs finished before they were cached (or whose entry was deleted) go into the cache too
        for (name, seed), key in keys.items():
            out, entry = runs_dir / f"{name}-seed{seed}.json", dirs[0] / f"{key}.json"
            if out.is_file() and not entry.is_file():
                io.write_json(entry, {**io.read_json(out), "key": key})
    def finish(arm: Arm, seed: int, record: dict) -> None:
        record = {**record, "key": keys[arm.name, seed]}
        io.write_json(dirs[0] / f"{record['key']}.json", record)
        io.write_json(runs_dir / f"{arm.name}-seed{seed}.json", record)
        console.print(f"{ctx.budget_name} {arm.name} seed {seed}: test accuracy {record['test']['accuracy']:.4f}, "
                      f"balanced {record['test']['balanced_accuracy']:.4f} ({record['steps']} steps, "
                      f"{record['seconds']}s)")

    mine = todo[state.process_index::state.num_processes]
    _train_all(ctx, mine, cpu_processes(cfg, state.num_processes, len(mine)), valid, test, classes, backbone,
               device, finish)
    state.wait_for_everyone()
    if not state.is_main_process:
        return {}
    runs = []
    for arm in arms:
        for seed in e.seeds_of(arm.name):
            out = ctx.folder / "runs" / f"{arm.name}-seed{seed}.json"
            if not out.is_file():  # an arm that is its base arm, run for run: a copy of that record
                base = json.loads((ctx.folder / "runs" / f"{arm.same_as}-seed{seed}.json").read_text())
                io.write_json(out, {**base, "arm": arm.name, "n_synthetic": 0, "same_as": arm.same_as,
                                    "seconds": 0.0})
            runs.append(json.loads(out.read_text()))
    for arm in arms:
        if arm.same_as:
            console.print(f"[yellow]{ctx.budget_name} {arm.name}: the selection accepted no synthetic tiles, so this "
                          f"arm trains on exactly what '{arm.same_as}' trains on (same seeds); its runs are reused[/]")
    result = summarize(cfg, ctx.budget_name, arms, runs, len(test[1]))
    io.write_json(ctx.folder / "summary.json", result)
    return {"summary": "summary.json", "accuracy": {a: s["accuracy"]["mean"] for a, s in result["arms"].items()}}


def summarize(cfg: ExperimentConfig, budget_name: str, arms: list[Arm], runs: list[dict], n_test: int) -> dict:
    """Every arm's mean and 95% CI, paired gains vs real (and ssl+selected vs ssl), the ladder, each
    arm's label-equivalent and the headroom (real@all - real)."""
    e = cfg.evaluate
    names = [a.name for a in arms]
    rungs = [rung_name(m) for m in e.rungs()]
    accuracy = {a: [r["test"]["accuracy"] for r in runs if r["arm"] == a] for a in names}
    n_real = {a.name: a.n_real for a in arms}
    result = {"task": cfg.experiment, "label_budget": budget_name, "n_seeds": {a: len(accuracy[a]) for a in names},
              "arms": arm_summaries(runs, names), "paired_gain_vs_real": paired_gains(runs, names, "real"),
              "n_test": n_test, "n_real": n_real, "n_synthetic": {a.name: a.n_synthetic for a in arms},
              "steps": {a: next(r.get("steps") for r in runs if r["arm"] == a) for a in names},
              "valid_accuracy": {a: float(np.mean([r["valid"]["valid_accuracy"] for r in runs if r["arm"] == a]))
                                 for a in names},
              "machine": machine()}
    if "ssl" in names and "ssl+selected" in names:
        result["paired_gain_vs_ssl"] = paired_gains(runs, ["ssl+selected"], "ssl")
    if rungs:
        ladder = {a: (n_real[a], accuracy[a]) for a in ["real", *rungs]}
        result["ladder"] = {a: {"labels": n, "accuracy": result["arms"][a]["accuracy"]} for a, (n, _) in ladder.items()}
        others = {a: accuracy[a] for a in names if a not in ladder}
        result["label_equivalent"] = label_equivalents(others, ladder, n_real["real"])
        top = rungs[-1]
        result["headroom"] = {"rung": top, **result["paired_gain_vs_real"][top]}
    return result


def _upstream(cfg: ExperimentConfig) -> tuple[str, ...]:
    out = ("data", "labels")
    if cfg.evaluate.synthetic():
        out += ("synthesize", "select")
    if any(a.startswith("ssl") for a in cfg.evaluate.arms):
        out += ("features",)
    return out


STAGE = register(Stage("evaluate", "evaluate", ("evaluate", "seed"), _upstream, run, per_budget=True,
                       description="downstream classifier per arm and seed, test metrics with CIs", distributed=True))
