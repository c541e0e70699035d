"""Pipeline stages: one module per stage, named as ``histodiffusion run`` names it. Each reads its
upstream folders, calls the library and writes its own folder; it registers a :class:`Stage`
with the pipeline (``histodiffusion/pipeline.py``), which orders them, maps them to CLI commands and runs them.
The stage modules are imported on first use, so the command line starts without torch."""

from histodiffusion.pipeline import (
    COMMANDS,
    PIPELINE,
    STAGES,
    Stage,
    StageContext,
    command_stages,
    require_started,
    run_pipeline,
    run_stage,
)

__all__ = ["COMMANDS", "PIPELINE", "STAGES", "Stage", "StageContext", "command_stages", "require_started",
           "run_pipeline", "run_stage"]
