"""Experiment tracking through accelerate's trackers: TensorBoard (the ``tracking`` extra), Weights &
Biases and MLflow (where installed).

Choose them with ``tracking: [tensorboard]`` in a config or ``--track tensorboard`` on the command
line. While a stage runs, the trainers log what they append to ``metrics.jsonl`` (loss, lr,
images/s, ...) and their sample grids; one tracker run per stage (``pretrain``,
``finetune-1pct``, ...), TensorBoard's under ``RUN_DIR/tracking/``. With no tracker chosen
nothing is imported and nothing changes.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from histodiffusion.errors import UserError

BACKENDS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # name -> module it needs
_active: list = []  # the trackers of the stage running now, started on its first log
_pending: list = []  # (backends, folder, run_name, project, config) of the stage running now


def _tracker(name: str, run_name: str, folder: Path, project: str):
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    if name == "tensorboard":
        return TensorBoardTracker(run_name, folder)
    if name == "wandb":
        return WandBTracker(project, name=run_name)
    return MLflowTracker(project, logging_dir=str(folder), run_name=run_name)


@contextlib.contextmanager
def session(backends: list[str], folder: Path, run_name: str, project: str, config: dict) -> Iterator[None]:
    """Track one stage with ``backends`` while the block runs: the main process's trainers log to it.
    The trackers start on the first thing logged, so a stage that trains nothing leaves no run."""
    for name in backends:
        if importlib.util.find_spec(BACKENDS[name]) is None:
            extra = " (pip install 'histodiffusion[tracking]')" if name == "tensorboard" else f" (pip install {name})"
            raise UserError(f"tracking: {name} is not installed{extra}; install it or drop it from 'tracking'")
    _pending[:] = [(backends, folder, run_name, project, config)] if backends else []
    try:
        yield
    finally:
        _pending.clear()
        for t in _active:
            t.finish()
        _active.clear()


def _trackers() -> list:
    if _pending and not _active:
        backends, folder, run_name, project, config = _pending[0]
        for name in backends:
            t = _tracker(name, run_name, folder, project)
            t.start()
            with contextlib.suppress(Exception):  # a backend that cannot store a nested config still logs
                t.store_init_configuration(_flat(config))
            _active.append(t)
    return _active


def log(values: dict[str, float], step: int) -> None:
    """Log scalars (a metrics.jsonl record) to every tracker of the running stage."""
    scalars = {k: float(v) for k, v in values.items() if k not in ("step", "time") and isinstance(v, int | float)}
    for t in _trackers():
        t.log(scalars, step=step)


def log_image(name: str, image: np.ndarray, step: int) -> None:
    """Log an (H, W, 3) uint8 image (a sample grid) to every tracker of the running stage that takes images."""
    for t in _trackers():
        if t.name == "tensorboard":
            t.log_images({name: image[None]}, step=step, dataformats="NHWC")
        elif hasattr(t, "log_images"):
            with contextlib.suppress(NotImplementedError):
                t.log_images({name: [image]}, step=step)


def _flat(tree: dict, prefix: str = "") -> dict:
    """A nested config as flat ``a.b.c`` keys with scalar values (what trackers store as hyperparameters)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, int | float | str | bool) else str(v)
    return out
