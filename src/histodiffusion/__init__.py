"""histodiffusion: synthetic augmentation for computational pathology with latent diffusion.

From Python::

    from histodiffusion import load_config, run_pipeline, run_stage, RunDir
    cfg = load_config("configs/smoke.yaml")
    run_pipeline(cfg, RunDir("runs/smoke"))
"""

__version__ = "0.1.0"

__all__ = ["RunDir", "load_config", "run_pipeline", "run_stage"]


def __getattr__(name: str):
    # The public API, imported on first use: ``import histodiffusion`` stays light.
    if name == "load_config":
        from histodiffusion.config import load_config

        return load_config
    if name == "RunDir":
        from histodiffusion.rundir import RunDir

        return RunDir
    if name in ("run_pipeline", "run_stage"):
        from histodiffusion import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'histodiffusion' has no attribute {name!r}")
