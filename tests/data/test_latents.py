"""Latent normalisation (data/latents.py): normalize and denormalize are inverses, with and without
per-channel statistics."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from histodiffusion.data.latents import denormalize_latents, normalize_latents


def test_normalization_round_trip() -> None:
    z = torch.randn(4, 3, 5, 5) * torch.tensor([2.0, 0.5, 1.0]).view(1, 3, 1, 1) + 3
    for cfg in (SimpleNamespace(scaling_factor=0.4, latents_mean=[3.0, 3.0, 3.0], latents_std=[1.5, 0.4, 0.8]),
                SimpleNamespace(scaling_factor=0.4, latents_mean=None, latents_std=None)):
        assert torch.allclose(denormalize_latents(normalize_latents(z, cfg), cfg), z, atol=1e-5)
