"""Sampling (diffusion/sampling.py): v -> eps, every sampler at any step count, per-sample seeds
(tile k is the same whatever the batch), and batched tiles decoded by the autoencoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from histodiffusion.config import AutoencoderArch, SamplingCfg
from histodiffusion.diffusion.sampling import (
    eps_from_v,
    initial_noise,
    sample_batches,
    sample_loop,
    unet_eps_fn,
    write_samples,
)
from histodiffusion.diffusion.schedules import sampling_scheduler
from histodiffusion.rundir import RunDir
from histodiffusion.seeding import sample_generator


def test_eps_from_v_inverts_velocity(train_scheduler) -> None:
    s = train_scheduler
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    x_t = s.add_noise(x0, eps, t)
    v = s.get_velocity(x0, eps, t)
    assert torch.allclose(eps_from_v(v, x_t, s.alphas_cumprod[t]), eps, atol=1e-5)


def _sample(unet, s, sampler: str, steps: int, indices: list[int], eta: float = 0.0) -> torch.Tensor:
    gens = [sample_generator(0, k) for k in indices]
    x_T = initial_noise((3, 8, 8), gens)
    eps_fn = unet_eps_fn(unet, "epsilon", s.alphas_cumprod)
    with torch.no_grad():
        return sample_loop(eps_fn, sampling_scheduler(sampler, s), x_T, steps, gens, eta)


@pytest.mark.parametrize("sampler,steps,eta", [("ddim", 10, 0.0), ("ddim", 25, 0.0), ("ddim", 50, 0.0),
                                                ("ddim", 10, 1.0), ("dpmpp", 20, 0.0), ("ddpm", 10, 0.0)])
def test_samplers_any_step_count(tiny_unet, train_scheduler, sampler: str, steps: int, eta: float) -> None:
    x = _sample(tiny_unet, train_scheduler, sampler, steps, [0, 1], eta)
    assert x.shape == (2, 3, 8, 8) and torch.isfinite(x).all()


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 0.7), ("ddpm", 0.0), ("dpmpp", 0.0)])
def test_tile_k_is_the_same_whatever_the_batch(tiny_unet, train_scheduler, sampler: str, eta: float) -> None:
    together = _sample(tiny_unet, train_scheduler, sampler, 6, [0, 1, 2, 3], eta)
    alone = _sample(tiny_unet, train_scheduler, sampler, 6, [2], eta)
    pair = _sample(tiny_unet, train_scheduler, sampler, 6, [3, 1], eta)
    # Equal up to float reassociation across batch shapes (an untrained UNet gives large values).
    close = lambda a, b: torch.allclose(a, b, rtol=1e-4, atol=1e-4)  # noqa: E731
    assert close(together[2], alone[0])
    assert close(together[3], pair[0]) and close(together[1], pair[1])
    assert not torch.allclose(together[0], together[1])


def test_sample_batches_gives_identical_tiles_for_any_batch_size(tiny_unet, train_scheduler) -> None:
    from histodiffusion.models.autoencoder import build_autoencoder

    torch.manual_seed(0)
    vae = build_autoencoder(32, **AutoencoderArch(channels=[8, 8, 16], norm_num_groups=4).model_dump()).eval()
    s = train_scheduler

    def run(batch_size: int) -> np.ndarray:
        sampling = SamplingCfg(num_steps=4, batch_size=batch_size).model_dump()
        make_eps = lambda _b: unet_eps_fn(tiny_unet, "epsilon", s.alphas_cumprod)  # noqa: E731
        with torch.no_grad():
            return np.concatenate([t for _, t, _ in sample_batches(make_eps, vae, s, (3, 8, 8), range(5), 0,
                                                                   **sampling)])

    a, b = run(5), run(2)
    assert a.shape == (5, 32, 32, 3) and a.dtype == np.uint8
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # identical up to float rounding


def test_written_samples_do_not_depend_on_batch_size(smoke_run: RunDir, smoke_cfg, tmp_path: Path) -> None:
    """write_samples (the `sample` command): the same tile per seed at any batch size; resumable."""
    from histodiffusion.models.autoencoder import load_vae
    from histodiffusion.models.unet import load_unet

    unet, noise_scheduler = load_unet(smoke_run.root / "pretrain")
    vae = load_vae(smoke_run.root / "autoencoder")

    def write(out: Path, batch_size: int) -> dict:
        sampling = {**smoke_cfg.sampling.model_dump(), "batch_size": batch_size}
        return write_samples(unet, vae, noise_scheduler, out, 5, smoke_cfg.seed, sampling)

    a, b = tmp_path / "a", tmp_path / "b"
    write(a, 5), write(b, 2)
    for k in range(5):
        ta, tb = (np.asarray(Image.open(d / f"{k:06d}.png"), dtype=int) for d in (a, b))
        # the same noise per tile; batched kernels may round differently by one grey level on some CPUs
        assert np.abs(ta - tb).max() <= 1 and np.mean(ta != tb) < 0.05
    assert (a / "grid.png").is_file() and json.loads((a / "sampling.json").read_text())["num"] == 5
    assert write(a, 5)["new"] == 0  # a rerun keeps the tiles already written


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp"])
def test_bf16_sampling_stays_within_a_few_grey_levels_of_fp32(smoke_run: RunDir, smoke_cfg, sampler: str) -> None:
    """The fast path (bf16 autocast of the UNet and the decoder) gives, for the same seeds, tiles close
    to the fp32 path: mean absolute difference under 3 grey levels (of 255), 99th percentile under 16."""
    from histodiffusion.diffusion.sampling import latent_shape, sample_batches
    from histodiffusion.models.autoencoder import load_vae
    from histodiffusion.models.unet import load_unet

    unet, sched = load_unet(smoke_run.root / "pretrain")
    vae = load_vae(smoke_run.root / "autoencoder")
    eps = unet_eps_fn(unet, sched.config.prediction_type, sched.alphas_cumprod)
    tiles = {precision: np.concatenate([t for _, t, _ in sample_batches(
        lambda _b: eps, vae, sched, latent_shape(unet), range(16), 0, sampler=sampler, num_steps=10,
        batch_size=16, precision=precision)]).astype(int) for precision in ("fp32", "bf16")}
    diff = np.abs(tiles["fp32"] - tiles["bf16"])
    assert diff.mean() < 3 and np.percentile(diff, 99) < 16, (diff.mean(), np.percentile(diff, 99))
