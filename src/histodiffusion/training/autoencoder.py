"""Training the KL autoencoder on pool tiles, its held-out quality, and the latent normalisation.

Loss: L1 + ssim_weight (1 - SSIM) + kl_weight KL, plus optional LPIPS and a patch discriminator
(hinge) from ``disc_start``. The latent normalisation measured on the pool (1 / std, the LDM
recipe, per channel by default) is written into the model's diffusers config (``scaling_factor``,
``latents_mean``, ``latents_std``): no magic constants downstream.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from histodiffusion import tracking
from histodiffusion.data.augment import dihedral_each
from histodiffusion.data.cache import TileCache
from histodiffusion.data.images import tiles_to_tensor
from histodiffusion.errors import StagePaused
from histodiffusion.models.autoencoder import (
    PatchDiscriminator,
    hinge_d_loss,
    load_lpips,
    psnr,
    reconstruct,
    reconstruct_tiles,
    ssim,
)
from histodiffusion.seeding import process_rows, step_generator, step_rng
from histodiffusion.training.harness import (
    LoopSpec,
    TrainState,
    accumulate_step,
    lr_lambda,
    make_accelerator,
    make_optimizer,
    run_loop,
)
from histodiffusion.viz import grid, save_image

MAX_HOLDOUT = 512
SCALE_TILES = 2048


class PoolSampler:
    """The pool's tile cache with its sampling weights and a seeded held-out part."""

    def __init__(self, cache: TileCache, weights: np.ndarray, holdout_fraction: float, seed: int):
        if len(weights) != len(cache):
            raise RuntimeError(f"pool weights ({len(weights)}) and cache ({len(cache)}) disagree")
        self.cache = cache
        order = np.random.default_rng([seed, 77]).permutation(len(cache))
        n_hold = max(1, min(MAX_HOLDOUT, int(round(holdout_fraction * len(cache)))))
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


class Reconstruction(torch.nn.Module):
    """Encode, sample the posterior with given noise, decode: one forward, so that under DDP the
    autoencoder's gradients are averaged over processes (calling ``encode``/``decode`` on the bare
    model would bypass DDP)."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, noise: Callable[[torch.Size], torch.Tensor]) -> tuple[torch.Tensor, object]:
        """The reconstruction of ``x`` and its posterior; ``noise(shape)`` gives the posterior's noise."""
        dist = self.vae.encode(x).latent_dist
        z = dist.mean + dist.std * noise(dist.mean.shape).to(x.device)
        return self.vae.decode(z).sample, dist


def _crop(x: torch.Tensor, size: int | None, g: torch.Generator) -> torch.Tensor:
    """A random (size x size) crop at one offset per batch; the whole batch when size is None."""
    if size is None or size >= x.shape[-1]:
        return x
    top, left = (int(v) for v in torch.randint(0, x.shape[-1] - size + 1, (2,), generator=g))
    return x[..., top:top + size, left:left + size]


