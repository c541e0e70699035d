"""Pipeline stages: one module per stage, each registering a :class:`Stage` with ``run(ctx)``."""

from histodiffusion.stages import data  # noqa: F401  (registers the stage)
from histodiffusion.stages.base import STAGES, Stage, StageContext, run_stage

__all__ = ["STAGES", "Stage", "StageContext", "run_stage"]
