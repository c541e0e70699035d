"""Stage ``pretrain``: the unconditional latent diffusion UNet on the pool's latents."""

from __future__ import annotations

import numpy as np
import torch

from histodiffusion import io
from histodiffusion.data.latents import LatentSet
from histodiffusion.data.prepared import split_records
from histodiffusion.devices import inference_device
from histodiffusion.diffusion.sampling import preview_tiles
from histodiffusion.diffusion.schedules import training_scheduler
from histodiffusion.models.autoencoder import load_vae
from histodiffusion.models.unet import build_unet, count_parameters
from histodiffusion.pipeline import Stage, StageContext, register
from histodiffusion.progress import console
from histodiffusion.training.diffusion import train_diffusion


def run(ctx: StageContext) -> dict:
    """Train the unconditional UNet on pool latents; save the EMA model as a diffusers folder."""
    cfg, pt = ctx.cfg, ctx.cfg.pretrain
    latents = LatentSet(ctx.upstream("latents") / "pool")
    c, h, _ = latents.shape
    records = split_records(ctx.upstream("data"), "pool")
    weights = np.array([r.weight for r in records], dtype=np.float64)[latents.rows.numpy()]
    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed alone
    unet = build_unet(h, c, **pt.unet.model_dump())
    console.print(f"pretrain: UNet {count_parameters(unet) / 1e6:.2f}M parameters on {len(latents)} latents "
                  f"of shape {latents.shape}; {pt.train.steps} steps of {pt.train.batch_size}")
    noise_scheduler = training_scheduler(**cfg.diffusion.model_dump(exclude={"min_snr_gamma"}))
    device = inference_device(cfg.device)
    vae = load_vae(ctx.upstream("autoencoder"), device)
    train_diffusion(ctx.folder, unet, noise_scheduler, latents, weights, pt.train, seed=cfg.seed, device=cfg.device,
                    min_snr_gamma=cfg.diffusion.min_snr_gamma, dihedral=pt.dihedral,
                    preview=lambda model: preview_tiles(model, vae, noise_scheduler, pt.num_preview, cfg.seed,
                                                        cfg.sampling.model_dump(), device),
                    preview_every=pt.sample_every, description="pretrain")
    records = io.read_jsonl(ctx.folder / "metrics.jsonl")
    return {"parameters": count_parameters(unet), "final_loss": records[-1]["loss"] if records else None,
            "steps": pt.train.steps}


STAGE = register(Stage("pretrain", "pretrain", ("diffusion", "pretrain", "seed"), ("latents",), run,
                       description="unconditional latent diffusion", distributed=True, extendable=True))
