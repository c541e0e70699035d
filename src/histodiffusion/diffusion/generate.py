"""Batched generation: per-sample seeds, any sampler, decoding by the autoencoder."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from histodiffusion.config import SamplingCfg
from histodiffusion.diffusion.sampling import EpsFn, initial_noise, sample_loop
from histodiffusion.diffusion.schedules import sampling_scheduler
from histodiffusion.models.autoencoder import decode_latents, tensor_to_tiles
from histodiffusion.training.loop import sample_generator

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}


def generate(make_eps: Callable[[np.ndarray], EpsFn], vae: AutoencoderKL, train_scheduler: SchedulerMixin,
             latent_shape: Sequence[int], indices: Sequence[int], seed: int, sampling: SamplingCfg,
             device: torch.device | str = "cpu",
             on_batch: Callable[[int], None] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, torch.Tensor]]:
    """Yield (indices, tiles (B, H, W, 3) uint8, latents) batch by batch.

    Sample k starts from the noise of ``sample_generator(seed, k)`` and draws its per-step noise
    from the same generator, so tile k is the same whatever the batch size, order or process (up to
    the floating-point rounding of batched kernels: at most one grey level).
    ``make_eps(batch_indices)`` returns the eps function for that batch (guidance uses it to set
    the target classes).
    """
    dtype = AUTOCAST[sampling.precision]
    indices = np.asarray(indices)
    for start in range(0, len(indices), sampling.batch_size):
        batch = indices[start:start + sampling.batch_size]
        gens = [sample_generator(seed, int(k)) for k in batch]
        x_T = initial_noise(latent_shape, gens, device)
        scheduler = sampling_scheduler(sampling.sampler, train_scheduler)
        z_0 = sample_loop(make_eps(batch), scheduler, x_T, sampling.num_steps, gens, sampling.eta, dtype)
        with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            images = decode_latents(vae, z_0.to(vae.dtype))
        yield batch, tensor_to_tiles(images.float()), z_0
        if on_batch is not None:
            on_batch(len(batch))
