"""Noise schedules (diffusion/schedules.py): golden betas of every schedule, built as the configs build them."""

from __future__ import annotations

import pytest
import torch

from histodiffusion.config import DiffusionCfg
from histodiffusion.diffusion.schedules import training_scheduler


def _from_config(**diffusion) -> object:
    return training_scheduler(**DiffusionCfg(**diffusion).model_dump(exclude={"min_snr_gamma"}))


def test_sqrt_linear_schedule_matches_ldm() -> None:
    """LDM: betas = linspace(sqrt(0.0015), sqrt(0.0155), 1000) ** 2."""
    s = _from_config()
    ref = torch.linspace(0.0015**0.5, 0.0155**0.5, 1000, dtype=torch.float64) ** 2
    assert torch.allclose(s.betas.double(), ref, atol=1e-7)
    assert float(s.alphas_cumprod[-1]) == pytest.approx(float(torch.cumprod(1 - ref, 0)[-1]), rel=1e-4)


def test_linear_and_cosine_schedules() -> None:
    lin = _from_config(schedule="linear")
    assert float(lin.betas[0]) == pytest.approx(0.0015) and float(lin.betas[-1]) == pytest.approx(0.0155)
    cos = _from_config(schedule="cosine")
    a = cos.alphas_cumprod
    assert (a[1:] <= a[:-1]).all() and float(a[0]) > 0.999 and float(a[-1]) < 1e-3


def test_defaults_are_the_config_defaults() -> None:
    """training_scheduler() with no arguments is the scheduler of the default diffusion section."""
    assert dict(training_scheduler().config) == dict(_from_config().config)
