"""Schedules, losses and sampling: golden values, per-sample seeds, any step count, v -> eps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histodiffusion.config import DiffusionCfg, SamplingCfg, UNetArch
from histodiffusion.data.augment import dihedral, random_dihedral
from histodiffusion.diffusion.losses import diffusion_loss
from histodiffusion.diffusion.sampling import eps_from_v, initial_noise, sample_loop, unet_eps_fn
from histodiffusion.diffusion.schedules import sampling_scheduler, training_scheduler
from histodiffusion.models.unet import build_unet
from histodiffusion.training.loop import sample_generator


def test_sqrt_linear_schedule_matches_ldm() -> None:
    """LDM: betas = linspace(sqrt(0.0015), sqrt(0.0155), 1000) ** 2."""
    s = training_scheduler(DiffusionCfg())
    ref = torch.linspace(0.0015**0.5, 0.0155**0.5, 1000, dtype=torch.float64) ** 2
    assert torch.allclose(s.betas.double(), ref, atol=1e-7)
    assert float(s.alphas_cumprod[-1]) == pytest.approx(float(torch.cumprod(1 - ref, 0)[-1]), rel=1e-4)


def test_linear_and_cosine_schedules() -> None:
    lin = training_scheduler(DiffusionCfg(schedule="linear"))
    assert float(lin.betas[0]) == pytest.approx(0.0015) and float(lin.betas[-1]) == pytest.approx(0.0155)
    cos = training_scheduler(DiffusionCfg(schedule="cosine"))
    a = cos.alphas_cumprod
    assert (a[1:] <= a[:-1]).all() and float(a[0]) > 0.999 and float(a[-1]) < 1e-3


def test_eps_from_v_inverts_velocity() -> None:
    s = training_scheduler(DiffusionCfg())
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    x_t = s.add_noise(x0, eps, t)
    v = s.get_velocity(x0, eps, t)
    assert torch.allclose(eps_from_v(v, x_t, s.alphas_cumprod[t]), eps, atol=1e-5)


class _Const(torch.nn.Module):
    """A 'UNet' predicting a fixed tensor, to check the loss arithmetic exactly."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out

    def forward(self, x, t, class_labels=None):
        return type("O", (), {"sample": self.out})()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weighting_golden(prediction_type: str) -> None:
    s = training_scheduler(DiffusionCfg(prediction_type=prediction_type))
    x0, noise = torch.zeros(2, 1, 1, 1), torch.zeros(2, 1, 1, 1)  # so the eps and v targets are both 0
    t = torch.tensor([5, 900])
    pred = torch.ones(2, 1, 1, 1)  # squared error 1 per sample
    a = s.alphas_cumprod[t]
    snr = a / (1 - a)
    weight = snr.clamp(max=5.0) / (snr if prediction_type == "epsilon" else snr + 1)
    got = diffusion_loss(_Const(pred), s, x0, noise, t, min_snr_gamma=5.0)
    assert float(got) == pytest.approx(float(weight.mean()), rel=1e-5)
    assert float(diffusion_loss(_Const(pred), s, x0, noise, t)) == pytest.approx(1.0)


def test_dihedral_group() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)
    outs = {tuple(dihedral(x, k).flatten().tolist()) for k in range(8)}
    assert len(outs) == 8
    y = random_dihedral(x.repeat(5, 1, 1, 1), torch.Generator().manual_seed(0))
    assert all(tuple(y[i].flatten().tolist()) in outs for i in range(5))


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return build_unet(UNetArch(channels=[16, 32], layers_per_block=1, attention_resolutions=[4],
                               attention_head_dim=8, norm_num_groups=8), 8, 3).eval()


def _sample(unet, sampler: str, steps: int, indices: list[int], eta: float = 0.0) -> torch.Tensor:
    s = training_scheduler(DiffusionCfg())
    gens = [sample_generator(0, k) for k in indices]
    x_T = initial_noise((3, 8, 8), gens)
    eps_fn = unet_eps_fn(unet, "epsilon", s.alphas_cumprod)
    with torch.no_grad():
        return sample_loop(eps_fn, sampling_scheduler(sampler, s), x_T, steps, gens, eta)


@pytest.mark.parametrize("sampler,steps,eta", [("ddim", 10, 0.0), ("ddim", 25, 0.0), ("ddim", 50, 0.0),
                                                ("ddim", 10, 1.0), ("dpmpp", 20, 0.0), ("ddpm", 10, 0.0)])
def test_samplers_any_step_count(tiny_unet, sampler: str, steps: int, eta: float) -> None:
    x = _sample(tiny_unet, sampler, steps, [0, 1], eta)
    assert x.shape == (2, 3, 8, 8) and torch.isfinite(x).all()


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 0.7), ("ddpm", 0.0), ("dpmpp", 0.0)])
def test_tile_k_is_the_same_whatever_the_batch(tiny_unet, sampler: str, eta: float) -> None:
    together = _sample(tiny_unet, sampler, 6, [0, 1, 2, 3], eta)
    alone = _sample(tiny_unet, sampler, 6, [2], eta)
    pair = _sample(tiny_unet, sampler, 6, [3, 1], eta)
    # Equal up to float reassociation across batch shapes (an untrained UNet gives large values).
    close = lambda a, b: torch.allclose(a, b, rtol=1e-4, atol=1e-4)  # noqa: E731
    assert close(together[2], alone[0])
    assert close(together[3], pair[0]) and close(together[1], pair[1])
    assert not torch.allclose(together[0], together[1])


def test_generate_writes_identical_tiles_for_any_batch_size(tiny_unet) -> None:
    from histodiffusion.config import AutoencoderArch
    from histodiffusion.diffusion.generate import generate
    from histodiffusion.models.autoencoder import build_autoencoder

    torch.manual_seed(0)
    vae = build_autoencoder(AutoencoderArch(channels=[8, 8, 16], norm_num_groups=4), 32).eval()
    s = training_scheduler(DiffusionCfg())

    def run(batch_size: int) -> np.ndarray:
        cfg = SamplingCfg(num_steps=4, batch_size=batch_size)
        make_eps = lambda _b: unet_eps_fn(tiny_unet, "epsilon", s.alphas_cumprod)  # noqa: E731
        with torch.no_grad():
            return np.concatenate([t for _, t, _ in generate(make_eps, vae, s, (3, 8, 8), range(5), 0, cfg)])

    a, b = run(5), run(2)
    assert a.shape == (5, 32, 32, 3) and a.dtype == np.uint8
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # identical up to float rounding
