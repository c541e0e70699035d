"""Stage ``autoencoder``: train the KL autoencoder on pool tiles, measure the latent scale.

Loss: L1 + ssim_weight (1 - SSIM) + kl_weight KL, plus optional LPIPS and a patch discriminator
(hinge) from ``disc_start``. The latent normalisation measured on the pool (1 / std, the LDM
recipe, per channel by default) is written into the saved diffusers config (``scaling_factor``,
``latents_mean``, ``latents_std``): no magic constants downstream.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from histodiffusion import io
from histodiffusion.data.augment import random_dihedral
from histodiffusion.data.cache import TileCache
from histodiffusion.data.sources import read_manifest
from histodiffusion.errors import StagePaused, UserError
from histodiffusion.models.autoencoder import (
    PatchDiscriminator,
    build_autoencoder,
    hinge_d_loss,
    load_lpips,
    psnr,
    reconstruct,
    reconstruct_tiles,
    ssim,
    tiles_to_tensor,
)
from histodiffusion.progress import console
from histodiffusion.stages.base import Stage, StageContext, register
from histodiffusion.training.loop import (
    LoopSpec,
    accumulate_step,
    lr_multiplier,
    make_accelerator,
    run_loop,
    step_generator,
    step_rng,
)
from histodiffusion.viz import grid, save_image

MODEL = "vae"
MAX_HOLDOUT = 512
SCALE_TILES = 2048


class PoolTiles:
    """The pool's tile cache with its sampling weights and a seeded held-out part."""

    def __init__(self, data_folder: Path, holdout_fraction: float, seed: int):
        self.cache = TileCache(data_folder / "cache" / "pool")
        records = read_manifest(data_folder / "pool.csv")
        if len(records) != len(self.cache):
            raise RuntimeError(f"pool manifest ({len(records)}) and cache ({len(self.cache)}) disagree")
        weights = np.array([r.weight for r in records], dtype=np.float64)
        order = np.random.default_rng([seed, 77]).permutation(len(records))
        n_hold = max(1, min(MAX_HOLDOUT, int(round(holdout_fraction * len(records)))))
        self.holdout = np.sort(order[:n_hold])
        self.train = np.sort(order[n_hold:])
        self.p = weights[self.train] / weights[self.train].sum()

    def batch(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """Row indices of a weighted random batch from the training part."""
        return self.train[rng.choice(len(self.train), size=size, p=self.p)]

    def scale_rows(self, seed: int, size: int = SCALE_TILES) -> np.ndarray:
        """Up to ``size`` distinct training rows drawn by the sampling weights (seeded, sorted).

        The latent normalisation is measured on these, so it describes the latents the diffusion
        model trains on. The pool's rows are grouped by source: its first rows would measure the
        first source only.
        """
        n = min(size, int(np.count_nonzero(self.p)))
        rng = np.random.default_rng([seed, 78])
        return np.sort(self.train[rng.choice(len(self.train), size=n, replace=False, p=self.p)])


def _crop(x: torch.Tensor, size: int | None, g: torch.Generator) -> torch.Tensor:
    """A random (size x size) crop at one offset per batch; the whole batch when size is None."""
    if size is None or size >= x.shape[-1]:
        return x
    top, left = (int(v) for v in torch.randint(0, x.shape[-1] - size + 1, (2,), generator=g))
    return x[..., top:top + size, left:left + size]


@torch.no_grad()
def evaluate(vae: AutoencoderKL, cache: TileCache, rows: np.ndarray, device: torch.device,
             batch_size: int = 64) -> dict:
    """Mean reconstruction PSNR (dB) and SSIM of the tiles at ``rows`` (posterior mean, no sampling)."""
    vae.eval()
    p, s = [], []
    for i in range(0, len(rows), batch_size):
        x = tiles_to_tensor(cache.take(rows[i:i + batch_size])).to(device)
        rec = reconstruct(vae, x)
        p.append(psnr(rec, x).cpu())
        s.append(ssim(rec, x).cpu())
    return {"psnr_db": float(torch.cat(p).mean()), "ssim": float(torch.cat(s).mean()), "n_tiles": len(rows)}


@torch.no_grad()
def measure_normalization(vae: AutoencoderKL, cache: TileCache, rows: np.ndarray, device: torch.device,
                          seed: int, per_channel: bool, batch_size: int = 64) -> dict:
    """The latent normalisation measured on posterior samples of pool tiles.

    global: scaling_factor = 1 / std of all latent values (Rombach et al. 2022, sec. 4.3).
    per_channel: latents_mean = per-channel mean; scaling_factor = 1 / pooled per-channel std;
    latents_std = per-channel std / pooled std, so (z - mean) * scaling_factor / latents_std has
    zero mean and unit variance in every channel (a KL autoencoder with a tiny KL weight leaves
    channel means far from 0, which an unnormalised diffusion model shows as colour casts).
    """
    g = step_generator(seed, 0, stream=99)
    zs = []
    for i in range(0, len(rows), batch_size):
        x = tiles_to_tensor(cache.take(rows[i:i + batch_size])).to(device)
        dist = vae.encode(x).latent_dist
        zs.append((dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g).to(device)).cpu())
    z = torch.cat(zs).double()
    if not per_channel:
        return {"scaling_factor": float(1.0 / z.std()), "latents_mean": None, "latents_std": None}
    mean, std = z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3))
    pooled = float(std.pow(2).mean().sqrt())
    return {"scaling_factor": 1.0 / pooled, "latents_mean": [float(v) for v in mean],
            "latents_std": [float(v) / pooled for v in std]}