@torch.no_grad()
def evaluate_reconstruction(vae: AutoencoderKL, cache: TileCache, rows: np.ndarray, device: torch.device | str,
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
def measure_normalization(vae: AutoencoderKL, cache: TileCache, rows: np.ndarray, device: torch.device | str,
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


def train_autoencoder(folder: Path, vae: AutoencoderKL, data: PoolSampler, train, *, seed: int, device: str = "auto",
                      kl_weight: float = 1e-6, ssim_weight: float = 0.2, perceptual_weight: float = 0.0,
                      disc_weight: float = 0.0, disc_start: int = 0, train_crop: int | None = None,
                      per_channel: bool = True) -> tuple[AutoencoderKL, dict]:
    """Train ``vae`` on the pool (resumable), then measure it and its latent normalisation.

    ``train`` is a ``TrainCfg``. Checkpoints, ``metrics.jsonl`` and reconstruction grids go to
    ``folder``. Returns the trained model, its normalisation written into its config, and the
    held-out metrics with the normalisation. Raises StagePaused at ``train.time_limit_minutes``.
    """
    accelerator = make_accelerator(device, train.mixed_precision)
    # GAN-style betas (LDM) only when a discriminator takes part; plain Adam betas otherwise.
    betas = (0.5, 0.9) if disc_weight > 0 else (0.9, 0.999)
    opt, sched = make_optimizer(vae.parameters(), train.lr, train.weight_decay,
                                lr_lambda(train.lr_schedule, train.warmup_steps, train.steps), betas)
    disc = PatchDiscriminator() if disc_weight > 0 else None
    lpips = load_lpips() if perceptual_weight > 0 else None
    # The schedule is not prepared: accelerate would step it once per process per optimiser step.
    recon = Reconstruction(vae)
    if disc is not None:
        d_opt = torch.optim.AdamW(disc.parameters(), lr=train.lr, betas=(0.5, 0.9))
        recon, opt, disc, d_opt = accelerator.prepare(recon, opt, disc, d_opt)
    else:
        recon, opt = accelerator.prepare(recon, opt)
    if lpips is not None:
        lpips = lpips.to(accelerator.device)
    rank, world, dev = accelerator.process_index, accelerator.num_processes, accelerator.device
    model = vae  # the bare autoencoder (on the device now): checkpoints, previews, measurements
    last: dict[str, torch.Tensor] = {}  # the latest micro-batch, for the discriminator step

    def micro_loss(step: int, m: int) -> tuple[torch.Tensor, dict]:
        # Every draw is made for the global batch (all processes) and this process takes its rows.
        index = step * train.gradient_accumulation + m
        n, mine = train.batch_size * world, process_rows(train.batch_size, rank)
        g = step_generator(seed, index)
        x = tiles_to_tensor(data.cache.take(data.batch(step_rng(seed, index), n)[mine]))
        x = _crop(x, train_crop, g)
        x = dihedral_each(x, torch.randint(0, 8, (n,), generator=g)[mine]).to(dev)
        with accelerator.autocast():
            rec, dist = recon(x, lambda shape: torch.randn((n, *shape[1:]), generator=g)[mine])
        rec = rec.float()
        l1 = F.l1_loss(rec, x)
        ssim_term = 1 - ssim(rec, x).mean()
        # LDM sums L1 and KL over elements; with L1 as a per-pixel mean the same balance puts
        # the KL sum divided by the number of pixel values beside it.
        kl = dist.kl().mean() / x[0].numel()
        loss = l1 + ssim_weight * ssim_term + kl_weight * kl
        metrics = {"l1": l1.item(), "ssim": 1 - ssim_term.item(), "kl": kl.item()}
        if lpips is not None:
            p = lpips(rec.clamp(-1, 1), x)
            loss = loss + perceptual_weight * p
            metrics["lpips"] = p.item()
        if disc is not None and step >= disc_start:
            g_adv = -disc(rec).mean()
            loss = loss + disc_weight * g_adv
            metrics["g_adv"] = g_adv.item()
            last.update(fake=rec.detach(), real=x)
        return loss, {"loss": loss.item(), **metrics}

    def step_fn(step: int) -> dict:
        recon.train()
        metrics = accumulate_step(accelerator, recon, opt, sched, lambda m: micro_loss(step, m),
                                  train.gradient_accumulation, train.grad_clip)
        if disc is not None and step >= disc_start:
            d_opt.zero_grad(set_to_none=True)  # drop what the generator's adversarial loss left there
            d_loss = hinge_d_loss(disc(last["real"]), disc(last["fake"]))
            accelerator.backward(d_loss)
            d_opt.step()
            d_opt.zero_grad(set_to_none=True)
            metrics["d_loss"] = d_loss.item()
        metrics["lr"] = sched.get_last_lr()[0]
        return metrics

    def on_sample(step: int) -> None:
        tiles = data.cache.take(data.holdout[:16])
        model.eval()
        pair = grid(np.concatenate([tiles, reconstruct_tiles(model, tiles)]), ncol=16)
        save_image(pair, folder / "reconstructions" / f"step-{step:07d}.png", scale=2)
        tracking.log_image("reconstructions", pair, step)

    spec = LoopSpec(train.steps, train.log_every, train.checkpoint_every, train.keep_checkpoints,
                    sample_every=max(train.checkpoint_every, 1), images_per_step=train.batch_size *
                    train.gradient_accumulation, description="autoencoder",
                    time_limit_s=train.time_limit_minutes * 60 if train.time_limit_minutes else None)
    reached = run_loop(spec, step_fn, folder=folder, state=TrainState(model, opt, sched), accelerator=accelerator,
                       on_sample=on_sample)
    if reached < train.steps:
        raise StagePaused(f"autoencoder: stopped at step {reached}/{train.steps} after its time limit "
                          "(train.time_limit_minutes); rerun the same command to continue.")
    metrics = evaluate_reconstruction(model, data.cache, data.holdout, dev)
    norm = measure_normalization(model, data.cache, data.scale_rows(seed), dev, seed, per_channel)
    model.register_to_config(**norm)
    return model, {**metrics, **norm}
