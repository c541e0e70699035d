"""Training a latent diffusion UNet: pre-training, domain fine-tuning and the class-conditional
baseline all run this one loop on a latent cache."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

from histodiffusion import tracking
from histodiffusion.data.augment import random_dihedral
from histodiffusion.data.latents import LatentSet
from histodiffusion.diffusion.losses import diffusion_loss
from histodiffusion.errors import StagePaused
from histodiffusion.models.unet import UNET, save_unet
from histodiffusion.seeding import process_rows, step_generator, step_rng
from histodiffusion.training.harness import (
    EMA,
    LoopSpec,
    TrainState,
    accumulate_step,
    lr_lambda,
    make_accelerator,
    make_optimizer,
    run_loop,
)
from histodiffusion.viz import grid, save_image


def diffusion_step_loss(unet: torch.nn.Module, noise_scheduler: DDPMScheduler, latents: LatentSet, p: np.ndarray,
                        batch_size: int, seed: int, index: int, rank: int = 0, world: int = 1, dihedral: bool = True,
                        min_snr_gamma: float | None = None, labels: torch.Tensor | None = None,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """The loss of process ``rank``'s share of micro-batch ``index`` (global over steps and
    accumulation): draw latents by the weights ``p``, augment, noise at a uniform t, and score the
    UNet's prediction (min-SNR weighted).

    Every draw is seeded by (seed, index) and made for the global batch of ``batch_size`` x
    ``world`` items, of which this process takes rows ``[rank*batch_size, (rank+1)*batch_size)``:
    the batch does not depend on the batch history (resumes are exact) nor on how it is split
    among processes. The caller wraps it in autocast.
    """
    n, mine = batch_size * world, process_rows(batch_size, rank)
    rows = step_rng(seed, index).choice(len(latents), size=n, p=p)
    g = step_generator(seed, index)
    z = latents.sample(rows, g)
    if dihedral:
        z = random_dihedral(z, g)
    noise = torch.randn(z.shape, generator=g)[mine].to(device)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (n,), generator=g)[mine].to(device)
    y = None if labels is None else labels[torch.as_tensor(rows[mine])].to(device)
    return diffusion_loss(unet, noise_scheduler, z[mine], noise, t, min_snr_gamma, y)


def train_diffusion(folder: Path, unet: UNet2DModel, noise_scheduler: DDPMScheduler, latents: LatentSet,
                    weights: np.ndarray, train, *, seed: int, device: str = "auto",
                    min_snr_gamma: float | None = None, dihedral: bool = True, labels: torch.Tensor | None = None,
                    preview: Callable[[UNet2DModel], np.ndarray] | None = None, preview_every: int = 0,
                    description: str = "train") -> UNet2DModel:
    """Train ``unet`` on ``latents`` (drawn with probability proportional to ``weights``); resumable.

    Args:
        folder: checkpoints, ``metrics.jsonl``, preview grids (``samples/step-*.png``) and the final
            EMA model (``unet/``, ``scheduler/``) go here.
        train: a ``TrainCfg`` (steps, batch size, optimiser, EMA decay, mixed precision, time limit).
        labels: one class index per latent; makes the UNet class-conditional.
        preview: tiles of a model (the EMA), saved as a grid every ``preview_every`` steps and at the end.
    Returns:
        The EMA model.
    Raises:
        StagePaused: ``train.time_limit_minutes`` ran out first (checkpointed; rerunning continues).
    """
    torch.manual_seed(seed)
    accelerator = make_accelerator(device, train.mixed_precision)
    opt, sched = make_optimizer(unet.parameters(), train.lr, train.weight_decay,
                                lr_lambda(train.lr_schedule, train.warmup_steps, train.steps))
    ema = EMA(unet, train.ema_decay)
    # The schedule is not prepared: accelerate would step it once per process per optimiser step.
    unet, opt = accelerator.prepare(unet, opt)
    ema.shadow.to(accelerator.device)
    latents.to(accelerator.device)
    p = weights / weights.sum()
    rank, world = accelerator.process_index, accelerator.num_processes

    def step_fn(step: int) -> dict:
        unet.train()

        def micro_loss(m: int) -> tuple[torch.Tensor, dict]:
            with accelerator.autocast():
                loss = diffusion_step_loss(unet, noise_scheduler, latents, p, train.batch_size, seed,
                                           step * train.gradient_accumulation + m, rank, world, dihedral,
                                           min_snr_gamma, labels, accelerator.device)
            return loss, {"loss": loss.item()}

        metrics = accumulate_step(accelerator, unet, opt, sched, micro_loss, train.gradient_accumulation,
                                  train.grad_clip)
        return {**metrics, "lr": sched.get_last_lr()[0]}

    def on_sample(step: int) -> None:
        if preview is not None:
            tiles = grid(preview(ema.shadow))
            save_image(tiles, folder / "samples" / f"step-{step:07d}.png", scale=2)
            tracking.log_image("samples", tiles, step)

    spec = LoopSpec(train.steps, train.log_every, train.checkpoint_every, train.keep_checkpoints,
                    sample_every=preview_every or train.steps,
                    images_per_step=train.batch_size * train.gradient_accumulation, description=description,
                    time_limit_s=train.time_limit_minutes * 60 if train.time_limit_minutes else None)
    reached = run_loop(spec, step_fn, folder=folder, state=TrainState(unet, opt, sched, ema),
                       accelerator=accelerator, on_sample=on_sample)
    if accelerator.is_main_process:  # also when paused: the EMA so far is usable (not marked DONE)
        save_unet(ema.shadow, noise_scheduler, folder)
    if reached < train.steps:
        raise StagePaused(f"{description}: stopped at step {reached}/{train.steps} after its time limit "
                          f"(train.time_limit_minutes); the EMA model so far is in {folder / UNET}. "
                          "Rerun the same command to continue.")
    return ema.shadow
