"""Stage ``conditional``: the baseline the paper argues against — a class-conditional UNet trained
from scratch on one labeled subset only, with no pre-training."""

from __future__ import annotations

import torch

from histodiffusion import io
from histodiffusion.data.latents import encode_split
from histodiffusion.data.prepared import classes_of, split_rows
from histodiffusion.devices import inference_device
from histodiffusion.diffusion.sampling import preview_tiles
from histodiffusion.diffusion.schedules import training_scheduler
from histodiffusion.errors import UserError
from histodiffusion.models.autoencoder import load_vae
from histodiffusion.models.unet import build_unet, count_parameters
from histodiffusion.pipeline import Stage, StageContext, register
from histodiffusion.progress import console
from histodiffusion.training.diffusion import train_diffusion
from histodiffusion.training.latent_classifier import class_balanced_weights


def run(ctx: StageContext) -> dict:
    """Train the class-conditional UNet on the labeled subset's latents."""
    cfg = ctx.cfg
    if not cfg.conditional.enabled:
        raise UserError("conditional.enabled is false in the config; set it to true to train the baseline")
    data = ctx.upstream("data")
    device = inference_device(cfg.device)
    vae = load_vae(ctx.upstream("autoencoder"), device)
    classes = classes_of(data)
    labeled, y = encode_split(vae, *split_rows(data, f"labeled/{ctx.budget_name}"), ctx.folder / "latents", device)
    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed alone
    unet = build_unet(labeled.shape[1], labeled.shape[0], **cfg.pretrain.unet.model_dump(), num_classes=len(classes))
    console.print(f"conditional baseline {ctx.budget_name}: UNet {count_parameters(unet) / 1e6:.2f}M from scratch "
                  f"on {len(labeled)} labeled latents")
    noise_scheduler = training_scheduler(**cfg.diffusion.model_dump(exclude={"min_snr_gamma"}))
    n_preview = 4 * len(classes)
    preview_labels = torch.as_tensor(torch.arange(n_preview) % len(classes))
    train_diffusion(ctx.folder, unet, noise_scheduler, labeled, class_balanced_weights(y), cfg.conditional.train,
                    seed=cfg.seed, device=cfg.device, min_snr_gamma=cfg.diffusion.min_snr_gamma, labels=y,
                    preview=lambda model: preview_tiles(model, vae, noise_scheduler, n_preview, cfg.seed,
                                                        cfg.sampling.model_dump(), device, preview_labels),
                    description=f"conditional {ctx.budget_name}")
    records = io.read_jsonl(ctx.folder / "metrics.jsonl")
    return {"final_loss": records[-1]["loss"] if records else None, "n_labeled": len(labeled)}


STAGE = register(Stage("conditional", "train-conditional", ("diffusion", "pretrain.unet", "conditional", "seed"),
                       ("data", "labels", "autoencoder"), run, per_budget=True,
                       description="class-conditional baseline, no pre-training", distributed=True,
                       extendable=True))
