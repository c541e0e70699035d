"""Pipeline stages: one module per stage, each registering a :class:`Stage` with ``run(ctx)``."""

from histodiffusion.stages import (  # noqa: F401  (importing registers the stages)
    autoencoder,
    data,
    evaluate,
    finetune,
    generation,
    pretrain,
    report,
    select,
    synthesize,
)
from histodiffusion.stages.base import STAGES, Stage, StageContext, run_stage
from histodiffusion.stages.pipeline import PIPELINE, run_pipeline

__all__ = ["PIPELINE", "STAGES", "Stage", "StageContext", "run_pipeline", "run_stage"]
