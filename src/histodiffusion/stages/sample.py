"""``histodiffusion sample``: unconditional tiles from a trained UNet, one PNG per seed, and a grid."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from histodiffusion import io
from histodiffusion.config import ExperimentConfig
from histodiffusion.data.images import save_png
from histodiffusion.diffusion.generate import generate
from histodiffusion.diffusion.sampling import unet_eps_fn
from histodiffusion.errors import UserError
from histodiffusion.progress import console, progress_bar
from histodiffusion.rundir import RunDir
from histodiffusion.stages.autoencoder import load_vae
from histodiffusion.stages.pretrain import load_unet
from histodiffusion.training.loop import inference_device
from histodiffusion.viz import grid, save_image


def sample_tiles(cfg: ExperimentConfig, run_dir: RunDir, num: int, model: str = "pretrain",
                 out: Path | None = None) -> Path:
    """Write tiles ``000000.png``... for seeds 0..num-1 (existing ones are kept: resumable)."""
    if num < 1:
        raise UserError(f"--num must be at least 1, got {num}")
    device = inference_device(cfg.device)
    unet, noise_scheduler = load_unet(run_dir.stage_dir(model), device)
    vae = load_vae(run_dir.stage_dir("autoencoder"), device)
    s = cfg.sampling
    out = Path(out) if out else run_dir.root / "samples" / f"{model.replace('/', '-')}-{s.sampler}{s.num_steps}"
    todo = [k for k in range(num) if not (out / f"{k:06d}.png").is_file()]
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)

    def make_eps(_batch: np.ndarray):
        return unet_eps_fn(unet, noise_scheduler.config.prediction_type, noise_scheduler.alphas_cumprod)

    t0 = time.time()
    with torch.no_grad(), progress_bar("sampling", total=len(todo), unit="tiles") as advance:
        for batch, tiles, _ in generate(make_eps, vae, noise_scheduler, shape, todo, cfg.seed, s, device):
            for k, tile in zip(batch, tiles, strict=True):
                save_png(out / f"{int(k):06d}.png", tile)
            advance(len(batch))
    seconds = time.time() - t0
    from PIL import Image

    tiles = np.stack([np.asarray(Image.open(out / f"{k:06d}.png").convert("RGB")) for k in range(min(num, 64))])
    save_image(grid(tiles), out / "grid.png", scale=2)
    io.write_json(out / "sampling.json", {"num": num, "new": len(todo), "seconds": round(seconds, 2),
                                          "sampler": s.sampler, "num_steps": s.num_steps, "eta": s.eta,
                                          "precision": s.precision, "seed": cfg.seed, "model": model})
    console.print(f"{len(todo)} new tiles in {seconds:.1f}s -> {out} (grid: {out / 'grid.png'})")
    return out
