"""The stage registry and runner: which stages exist, in which order, which CLI command runs each,
what each reads; hash what a stage reads, skip it when done, resume it when not.

This is the one place that maps stages to CLI commands (``COMMANDS``); ``cli.py`` builds its
stage commands from it.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from histodiffusion.config import ExperimentConfig, budget_name, get_path
from histodiffusion.errors import UserError
from histodiffusion.progress import console
from histodiffusion.rundir import RunDir

PIPELINE = ("data", "labels", "autoencoder", "latents", "pretrain", "features", "finetune", "conditional", "synthesize",
            "select", "evaluate", "generation", "report")

# CLI command -> its help. Each stage names its command; a command runs its stages in pipeline order.
COMMANDS = {
    "data prepare": "Write the experiment's manifests (pool, labeled subsets, valid, test) and tile caches; print "
                    "the counts per split and class.",
    "train-autoencoder": "Train the KL autoencoder on the pool; store the latent scale in its config.",
    "pretrain": "Encode the pool once, then train the unconditional latent diffusion UNet (resumes).",
    "features": "Train the self-supervised (SimCLR) encoder on the pool: the feature space of generation quality "
                "and the backbone of the ssl arms.",
    "finetune": "Train the noise-aware latent classifier and adapt the UNet to each labeled subset.",
    "train-conditional": "Baseline: a class-conditional UNet trained on the labeled subset only, no pre-training.",
    "synthesize": "Classifier-guided tiles per class (ImageFolder of PNGs + manifest); shards under accelerate.",
    "select": "Keep synthetic tiles an auxiliary classifier confidently matches to their target class.",
    "evaluate": "Train the downstream classifier per arm and seed; test metrics with 95% CIs and paired gains.",
    "evaluate-generation": "Frechet distance, KID, precision/recall and near-copies of the synthetic tiles (in the "
                           "features stage's encoder), with real-vs-real floors.",
    "report": "Write report.md, a self-contained report.html and results.json for the run.",
}


@dataclass(frozen=True)
class StageContext:
    """What a stage function gets: config, run directory, its own folder and (maybe) a budget."""

    cfg: ExperimentConfig
    run_dir: RunDir
    folder: Path
    budget: int | float | None = None

    @property
    def budget_name(self) -> str | None:
        return None if self.budget is None else budget_name(self.budget)

    def upstream(self, stage: str) -> Path:
        """Folder of an upstream stage (the per-budget folder for per-budget stages)."""
        key = stage if not STAGES[stage].per_budget else f"{stage}/{self.budget_name}"
        return self.run_dir.stage_dir(key)


@dataclass(frozen=True)
class Stage:
    """A pipeline stage: its CLI command, which config sections it reads, which stages it needs, what it runs."""

    name: str
    command: str
    sections: tuple[str, ...]
    upstream: tuple[str, ...] | Callable[[ExperimentConfig], tuple[str, ...]]
    fn: Callable[[StageContext], dict]
    per_budget: bool = False
    description: str = ""
    distributed: bool = False
    """Every process runs ``fn`` (training and synthesis under accelerate); else the main one only."""
    exclude: tuple[str, ...] | Callable[[ExperimentConfig], tuple[str, ...]] = ()
    """Dotted config paths inside ``sections`` that do not change this stage's result (may depend
    on the config)."""
    rebuild: bool = False
    """A cheap summary of other stages (the report): redone, not refused, when its hash changes."""
    extendable: bool = False
    """A training stage: rerun with more ``steps`` and nothing else changed, it continues from its
    last checkpoint instead of being refused."""
    verify: Callable[[StageContext], None] | None = None
    """Run when a rerun finds the stage done: raises when its results no longer describe its
    inputs (the data stage: files changed under the data root)."""


STAGES: dict[str, Stage] = {}


def load_stages() -> dict[str, Stage]:
    """Import every stage module (each registers itself) once; returns the registry."""
    from histodiffusion.stages import (  # noqa: F401
        autoencoder,
        conditional,
        data,
        evaluate,
        features,
        finetune,
        generation,
        labels,
        latents,
        pretrain,
        report,
        select,
        synthesize,
    )

    return STAGES


def register(stage: Stage) -> Stage:
    """Add a stage to the registry (called by each stage module)."""
    if stage.name not in PIPELINE or stage.command not in COMMANDS:
        raise ValueError(f"stage {stage.name!r} / command {stage.command!r} is not in PIPELINE / COMMANDS")
    STAGES[stage.name] = stage
    return stage


def command_stages(command: str) -> tuple[str, ...]:
    """The stages a CLI command runs, in pipeline order."""
    return tuple(name for name in PIPELINE if load_stages()[name].command == command)


def upstream_of(stage: Stage, cfg: ExperimentConfig) -> tuple[str, ...]:
    """The stages ``stage`` reads, which may depend on the config (e.g. optional sources)."""
    return stage.upstream(cfg) if callable(stage.upstream) else stage.upstream


def active_stages(cfg: ExperimentConfig) -> list[str]:
    """The pipeline's stages for this config: those the report rests on. An evaluation of the real
    and ``ssl`` arms alone needs no diffusion model; the conditional baseline runs when a synthesis
    source uses it."""
    stages, needed, todo = load_stages(), {"report"}, ["report"]
    while todo:
        for up in upstream_of(stages[todo.pop()], cfg):
            if up not in needed:
                needed.add(up)
                todo.append(up)
    return [s for s in PIPELINE if s in needed]


def downstream_of(name: str, cfg: ExperimentConfig) -> list[str]:
    """The active stages whose upstream chain includes stage ``name``, in pipeline order."""
    stages, found = load_stages(), {name}
    for s in active_stages(cfg):  # pipeline order: a stage's upstream stages come before it
        if found & set(upstream_of(stages[s], cfg)):
            found.add(s)
    return [s for s in active_stages(cfg) if s in found and s != name]


def invalidate_downstream(name: str, cfg: ExperimentConfig, run_dir: RunDir) -> list[str]:
    """Mark every started stage downstream of ``name`` stale (redone when it next runs); returns their keys."""
    marked = []
    for s in downstream_of(name, cfg):
        marked += [key for key, _ in stage_keys(load_stages()[s], cfg) if run_dir.invalidate(key)]
    if marked:
        console.print(f"[yellow]{name} is redone, so these stages will be redone when they next run: "
                      f"{', '.join(marked)}[/]")
    return marked


def run_dir_lock(run_dir: RunDir, cfg: ExperimentConfig):
    """The run directory's lock for this process; under ``accelerate launch`` the main process
    holds it for the whole launch, the others take none."""
    from histodiffusion.devices import process_state

    return run_dir.lock() if process_state(cfg.device).is_main_process else contextlib.nullcontext()


def stage_keys(stage: Stage, cfg: ExperimentConfig) -> list[tuple[str, int | float | None]]:
    """(folder key, budget) pairs of a stage: one, or one per label budget."""
    if not stage.per_budget:
        return [(stage.name, None)]
    return [(f"{stage.name}/{budget_name(b)}", b) for b in cfg.data.target.budgets]


def require_started(name: str, cfg: ExperimentConfig, run_dir: RunDir) -> None:
    """Raise unless stage ``name`` was started (finished or not) in ``run_dir``: what ``--resume``
    asks, so that a mistyped run directory or experiment name fails instead of starting afresh."""
    keys = [key for key, _ in stage_keys(load_stages()[name], cfg)]
    if not any(run_dir.started(k) for k in keys):
        raise UserError(
            f"--resume: stage '{name}' was never started in {run_dir.root} (no STATE.json under "
            f"{run_dir.stage_dir(keys[0])}). Check --run-dir and the config's experiment name, or leave "
            "out --resume to start it; a rerun resumes by itself wherever there is something to resume."
        )


def training_steps(stage: Stage, cfg: ExperimentConfig) -> dict[str, int]:
    """Every ``steps`` setting in the stage's config sections, by dotted path (a finished training
    stage may be asked for more)."""
    found: dict[str, int] = {}

    def walk(node, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "steps" and isinstance(v, int):
                    found[f"{path}.{k}"] = v
                else:
                    walk(v, f"{path}.{k}")

    full = cfg.to_dict()
    for section in stage.sections:
        walk(get_path(full, section), section)
    return found


def stage_hash(stage: Stage, cfg: ExperimentConfig, run_dir: RunDir, budget: int | float | None,
               without_steps: bool = False) -> str:
    """Hash of the stage's config sections, its budget and its upstream stages' DONE hashes.

    ``without_steps`` leaves the step counts out: equal such hashes mean "the same training, maybe
    for longer".
    """
    exclude = stage.exclude(cfg) if callable(stage.exclude) else stage.exclude
    exclude = exclude + (tuple(training_steps(stage, cfg)) if without_steps else ())
    parts = [stage.name, cfg.section_hash(*stage.sections, exclude=exclude), str(budget)]
    for up in upstream_of(stage, cfg):
        spec = STAGES[up]
        if not spec.per_budget:
            keys = [up]
        elif budget is not None:
            keys = [f"{up}/{budget_name(budget)}"]
        else:  # a whole-run stage (the report) reads every budget of a per-budget stage
            keys = [f"{up}/{budget_name(b)}" for b in cfg.data.target.budgets]
        for key in keys:
            done = run_dir.done_hash(key)
            if done is None:
                raise UserError(
                    f"stage '{stage.name}' needs stage '{key}' to be finished in {run_dir.root} first: run "
                    f"`histodiffusion {spec.command} CONFIG` (or `histodiffusion run CONFIG`)"
                )
            parts.append(done)
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def run_stage(name: str, cfg: ExperimentConfig, run_dir: RunDir, force: bool = False) -> list[dict]:
    """Run one stage (every budget of a per-budget stage), skipping finished parts; ``force`` redoes
    it and marks every stage downstream of it stale.

    Holds the run directory's lock. Under ``accelerate launch`` only the main process does the
    bookkeeping and runs the single-process stages; the others wait for it.
    """
    with run_dir_lock(run_dir, cfg):
        return _run_stage(name, cfg, run_dir, force)


def _run_stage(name: str, cfg: ExperimentConfig, run_dir: RunDir, force: bool) -> list[dict]:
    from histodiffusion.devices import process_state

    state = process_state(cfg.device)
    stage = load_stages()[name]
    summaries, began, replaced = [], False, None
    for key, budget in stage_keys(stage, cfg):
        h = stage_hash(stage, cfg, run_dir, budget)
        ctx = StageContext(cfg, run_dir, run_dir.stage_dir(key), budget)
        if not force and run_dir.is_done(key, h):
            if stage.verify is not None:
                stage.verify(ctx)
            console.print(f"[dim]{key}: already done (config hash {h}); skipping. Use --force {name} to redo.[/]")
            summaries.append({"key": key, "skipped": True})
            continue
        steps = training_steps(stage, cfg) if stage.extendable else {}
        base = stage_hash(stage, cfg, run_dir, budget, without_steps=True) if stage.extendable else None
        extended_from = None if force else run_dir.extension(key, base, steps)
        if state.is_main_process:
            run_dir.begin(key, h, force=force or stage.rebuild, base_hash=base, steps=steps,
                          extend=extended_from is not None)
            if not began:  # the checks passed: the run directory now describes this config
                replaced = run_dir.write_config(cfg)
                if force:
                    invalidate_downstream(name, cfg, run_dir)
            began = True
            console.print(f"[bold cyan]{key}[/]: running in {run_dir.stage_dir(key)}")
            if extended_from:
                console.print(f"{key}: continuing from its last checkpoint with more steps ("
                              + ", ".join(f"{k} {extended_from[k]} -> {steps[k]}" for k in steps
                                          if steps[k] != extended_from[k]) + ")")
        state.wait_for_everyone()
        t0 = time.time()
        summary = {}
        try:
            if stage.distributed or state.is_main_process:
                with _tracked(cfg, run_dir, key, state.is_main_process):
                    summary = stage.fn(ctx) or {}
        except BaseException:
            # forgotten when it failed before writing anything; the first part of the stage run
            # here also hands back the config records it replaced
            if state.is_main_process and run_dir.abandon(key) and replaced is not None \
                    and all(s.get("skipped") for s in summaries):
                run_dir.restore_config(replaced)
            raise
        state.wait_for_everyone()
        summary["wall_seconds"] = round(time.time() - t0, 1)
        if extended_from:
            summary["extended_from"] = extended_from
        if state.is_main_process:
            run_dir.finish(key, h, summary)
        state.wait_for_everyone()
        summaries.append({"key": key, **summary})
    return summaries


def _tracked(cfg: ExperimentConfig, run_dir: RunDir, key: str, main: bool):
    """The stage's experiment-tracking session (``cfg.tracking``), on the main process only."""
    from histodiffusion import tracking

    backends = list(cfg.tracking) if main else []
    return tracking.session(backends, run_dir.root / "tracking", key.replace("/", "-"), cfg.experiment, cfg.to_dict())


def run_pipeline(cfg: ExperimentConfig, run_dir: RunDir, start: str | None = None, stop: str | None = None,
                 force: tuple[str, ...] = ()) -> None:
    """Run stages ``start``..``stop`` (inclusive) in order; ``force`` names stages to redo (each with
    every stage downstream of it)."""
    stages = active_stages(cfg)
    for name in (start, stop, *force):
        if name is not None and name not in stages:
            raise UserError(f"unknown or inactive stage {name!r}; the stages are: {', '.join(stages)}")
    first = stages.index(start) if start else 0
    last = stages.index(stop) if stop else len(stages) - 1
    if first > last:
        raise UserError(f"--from {start} comes after --to {stop}")
    with run_dir_lock(run_dir, cfg):
        for name in stages[first:last + 1]:
            run_stage(name, cfg, run_dir, force=name in force)
    console.print(f"[green]done: {', '.join(stages[first:last + 1])} in {run_dir.root}[/]")