def run(ctx: StageContext) -> dict:
    """Train, evaluate, measure the latent scale, save a diffusers AutoencoderKL folder."""
    cfg, ae, train = ctx.cfg, ctx.cfg.autoencoder, ctx.cfg.autoencoder.train
    data = PoolTiles(ctx.upstream("data"), ae.holdout_fraction, cfg.seed)
    console.print(f"autoencoder: {len(data.train)} training tiles, {len(data.holdout)} held out, "
                  f"{cfg.data.resolution}px -> {cfg.data.resolution // ae.arch.downsample_factor}px latents")
    torch.manual_seed(cfg.seed)
    accelerator = make_accelerator(cfg.device, train.mixed_precision)
    vae = build_autoencoder(ae.arch, cfg.data.resolution)
    # GAN-style betas (LDM) only when a discriminator takes part; plain Adam betas otherwise.
    betas = (0.5, 0.9) if ae.disc_weight > 0 else (0.9, 0.999)
    opt = torch.optim.AdamW(vae.parameters(), lr=train.lr, betas=betas, weight_decay=train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(train))
    disc = PatchDiscriminator() if ae.disc_weight > 0 else None
    lpips = load_lpips() if ae.perceptual_weight > 0 else None
    if disc is not None:
        d_opt = torch.optim.AdamW(disc.parameters(), lr=train.lr, betas=(0.5, 0.9))
        vae, opt, sched, disc, d_opt = accelerator.prepare(vae, opt, sched, disc, d_opt)
    else:
        vae, opt, sched = accelerator.prepare(vae, opt, sched)
    if lpips is not None:
        lpips = lpips.to(accelerator.device)
    rank, device = accelerator.process_index, accelerator.device
    last: dict[str, torch.Tensor] = {}  # the latest micro-batch, for the discriminator step

    def micro_loss(step: int, m: int) -> tuple[torch.Tensor, dict]:
        index = step * train.gradient_accumulation + m
        g = step_generator(cfg.seed, index, rank)
        x = tiles_to_tensor(data.cache.take(data.batch(step_rng(cfg.seed, index, rank), train.batch_size)))
        x = random_dihedral(_crop(x, ae.train_crop, g), g).to(device)
        with accelerator.autocast():
            dist = accelerator.unwrap_model(vae).encode(x).latent_dist
            z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g).to(device)
            rec = accelerator.unwrap_model(vae).decode(z).sample
        rec = rec.float()
        l1 = F.l1_loss(rec, x)
        ssim_term = 1 - ssim(rec, x).mean()
        # LDM sums L1 and KL over elements; with L1 as a per-pixel mean the same balance puts
        # the KL sum divided by the number of pixel values beside it.
        kl = dist.kl().mean() / x[0].numel()
        loss = l1 + ae.ssim_weight * ssim_term + ae.kl_weight * kl
        metrics = {"l1": l1.item(), "ssim": 1 - ssim_term.item(), "kl": kl.item()}
        if ae.scale_equivariance_weight > 0:
            x_half = F.avg_pool2d(x, 2)
            with accelerator.autocast():
                rec_half = accelerator.unwrap_model(vae).decode(F.avg_pool2d(z, 2)).sample.float()
            se = F.l1_loss(rec_half, x_half) + ae.ssim_weight * (1 - ssim(rec_half, x_half).mean())
            loss = loss + ae.scale_equivariance_weight * se
            metrics["scale_eq"] = se.item()
        if lpips is not None:
            p = lpips(rec.clamp(-1, 1), x)
            loss = loss + ae.perceptual_weight * p
            metrics["lpips"] = p.item()
        if disc is not None and step >= ae.disc_start:
            g_adv = -disc(rec).mean()
            loss = loss + ae.disc_weight * g_adv
            metrics["g_adv"] = g_adv.item()
            last.update(fake=rec.detach(), real=x)
        return loss, {"loss": loss.item(), **metrics}

    def step_fn(step: int) -> dict:
        vae.train()
        metrics = accumulate_step(accelerator, vae, opt, sched, lambda m: micro_loss(step, m),
                                  train.gradient_accumulation, train.grad_clip)
        if disc is not None and step >= ae.disc_start:
            d_loss = hinge_d_loss(disc(last["real"]), disc(last["fake"]))
            accelerator.backward(d_loss)
            d_opt.step()
            d_opt.zero_grad(set_to_none=True)
            metrics["d_loss"] = d_loss.item()
        metrics["lr"] = sched.get_last_lr()[0]
        return metrics

    def on_sample(step: int) -> None:
        model = accelerator.unwrap_model(vae)
        tiles = data.cache.take(data.holdout[:16])
        model.eval()
        pair = np.concatenate([tiles, reconstruct_tiles(model, tiles)])
        save_image(grid(pair, ncol=16), ctx.folder / "reconstructions" / f"step-{step:07d}.png", scale=2)

    spec = LoopSpec(train.steps, train.log_every, train.checkpoint_every, train.keep_checkpoints,
                    sample_every=max(train.checkpoint_every, 1), images_per_step=train.batch_size *
                    train.gradient_accumulation, description="autoencoder",
                    time_limit_s=train.time_limit_minutes * 60 if train.time_limit_minutes else None)
    reached = run_loop(ctx.folder, accelerator, spec, step_fn, on_sample=on_sample)
    if reached < train.steps:
        raise StagePaused(f"autoencoder: stopped at step {reached}/{train.steps} after its time limit "
                          "(train.time_limit_minutes); rerun the same command to continue, or, to end the "
                          f"run sooner, ask for fewer steps (at least {reached}).", reached=reached)
    model: AutoencoderKL = accelerator.unwrap_model(vae)
    metrics = evaluate(model, data.cache, data.holdout, device)
    norm = measure_normalization(model, data.cache, data.scale_rows(cfg.seed), device, cfg.seed,
                                 ae.latent_normalization == "per_channel")
    model.register_to_config(**norm)
    metrics.update(norm)
    if accelerator.is_main_process:
        with io.atomic_path(ctx.folder / MODEL) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
        io.write_json(ctx.folder / "metrics.json", metrics)
    console.print(f"autoencoder: held-out PSNR {metrics['psnr_db']:.2f} dB, SSIM {metrics['ssim']:.3f} "
                  f"on {metrics['n_tiles']} tiles; latent scale {norm['scaling_factor']:.4f}")
    return metrics


def load_vae(folder: Path, device: torch.device | str = "cpu") -> AutoencoderKL:
    """The trained autoencoder of a run (``autoencoder/vae``), in eval mode."""
    path = Path(folder) / MODEL
    if not (path / "config.json").is_file():
        raise UserError(f"no trained autoencoder at {path}; run `histodiffusion train-autoencoder CONFIG` first")
    return AutoencoderKL.from_pretrained(path).to(device).eval()


STAGE = register(Stage("autoencoder", ("data.resolution", "autoencoder", "seed"), ("data",), run,
                       description="KL autoencoder + latent scale", distributed=True, extendable=True))
