"""Stage ``finetune``: the noise-aware latent classifier p(y | x_t, t) on one labeled subset, and
the pre-trained UNet adapted to that subset (unconditionally)."""

from __future__ import annotations

import torch

from histodiffusion import io
from histodiffusion.data.latents import encode_split
from histodiffusion.data.prepared import classes_of, split_rows
from histodiffusion.devices import inference_device
from histodiffusion.diffusion.sampling import preview_tiles
from histodiffusion.diffusion.schedules import training_scheduler
from histodiffusion.models.autoencoder import load_vae
from histodiffusion.models.latent_classifier import LatentClassifier
from histodiffusion.models.unet import ADAPT, load_unet
from histodiffusion.pipeline import Stage, StageContext, register
from histodiffusion.progress import console
from histodiffusion.training.diffusion import train_diffusion
from histodiffusion.training.latent_classifier import (
    class_balanced_weights,
    train_latent_classifier,
)


def run(ctx: StageContext) -> dict:
    """Encode the labeled subset and valid split, train the latent classifier, adapt the UNet."""
    cfg, ft = ctx.cfg, ctx.cfg.finetune
    data = ctx.upstream("data")
    device = inference_device(cfg.device)
    vae = load_vae(ctx.upstream("autoencoder"), device)
    classes = classes_of(data)
    labeled, y = encode_split(vae, *split_rows(data, f"labeled/{ctx.budget_name}"), ctx.folder / "latents" / "labeled",
                              device)
    valid, y_valid = encode_split(vae, *split_rows(data, "valid", ft.classifier.eval_max, cfg.seed),
                                  ctx.folder / "latents" / "valid", device)
    console.print(f"finetune {ctx.budget_name}: {len(labeled)} labeled latents, {len(valid)} valid latents, "
                  f"{len(classes)} classes")
    noise_scheduler = training_scheduler(**cfg.diffusion.model_dump(exclude={"min_snr_gamma"}))
    c = ft.classifier
    torch.manual_seed(cfg.seed)
    classifier = LatentClassifier(in_channels=labeled.shape[0], num_classes=len(classes), sample_size=labeled.shape[1],
                                  block_out_channels=tuple(c.channels), layers_per_block=c.layers_per_block,
                                  attention_resolutions=tuple(c.attention_resolutions),
                                  attention_head_dim=c.attention_head_dim, norm_num_groups=c.norm_num_groups,
                                  dropout=c.dropout, class_names=tuple(classes))
    best = train_latent_classifier(ctx.folder, classifier, noise_scheduler, labeled, y, valid, y_valid, c.train,
                                   seed=cfg.seed, eval_every=c.eval_every, device=cfg.device)
    console.print("latent classifier (valid, kept checkpoint): " + ", ".join(
        f"{k} {best[k]:.3f}" for k in ("val_loss", "acc_q1", "acc_q2", "acc_q3", "acc_q4")))
    summary = {"classifier": best, "n_labeled": len(labeled), "domain_adapt": ft.domain_adapt}
    if ft.domain_adapt:
        unet, _ = load_unet(ctx.upstream("pretrain"))
        train_diffusion(ctx.folder / ADAPT, unet.train(), noise_scheduler, labeled, class_balanced_weights(y),
                        ft.train, seed=cfg.seed, device=cfg.device, min_snr_gamma=cfg.diffusion.min_snr_gamma,
                        preview=lambda model: preview_tiles(model, vae, noise_scheduler, 16, cfg.seed,
                                                            cfg.sampling.model_dump(), device),
                        description=f"finetune {ctx.budget_name}")
        records = io.read_jsonl(ctx.folder / ADAPT / "metrics.jsonl")
        summary["adapt_final_loss"] = records[-1]["loss"] if records else None
    return summary


STAGE = register(Stage("finetune", "finetune", ("diffusion", "finetune", "seed"),
                       ("data", "labels", "autoencoder", "pretrain"), run, per_budget=True,
                       description="latent classifier + domain adaptation", distributed=True, extendable=True))
