"""The KL autoencoder (models/autoencoder.py): reconstruction of uint8 tiles at any batch size, and
the perceptual loss's offline message."""

from __future__ import annotations

import json

import numpy as np
import pytest

from histodiffusion.rundir import RunDir


def test_reconstructed_tiles_match_the_stage_psnr(smoke_run: RunDir, smoke_pool) -> None:
    """reconstruct_tiles (uint8 in, uint8 out, any batch size) reproduces the autoencoder stage's held-out PSNR."""
    from histodiffusion.data.images import tiles_to_tensor
    from histodiffusion.models.autoencoder import load_vae, psnr, reconstruct_tiles

    pool = smoke_pool
    tiles = pool.cache.take(pool.holdout)
    vae = load_vae(smoke_run.root / "autoencoder")
    rec = reconstruct_tiles(vae, tiles, batch_size=2)
    assert rec.shape == tiles.shape and rec.dtype == np.uint8
    assert np.abs(rec.astype(int) - reconstruct_tiles(vae, tiles, batch_size=64)).max() <= 1
    stage = json.loads((smoke_run.root / "autoencoder/metrics.json").read_text())
    measured = float(psnr(tiles_to_tensor(rec), tiles_to_tensor(tiles)).mean())
    assert measured == pytest.approx(stage["psnr_db"], abs=0.3)  # only uint8 rounding differs
    assert reconstruct_tiles(vae, tiles[:0]).shape == (0, *tiles.shape[1:])


def test_perceptual_loss_without_weights_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchmetrics.image.lpip as lpip

    from histodiffusion.errors import UserError
    from histodiffusion.models.autoencoder import load_lpips

    def offline(*_a, **_k):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(lpip, "LearnedPerceptualImagePatchSimilarity", offline)
    with pytest.raises(UserError, match=r"VGG-16 weights.*perceptual_weight: 0"):
        load_lpips()
