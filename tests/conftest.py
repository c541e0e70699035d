"""Shared fixtures: the real shared data (skipped with a reason when absent), configs, images."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def shared_data_root() -> Path | None:
    """The real H&E data: HISTODIFFUSION_DATA, else ../shared/data beside the checkout."""
    for candidate in (os.environ.get("HISTODIFFUSION_DATA"), REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "manifest.csv").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = shared_data_root()
    if root is None:
        pytest.skip("real data absent: set HISTODIFFUSION_DATA or place ../shared/data beside the repo")
    return root


@pytest.fixture
def smoke_overrides(data_root: Path) -> list[str]:
    return [f"data.root={data_root}"]


@pytest.fixture(scope="session")
def smoke_cfg(data_root: Path):
    """The smoke config on the real data (tiny preset)."""
    from histodiffusion.config import load_config

    return load_config(CONFIGS / "smoke.yaml", [f"data.root={data_root}"])


@pytest.fixture(scope="session")
def smoke_run(smoke_cfg, tmp_path_factory):
    """A run directory with data, autoencoder, latents and pretrain done on the smoke config."""
    from histodiffusion.rundir import RunDir
    from histodiffusion.stages import run_stage

    rd = RunDir(tmp_path_factory.mktemp("smoke") / "run")
    for stage in ("data", "labels", "autoencoder", "latents", "pretrain"):
        run_stage(stage, smoke_cfg, rd)
    return rd
