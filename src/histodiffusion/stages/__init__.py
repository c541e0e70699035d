"""Pipeline stages: one module per stage, each registering a :class:`Stage` with ``run(ctx)``."""

from histodiffusion.stages import autoencoder, data, finetune, pretrain, synthesize  # noqa: F401  (registering)
from histodiffusion.stages.base import STAGES, Stage, StageContext, run_stage

__all__ = ["STAGES", "Stage", "StageContext", "run_stage"]
