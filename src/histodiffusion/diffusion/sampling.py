"""Diffusion sampling: model functions, the sampling loop (k-diffusion style: samplers take an eps
function) and batched sampling of tiles with per-sample seeds, decoded by the autoencoder.

An ``EpsFn`` maps (x_t (N, C, h, w), t (N,) long) to the predicted noise eps (N, C, h, w).
Guidance is a wrapper that turns one EpsFn into another (see ``guidance.py``), so the loop never
knows a classifier exists.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from histodiffusion import io
from histodiffusion.data.images import read_rgb, save_png, tensor_to_tiles
from histodiffusion.devices import autocast_dtype
from histodiffusion.diffusion.schedules import sampling_scheduler
from histodiffusion.models.autoencoder import decode_latents
from histodiffusion.progress import progress_bar
from histodiffusion.seeding import sample_generator
from histodiffusion.viz import grid, save_image

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def eps_from_v(v: torch.Tensor, x_t: torch.Tensor, alphas_cumprod_t: torch.Tensor) -> torch.Tensor:
    """eps = sqrt(a_t) v + sqrt(1 - a_t) x_t  (Salimans & Ho 2022), a_t = alphas_cumprod[t]."""
    a = alphas_cumprod_t.view(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype)
    return a.sqrt() * v + (1 - a).sqrt() * x_t


def unet_eps_fn(unet: torch.nn.Module, prediction_type: str, alphas_cumprod: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> EpsFn:
    """Wrap a diffusers UNet as an EpsFn (converting v-predictions to epsilon)."""
    alphas_cumprod = alphas_cumprod.to(next(unet.parameters()).device)

    def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = unet(x_t, t, class_labels=class_labels).sample.to(x_t.dtype)
        if prediction_type == "v_prediction":
            return eps_from_v(out, x_t, alphas_cumprod[t])
        return out

    return eps_fn


def initial_noise(shape: Sequence[int], generators: Sequence[torch.Generator],
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """x_T for a batch: one draw per sample from its own generator (batch-size independent)."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators]).to(device)


