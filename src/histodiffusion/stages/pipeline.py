"""``histodiffusion run``: every stage in order, skipping finished ones and resuming interrupted ones."""

from __future__ import annotations

from histodiffusion.config import ExperimentConfig
from histodiffusion.errors import UserError
from histodiffusion.progress import console
from histodiffusion.rundir import RunDir
from histodiffusion.stages.base import run_stage

PIPELINE = ("data", "labels", "autoencoder", "latents", "pretrain", "finetune", "conditional", "synthesize", "select",
            "evaluate", "features", "generation", "report")


def active_stages(cfg: ExperimentConfig) -> list[str]:
    """The pipeline's stages for this config (the conditional baseline only when enabled)."""
    return [s for s in PIPELINE if s != "conditional" or cfg.conditional.enabled]


def run_pipeline(cfg: ExperimentConfig, run_dir: RunDir, start: str | None = None, stop: str | None = None,
                 force: tuple[str, ...] = ()) -> None:
    """Run stages ``start``..``stop`` (inclusive) in order; ``force`` names stages to redo."""
    stages = active_stages(cfg)
    for name in (start, stop, *force):
        if name is not None and name not in stages:
            raise UserError(f"unknown or inactive stage {name!r}; the stages are: {', '.join(stages)}")
    first = stages.index(start) if start else 0
    last = stages.index(stop) if stop else len(stages) - 1
    if first > last:
        raise UserError(f"--from {start} comes after --to {stop}")
    for name in stages[first:last + 1]:
        run_stage(name, cfg, run_dir, force=name in force)
    console.print(f"[green]done: {', '.join(stages[first:last + 1])} in {run_dir.root}[/]")
