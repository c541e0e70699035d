"""Stage ``autoencoder`` on the smoke run: a diffusers AutoencoderKL folder with the measured latent
normalisation in its config, and the held-out metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from histodiffusion.rundir import RunDir


def test_autoencoder_stage_outputs(smoke_run: RunDir) -> None:
    root = smoke_run.root
    for path in ("autoencoder/vae/config.json", "autoencoder/vae/diffusion_pytorch_model.safetensors",
                 "autoencoder/metrics.json"):
        assert (root / path).is_file(), path
    vae_cfg = json.loads((root / "autoencoder/vae/config.json").read_text())
    metrics = json.loads((root / "autoencoder/metrics.json").read_text())
    assert vae_cfg["scaling_factor"] == pytest.approx(metrics["scaling_factor"])
    assert vae_cfg["latents_mean"] == pytest.approx(metrics["latents_mean"]) and len(vae_cfg["latents_std"]) == 3
    assert vae_cfg["scaling_factor"] != 0.18215 and metrics["scaling_factor"] > 0
    assert metrics["n_tiles"] >= 1 and np.isfinite(metrics["psnr_db"])
