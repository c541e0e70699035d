"""Stage ``autoencoder``: train the KL autoencoder on the pool tiles and measure the latent scale."""

from __future__ import annotations

import numpy as np
import torch
from accelerate import PartialState

from histodiffusion import io
from histodiffusion.data.prepared import pool_tiles, split_records
from histodiffusion.models.autoencoder import build_autoencoder, save_vae
from histodiffusion.pipeline import Stage, StageContext, register
from histodiffusion.progress import console
from histodiffusion.training.autoencoder import PoolSampler, train_autoencoder


def run(ctx: StageContext) -> dict:
    """Train, evaluate on held-out pool tiles, measure the latent scale, save a diffusers AutoencoderKL."""
    cfg, ae = ctx.cfg, ctx.cfg.autoencoder
    data = ctx.upstream("data")
    weights = np.array([r.weight for r in split_records(data, "pool")], dtype=np.float64)
    pool = PoolSampler(pool_tiles(data), weights, ae.holdout_fraction, cfg.seed)
    console.print(f"autoencoder: {len(pool.train)} training tiles, {len(pool.holdout)} held out, "
                  f"{cfg.data.resolution}px -> {cfg.data.resolution // ae.arch.downsample_factor}px latents")
    torch.manual_seed(cfg.seed)
    vae = build_autoencoder(cfg.data.resolution, **ae.arch.model_dump())
    model, metrics = train_autoencoder(ctx.folder, vae, pool, ae.train, seed=cfg.seed, device=cfg.device,
                                       kl_weight=ae.kl_weight, ssim_weight=ae.ssim_weight,
                                       perceptual_weight=ae.perceptual_weight, disc_weight=ae.disc_weight,
                                       disc_start=ae.disc_start, train_crop=ae.train_crop,
                                       per_channel=ae.latent_normalization == "per_channel")
    if PartialState().is_main_process:
        save_vae(model, ctx.folder)
        io.write_json(ctx.folder / "metrics.json", metrics)
    console.print(f"autoencoder: held-out PSNR {metrics['psnr_db']:.2f} dB, SSIM {metrics['ssim']:.3f} "
                  f"on {metrics['n_tiles']} tiles; latent scale {metrics['scaling_factor']:.4f}")
    return metrics


STAGE = register(Stage("autoencoder", "train-autoencoder", ("data.resolution", "autoencoder", "seed"), ("data",), run,
                       description="KL autoencoder + latent scale", distributed=True, extendable=True))
