"""Stages ``latents`` (encode the pool once) and ``pretrain`` (unconditional LDM on those latents)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

from histodiffusion import io
from histodiffusion.data.augment import random_dihedral
from histodiffusion.data.cache import TileCache
from histodiffusion.data.latents import LatentSet, encode_to_shards
from histodiffusion.data.sources import read_manifest
from histodiffusion.diffusion.generate import generate
from histodiffusion.diffusion.losses import diffusion_loss
from histodiffusion.diffusion.sampling import unet_eps_fn
from histodiffusion.diffusion.schedules import training_scheduler
from histodiffusion.errors import StagePaused, UserError
from histodiffusion.models.unet import build_unet, count_parameters
from histodiffusion.progress import console
from histodiffusion.stages.autoencoder import load_vae
from histodiffusion.stages.base import Stage, StageContext, register
from histodiffusion.training.loop import (
    EMA,
    LoopSpec,
    accumulate_step,
    inference_device,
    lr_multiplier,
    make_accelerator,
    run_loop,
    step_generator,
    step_rng,
)
from histodiffusion.viz import grid, save_image

UNET, SCHEDULER = "unet", "scheduler"


def run_latents(ctx: StageContext) -> dict:
    """Encode every pool tile once (posterior moments, safetensors shards)."""
    data = ctx.upstream("data")
    cache = TileCache(data / "cache" / "pool")
    vae = load_vae(ctx.upstream("autoencoder"))
    device = inference_device(ctx.cfg.device)
    index = encode_to_shards(vae, cache, np.arange(len(cache)), ctx.folder / "pool", device=device)
    return {"n": index["n"], "scaling_factor": index["scaling_factor"]}


def preview(unet: UNet2DModel, vae, noise_scheduler: DDPMScheduler, cfg, n: int, device,
            class_labels: torch.Tensor | None = None) -> np.ndarray:
    """Tiles from fixed seeds 0..n-1 with the configured sampler (for progress grids)."""
    unet.eval()
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    labels = class_labels

    def make_eps(batch: np.ndarray):
        y = None if labels is None else labels[torch.as_tensor(batch)].to(device)
        return unet_eps_fn(unet, cfg.diffusion.prediction_type, noise_scheduler.alphas_cumprod, y)

    sampling = cfg.sampling.model_copy(update={"batch_size": n})
    with torch.no_grad():
        tiles = [t for _, t, _ in generate(make_eps, vae, noise_scheduler, shape, np.arange(n), cfg.seed,
                                           sampling, device)]
    return np.concatenate(tiles)


def train_diffusion(cfg, folder: Path, vae_folder: Path, unet: UNet2DModel, latents: LatentSet,
                    weights: np.ndarray, train, dihedral: bool, sample_every: int, num_preview: int,
                    description: str, labels: torch.Tensor | None = None) -> UNet2DModel:
    """The LDM training loop shared by pre-training, fine-tuning and the conditional baseline.

    Checkpoints, metrics.jsonl, preview grids and the final EMA model (``unet/``, ``scheduler/``)
    go to ``folder``. Returns the EMA model. ``labels`` (one per latent) makes the UNet
    class-conditional.
    """
    torch.manual_seed(cfg.seed)
    noise_scheduler = training_scheduler(cfg.diffusion)
    accelerator = make_accelerator(cfg.device, train.mixed_precision)
    opt = torch.optim.AdamW(unet.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(train))
    ema = EMA(unet, train.ema_decay)
    accelerator.register_for_checkpointing(ema)
    unet, opt, sched = accelerator.prepare(unet, opt, sched)
    ema.shadow.to(accelerator.device)
    latents.mean, latents.std = latents.mean.to(accelerator.device), latents.std.to(accelerator.device)
    p = weights / weights.sum()
    rank, device, T = accelerator.process_index, accelerator.device, cfg.diffusion.num_train_timesteps
    vae = load_vae(vae_folder, device)

    def micro_loss(step: int, m: int) -> tuple[torch.Tensor, dict]:
        index = step * train.gradient_accumulation + m
        rows = step_rng(cfg.seed, index, rank).choice(len(latents), size=train.batch_size, p=p)
        g = step_generator(cfg.seed, index, rank)
        z = latents.sample(rows, g)
        if dihedral:
            z = random_dihedral(z, g)
        noise = torch.randn(z.shape, generator=g).to(device)
        t = torch.randint(0, T, (z.shape[0],), generator=g).to(device)
        y = None if labels is None else labels[torch.as_tensor(rows)].to(device)
        with accelerator.autocast():
            loss = diffusion_loss(unet, noise_scheduler, z, noise, t, cfg.diffusion.min_snr_gamma, y)
        return loss, {"loss": loss.item()}

    def step_fn(step: int) -> dict:
        unet.train()
        metrics = accumulate_step(accelerator, unet, opt, sched, lambda m: micro_loss(step, m),
                                  train.gradient_accumulation, train.grad_clip)
        return {**metrics, "lr": sched.get_last_lr()[0]}

    preview_labels = None if labels is None else \
        torch.as_tensor(np.arange(num_preview) % int(labels.max() + 1))

    def on_sample(step: int) -> None:
        tiles = preview(ema.shadow, vae, noise_scheduler, cfg, num_preview, device, preview_labels)
        save_image(grid(tiles), folder / "samples" / f"step-{step:07d}.png", scale=2)

    spec = LoopSpec(train.steps, train.log_every, train.checkpoint_every, train.keep_checkpoints,
                    sample_every=sample_every or train.steps,
                    images_per_step=train.batch_size * train.gradient_accumulation, description=description,
                    time_limit_s=train.time_limit_minutes * 60 if train.time_limit_minutes else None)
    reached = run_loop(folder, accelerator, spec, step_fn, ema=ema, model=unet, on_sample=on_sample)
    if accelerator.is_main_process:  # also when paused: the EMA so far is usable (not marked DONE)
        save_unet(ema.shadow, noise_scheduler, folder)
    if reached < train.steps:
        raise StagePaused(f"{description}: stopped at step {reached}/{train.steps} after its time limit "
                          f"(train.time_limit_minutes); the EMA model so far is in {folder / UNET}. "
                          f"Rerun the same command to continue, or, to end the run sooner, ask for fewer "
                          f"steps (at least {reached}), with train.cooldown_steps in the ones added if you "
                          "like.", reached=reached)
    return ema.shadow


def save_unet(unet: UNet2DModel, noise_scheduler: DDPMScheduler, folder: Path) -> None:
    """Write ``unet/`` and ``scheduler/`` as diffusers folders (safetensors) atomically."""
    with io.atomic_path(folder / UNET) as tmp:
        unet.save_pretrained(tmp, safe_serialization=True)
    with io.atomic_path(folder / SCHEDULER) as tmp:
        noise_scheduler.save_pretrained(tmp)


def load_unet(folder: Path, device: torch.device | str = "cpu") -> tuple[UNet2DModel, DDPMScheduler]:
    """A saved UNet and its training scheduler (plain diffusers folders)."""
    folder = Path(folder)
    if not (folder / UNET / "config.json").is_file():
        raise UserError(f"no trained UNet at {folder / UNET}; run the stage that writes it first")
    unet = UNet2DModel.from_pretrained(folder / UNET).to(device).eval()
    return unet, DDPMScheduler.from_pretrained(folder / SCHEDULER)


def pool_weights(data_folder: Path, latents: LatentSet) -> np.ndarray:
    """Sampling weight of every latent (the pool source weights, aligned by cache row)."""
    records = read_manifest(data_folder / "pool.csv")
    w = np.array([r.weight for r in records], dtype=np.float64)
    return w[latents.rows.numpy()]


def run_pretrain(ctx: StageContext) -> dict:
    """Train the unconditional UNet on pool latents; save the EMA model as a diffusers folder."""
    pt = ctx.cfg.pretrain
    latents = LatentSet(ctx.upstream("latents") / "pool")
    c, h, _ = latents.shape
    torch.manual_seed(ctx.cfg.seed)  # the initial weights depend on the seed alone
    unet = build_unet(pt.unet, h, c)
    console.print(f"pretrain: UNet {count_parameters(unet) / 1e6:.2f}M parameters on {len(latents)} latents "
                  f"of shape {latents.shape}; {pt.train.steps} steps of {pt.train.batch_size}")
    train_diffusion(ctx.cfg, ctx.folder, ctx.upstream("autoencoder"), unet, latents,
                    pool_weights(ctx.upstream("data"), latents), pt.train, pt.dihedral, pt.sample_every,
                    pt.num_preview, "pretrain")
    records = io.read_jsonl(ctx.folder / "metrics.jsonl")
    return {"parameters": count_parameters(unet), "final_loss": records[-1]["loss"] if records else None,
            "steps": pt.train.steps}


LATENTS = register(Stage("latents", ("data.resolution", "autoencoder", "seed"), ("autoencoder",), run_latents,
                         description="encode the pool once"))
PRETRAIN = register(Stage("pretrain", ("diffusion", "pretrain", "sampling", "seed"), ("latents",), run_pretrain,
                          description="unconditional latent diffusion", distributed=True, extendable=True))
