"""Shared fixtures: the real shared data (skipped with a reason when absent), the smoke config and a
run directory trained on it, and tiny untrained models. Plain helpers are in ``tests/helpers.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import CONFIGS, shared_data_root


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = shared_data_root()
    if root is None:
        pytest.skip("real data absent: set HISTODIFFUSION_DATA or place ../shared/data beside the repo")
    return root


@pytest.fixture(scope="session")
def smoke_cfg(data_root: Path):
    """The smoke config on the real data (tiny preset)."""
    from histodiffusion.config import load_config

    return load_config(CONFIGS / "smoke.yaml", [f"data.root={data_root}"])


@pytest.fixture(scope="session")
def smoke_run(smoke_cfg, tmp_path_factory):
    """A run directory with data, labels, autoencoder, latents and pretrain done on the smoke config."""
    from histodiffusion.rundir import RunDir
    from histodiffusion.stages import run_stage

    rd = RunDir(tmp_path_factory.mktemp("smoke") / "run")
    for stage in ("data", "labels", "autoencoder", "latents", "pretrain"):
        run_stage(stage, smoke_cfg, rd)
    return rd


@pytest.fixture(scope="session")
def tiny_unet():
    """An untrained UNet over (3, 8, 8) latents at the tiny preset's layout (seed 0), in eval mode."""
    import torch

    from histodiffusion.config import UNetArch
    from histodiffusion.models.unet import build_unet

    torch.manual_seed(0)
    arch = UNetArch(channels=[16, 32], layers_per_block=1, attention_resolutions=[4], attention_head_dim=8,
                    norm_num_groups=8)
    return build_unet(8, 3, **arch.model_dump()).eval()


@pytest.fixture(scope="session")
def train_scheduler():
    """The default training scheduler (sqrt-linear betas, v-prediction), as the configs build it."""
    from histodiffusion.config import DiffusionCfg
    from histodiffusion.diffusion.schedules import training_scheduler

    return training_scheduler(**DiffusionCfg().model_dump(exclude={"min_snr_gamma"}))


@pytest.fixture(scope="session")
def smoke_pool(smoke_run, smoke_cfg):
    """The smoke run's pool as the autoencoder stage samples it: tile cache, weights from pool.csv,
    the seeded held-out part."""
    import numpy as np

    from histodiffusion.data.prepared import pool_tiles, split_records
    from histodiffusion.training.autoencoder import PoolSampler

    data = smoke_run.root / "data"
    weights = np.array([r.weight for r in split_records(data, "pool")], dtype=np.float64)
    return PoolSampler(pool_tiles(data), weights, smoke_cfg.autoencoder.holdout_fraction, smoke_cfg.seed)
