"""Stage ``latents`` on the smoke run: the pool encoded once, close to N(0, 1) per channel once normalised."""

from __future__ import annotations

import torch

from histodiffusion.data.latents import LatentSet
from histodiffusion.rundir import RunDir


def test_latent_cache_normalised_per_channel(smoke_run: RunDir) -> None:
    assert (smoke_run.root / "latents/pool/index.json").is_file()
    latents = LatentSet(smoke_run.root / "latents" / "pool")
    z = latents.sample(torch.arange(len(latents)), torch.Generator().manual_seed(0))
    # Measured on the training part of the pool, so over the whole pool close to N(0, 1) per channel.
    assert z.shape[1:] == (3, 8, 8)
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(3), atol=0.3)
    assert torch.allclose(z.std(dim=(0, 2, 3)), torch.ones(3), atol=0.3)