@torch.no_grad()  # guidance turns gradients on for its own classifier call only
def sample_loop(eps_fn: EpsFn, scheduler: SchedulerMixin, x_T: torch.Tensor, num_steps: int,
                generators: Sequence[torch.Generator] | None = None, eta: float = 0.0,
                autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Run ``scheduler`` from x_T for ``num_steps`` steps; returns x_0 (latents).

    ``generators`` (one per sample) drive the noise that stochastic samplers (DDPM, DDIM with
    eta > 0) add at each step, so a sample does not depend on its batch neighbours.
    """
    scheduler.set_timesteps(num_steps, device=x_T.device)
    x = x_T * scheduler.init_noise_sigma
    kwargs: dict = {"eta": eta} if isinstance(scheduler, DDIMScheduler) else {}
    ddpm = isinstance(scheduler, DDPMScheduler)
    stochastic = ddpm or (isinstance(scheduler, DDIMScheduler) and eta > 0)
    for t in scheduler.timesteps:
        t_batch = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        x_in = scheduler.scale_model_input(x, t)
        with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            eps = eps_fn(x_in, t_batch)
        step_kwargs = dict(kwargs)
        if stochastic and generators is not None:
            if ddpm:  # DDPMScheduler draws its own noise: one generator per sample
                step_kwargs["generator"] = list(generators)
            else:
                step_kwargs["variance_noise"] = torch.stack(
                    [torch.randn(tuple(x.shape[1:]), generator=g) for g in generators]).to(x.device, x.dtype)
        x = scheduler.step(eps.float(), t, x, **step_kwargs).prev_sample
    return x


def sample_batches(make_eps: Callable[[np.ndarray], EpsFn], vae: AutoencoderKL, train_scheduler: SchedulerMixin,
                   latent_shape: Sequence[int], indices: Sequence[int], seed: int, *, sampler: str = "ddim",
                   num_steps: int = 50, eta: float = 0.0, batch_size: int = 64, precision: str = "fp32",
                   device: torch.device | str = "cpu") -> Iterator[tuple[np.ndarray, np.ndarray, torch.Tensor]]:
    """Yield (indices, tiles (B, H, W, 3) uint8, latents) batch by batch: sample, then decode.

    Sample k starts from the noise of ``sample_generator(seed, k)`` and draws its per-step noise
    from the same generator, so tile k is the same whatever the batch size, order or process (up to
    the floating-point rounding of batched kernels: at most one grey level). ``make_eps(batch_indices)``
    returns the eps function for that batch (guidance uses it to set the target classes).
    ``sampler``, ``num_steps``, ``eta``: see :func:`sampling_scheduler` and :func:`sample_loop`;
    ``precision``: 'fp32' or 'bf16' autocast of the UNet and the decoder.
    """
    dtype = autocast_dtype(precision)
    indices = np.asarray(indices)
    for start in range(0, len(indices), batch_size):
        batch = indices[start:start + batch_size]
        gens = [sample_generator(seed, int(k)) for k in batch]
        x_T = initial_noise(latent_shape, gens, device)
        scheduler = sampling_scheduler(sampler, train_scheduler)
        z_0 = sample_loop(make_eps(batch), scheduler, x_T, num_steps, gens, eta, dtype)
        with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            images = decode_latents(vae, z_0.to(vae.dtype))
        yield batch, tensor_to_tiles(images.float()), z_0


def latent_shape(unet: torch.nn.Module) -> tuple[int, int, int]:
    """(C, h, w) of the latents a diffusers UNet2DModel denoises."""
    return (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)


def preview_tiles(unet: torch.nn.Module, vae: AutoencoderKL, train_scheduler: SchedulerMixin, n: int, seed: int,
                  sampling: dict, device: torch.device | str = "cpu",
                  class_labels: torch.Tensor | None = None) -> np.ndarray:
    """Tiles from fixed seeds 0..n-1 (progress grids of training): ``sampling`` holds the keyword
    arguments of :func:`sample_batches`; ``class_labels`` (n,) for a class-conditional UNet."""
    unet.eval()

    def make_eps(batch: np.ndarray) -> EpsFn:
        y = None if class_labels is None else class_labels[torch.as_tensor(batch)].to(device)
        return unet_eps_fn(unet, train_scheduler.config.prediction_type, train_scheduler.alphas_cumprod, y)

    with torch.no_grad():
        parts = [t for _, t, _ in sample_batches(make_eps, vae, train_scheduler, latent_shape(unet), np.arange(n),
                                                 seed, **{**sampling, "batch_size": n}, device=device)]
    return np.concatenate(parts)


def write_samples(unet: torch.nn.Module, vae: AutoencoderKL, train_scheduler: SchedulerMixin, out: Path, num: int,
                  seed: int, sampling: dict, device: torch.device | str = "cpu", extra: dict | None = None) -> dict:
    """Unconditional tiles ``out/000000.png``... for seeds 0..num-1 (existing ones are kept:
    resumable), a grid of the first 64, and ``sampling.json`` (the settings, timing and ``extra``,
    e.g. which model made them); returns what ``sampling.json`` holds."""
    out = Path(out)
    todo = [k for k in range(num) if not (out / f"{k:06d}.png").is_file()]
    eps = unet_eps_fn(unet, train_scheduler.config.prediction_type, train_scheduler.alphas_cumprod)
    t0 = time.time()
    with torch.no_grad(), progress_bar("sampling", total=len(todo), unit="tiles") as advance:
        for batch, tiles, _ in sample_batches(lambda _b: eps, vae, train_scheduler, latent_shape(unet), todo, seed,
                                              **sampling, device=device):
            for k, tile in zip(batch, tiles, strict=True):
                save_png(out / f"{int(k):06d}.png", tile)
            advance(len(batch))
    seconds = time.time() - t0
    tiles = np.stack([read_rgb(out / f"{k:06d}.png") for k in range(min(num, 64))])
    save_image(grid(tiles), out / "grid.png", scale=2)
    record = {"num": num, "new": len(todo), "seconds": round(seconds, 2), "seed": seed, **sampling, **(extra or {})}
    io.write_json(out / "sampling.json", record)
    return record
