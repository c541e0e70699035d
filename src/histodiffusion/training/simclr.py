"""Self-supervised training of the feature encoder on unlabeled tiles: SimCLR (Chen et al. 2020).

Two augmented views of each tile in a batch (:func:`histodiffusion.data.augment.simclr_view`) are
embedded and projected; the NT-Xent loss (temperature 0.2) pulls the two views of a tile together
and pushes the other 2N - 2 views away. All randomness (init, batch order, augmentations) comes
from ``seed``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from histodiffusion.data.augment import simclr_view
from histodiffusion.data.images import tiles_to_tensor
from histodiffusion.devices import autocast_dtype
from histodiffusion.models.feature_encoder import FeatureEncoder, check_tiles
from histodiffusion.training.harness import (
    LoopSpec,
    accumulate_step,
    lr_lambda,
    make_optimizer,
    run_loop,
)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """NT-Xent loss of paired projections (N, P): each view's positive is the other view of its tile."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = (z @ z.T / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, targets)


def train_feature_encoder(tiles: np.ndarray, steps: int, batch_size: int, lr: float, seed: int,
                          backbone: str = "resnet18", device: str | torch.device = "cpu", progress: bool = True,
                          folder: Path | None = None, precision: str = "fp32", temperature: float = 0.2,
                          weight_decay: float = 1e-4, warmup_steps: int | None = None,
                          log_every: int = 50) -> FeatureEncoder:
    """Train a SimCLR feature encoder on unlabeled tiles (deterministic given ``seed``).

    Args:
        tiles: (N, H, W, 3) uint8 tiles, N >= 2 (square tiles; H is stored as the resolution).
        steps: optimisation steps.
        batch_size: tiles per step (two views each), clipped to N.
        lr: peak AdamW learning rate (linear warmup, then cosine decay to 0).
        seed: seed of the initialisation, batch sampling and augmentations.
        backbone: timm model name (``resnet18``, ``resnet10t``, ...).
        folder: where ``metrics.jsonl`` (loss and lr every ``log_every`` steps and at the end) goes.
        precision: 'fp32' or 'bf16' autocast of the training step.
        warmup_steps: linear warmup length (default: 5% of ``steps``).

    Returns:
        The trained encoder, in eval mode, on ``device``.
    """
    tiles = check_tiles(tiles)
    n = len(tiles)
    batch = min(batch_size, n)
    if batch < 2:
        raise ValueError(f"contrastive training needs at least 2 tiles per batch, got {batch}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = FeatureEncoder(backbone, resolution=tiles.shape[1])
    encoder.to(device, memory_format=torch.channels_last).train()  # oneDNN's fastest layout for convolutions
    dtype = autocast_dtype(precision)
    gen = torch.Generator().manual_seed(seed)
    warmup = max(1, round(0.05 * steps)) if warmup_steps is None else max(1, warmup_steps)
    opt, sched = make_optimizer(encoder.parameters(), lr, weight_decay, lr_lambda("cosine", warmup, steps, 0.0))
    data = torch.from_numpy(np.ascontiguousarray(tiles))
    order, pos = torch.randperm(n, generator=gen), 0

    def micro_loss(_m: int) -> tuple[torch.Tensor, dict]:
        nonlocal order, pos
        if pos + batch > n:
            order, pos = torch.randperm(n, generator=gen), 0
        x = tiles_to_tensor(data[order[pos:pos + batch]]).to(device)
        pos += batch
        views = [simclr_view(x, gen).contiguous(memory_format=torch.channels_last) for _ in range(2)]
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            z1, z2 = (encoder.project(v) for v in views)
        loss = nt_xent(z1.float(), z2.float(), temperature)
        return loss, {"loss": loss.item()}

    def step_fn(_step: int) -> dict:
        lr_now = opt.param_groups[0]["lr"]
        return {**accumulate_step(None, encoder, opt, sched, micro_loss), "lr": lr_now}

    run_loop(LoopSpec(steps, log_every=log_every, images_per_step=batch, description="self-supervised encoder"),
             step_fn, folder=folder, progress=progress)
    return encoder.to(memory_format=torch.contiguous_format).eval()  # as it loads back
